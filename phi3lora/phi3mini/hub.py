"""One answer to "which model and tokenizer does this name mean", for train.py, chat.py and anything else.

    "tiny"                          the built-in demo model (phi3mini/tiny.py): random weights, seed 0, and its
                                    tokenizer built in code; no download
    a local folder                  the Hugging Face layout: config.json, *.safetensors, tokenizer.json
    a Hub id ("owner/name")         downloaded once into the Hub cache (phi3mini/download.py decides what a Hub id
                                    looks like and which files are fetched)

load_model raises CheckpointError, load_tokenizer TokenizerError; ERRORS is what a command line catches.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from .config import ConfigError
from .download import SourceError, find_folder
from .model import Phi3
from .tokenizer import Tokenizer, TokenizerError
from .weights import CheckpointError

TINY = "tiny"
ERRORS = (CheckpointError, ConfigError, TokenizerError, OSError)


@functools.lru_cache(maxsize=8)
def model_folder(name: str) -> Path:
    """The local folder of a folder name or Hub id (a Hub id is looked up once per process)."""
    try:
        return find_folder(name)
    except SourceError as e:
        raise CheckpointError(str(e)) from None


def load_tokenizer(name: str) -> Tokenizer:
    """The tokenizer that goes with model `name` ("tiny", a folder or a Hub id)."""
    if name == TINY:
        return Tokenizer.tiny()
    try:
        folder = model_folder(name)
    except CheckpointError as e:
        raise TokenizerError(str(e)) from None
    return Tokenizer.from_pretrained(folder)


def load_model(name: str, dtype: torch.dtype | None = None, device=None, seed: int = 0, quantize: str = "") -> Phi3:
    """The model `name`, in dtype (None: as stored; fp32 for tiny) on device, in eval mode. "tiny" is initialised
    from seed (0 stands for the one "pretrained" tiny model: adapters trained on it load onto it again).
    quantize="nf4": the decoder projections 4-bit (phi3mini/quant.py; a checkpoint's while it is read).
    model.name_or_path is name, as adapters record it."""
    if name == TINY:
        model = Phi3.from_name(TINY, seed=seed, dtype=dtype or torch.float32, device=device)
        if quantize:
            from .quant import QUANTIZE_CHOICES, quantize_model  # here: quant imports kernels.nf4, so Triton
            if quantize not in QUANTIZE_CHOICES:
                raise CheckpointError(f"quantize={quantize!r}: choose one of {QUANTIZE_CHOICES}")
            quantize_model(model)
    else:
        model = Phi3.from_pretrained(model_folder(name), dtype=dtype, device=device, quantize=quantize)
    model.name_or_path = name
    return model.eval()
