"""Training data: read chat files in the forms users have (files.py, formats.py), check them, tokenize with label
masks (encoder.py) and cache the tokens on disk (store.py), then batch, optionally packed (pipeline.py)."""
from .encoder import ChatEncoder
from .formats import DataError
from .pipeline import Batch, DataSets, Example, TokenSet, collate, epoch_plan, fingerprint, load_data, load_dataset

__all__ = ["load_data", "load_dataset", "DataError", "ChatEncoder", "DataSets", "TokenSet", "Example", "Batch",
           "collate", "epoch_plan", "fingerprint"]
