"""phi3mini: Microsoft's Phi-3-mini in plain PyTorch, loading and saving Hugging Face checkpoints."""
from .config import ConfigError, Phi3Config
from .generation import default_stop_ids, generate, sample_next
from .model import KVCache, Phi3
from .tokenizer import StreamDecoder, Tokenizer, TokenizerError
from .weights import CheckpointError

__all__ = ["Phi3Config", "ConfigError", "Phi3", "KVCache", "CheckpointError", "generate", "sample_next",
           "default_stop_ids", "Tokenizer", "StreamDecoder", "TokenizerError"]
