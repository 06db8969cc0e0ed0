"""One answer to "which model and tokenizer does this name mean, on which device, in which dtype", for train.py,
chat.py, probe.py and anything else.

    "tiny"                          the built-in demo model (phi3mini/tiny.py): random weights, seed 0, and its
                                    tokenizer built in code; no download
    a local folder                  the Hugging Face layout: config.json, *.safetensors, tokenizer.json
    a Hub id ("owner/name")         downloaded once into the Hub cache (phi3mini/download.py's find_folder decides
                                    what a Hub id looks like and which files are fetched)

--device and --dtype mean the same in every program: DEVICE_CHOICES and DTYPE_CHOICES, resolved by `resolve`.
load_model raises CheckpointError and load_tokenizer TokenizerError (ERRORS is what a caller catches); `load`,
`open_model`, `open_tokenizer` and `resolve`, the command lines' entry points, raise LoadError, whose message is
one line that names the flag at fault.
"""
from __future__ import annotations

import torch

from .config import ConfigError
from .model import Phi3
from .tokenizer import Tokenizer, TokenizerError
from .weights import CheckpointError

TINY = "tiny"
ERRORS = (CheckpointError, ConfigError, TokenizerError, OSError)

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = tuple(DTYPES)
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # older spellings, still accepted
DTYPE_HELP = "weights dtype: auto = bfloat16 on CUDA, float32 on CPU"
DEVICE_CHOICES = ("auto", "cpu", "cuda")  # and cuda:N, checked by resolve_device (argparse cannot list it)
DEVICE_METAVAR = "{auto,cpu,cuda,cuda:N}"
DEVICE_HELP = "auto = cuda when available, else cpu; cuda:N picks one GPU"
QUANTIZE_CHOICES = ("none", "nf4")  # --quantize; "" (the older spelling of none) is still accepted


def quantize_name(text: str) -> str:
    """--quantize's value in QUANTIZE_CHOICES ("" -> "none"); other text as is, for the choices check to refuse."""
    return text or "none"


class LoadError(ValueError):
    """A model, device or dtype that cannot be had: one line, naming the flag (`--model X: ...`)."""


def dtype_name(text: str) -> str:
    """The dtype's name in DTYPE_CHOICES ("bf16" -> "bfloat16"); other text is returned as is, for the caller's
    choices check to refuse. argparse's `type=` for --dtype."""
    return DTYPE_ALIASES.get(text, text)


def resolve_device(name: str) -> torch.device:
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in DEVICE_CHOICES:
        raise LoadError(f"--device {name}: not a device (auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoadError(f"--device {name}: CUDA is not available on this machine")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise LoadError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    name = dtype_name(name or "auto")
    if name not in DTYPES:
        raise LoadError(f"--dtype {name}: choose one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name] or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def resolve(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """--device and --dtype as torch objects: "auto" is cuda when available, and bfloat16 there, float32 on CPU."""
    device = resolve_device(device)
    return device, resolve_dtype(dtype, device)


def load_tokenizer(name: str) -> Tokenizer:
    """The tokenizer that goes with model `name` ("tiny", a folder or a Hub id)."""
    if name == TINY:
        return Tokenizer.tiny()
    return Tokenizer.from_pretrained(name)


def load_model(name: str, dtype: torch.dtype | None = None, device=None, seed: int = 0, quantize: str = "") -> Phi3:
    """The model `name`, in dtype (None: as stored; fp32 for tiny) on device, in eval mode. "tiny" is initialised
    from seed (0 stands for the one "pretrained" tiny model: adapters trained on it load onto it again).
    quantize="nf4": the decoder projections 4-bit (phi3mini/quant.py; a checkpoint's while it is read).
    model.name_or_path is name, as adapters record it."""
    quantize = "" if quantize == "none" else quantize
    if name == TINY:
        model = Phi3.from_name(TINY, seed=seed, dtype=dtype or torch.float32, device=device)
        if quantize:
            from .quant import QUANTIZE_CHOICES, quantize_model  # here: quant imports kernels.nf4, so Triton
            if quantize not in QUANTIZE_CHOICES:
                raise CheckpointError(f"quantize={quantize!r}: choose one of {QUANTIZE_CHOICES}")
            quantize_model(model)
    else:
        model = Phi3.from_pretrained(name, dtype=dtype, device=device, quantize=quantize)
    model.name_or_path = name
    return model.eval()


def open_tokenizer(name: str) -> Tokenizer:
    """load_tokenizer, every failure a LoadError."""
    try:
        return load_tokenizer(name)
    except ERRORS as e:
        raise LoadError(f"--model {name}: {e}") from None


def open_model(name: str, device: torch.device, dtype: torch.dtype, quantize: str = "") -> Phi3:
    """load_model, every failure a LoadError."""
    try:
        return load_model(name, dtype=dtype, device=device, quantize=quantize)
    except ERRORS as e:
        raise LoadError(f"--model {name}: {e}") from None


def load(name: str, device: str = "auto", dtype: str = "auto", quantize: str = "") -> tuple[Phi3, Tokenizer]:
    """What --model, --device, --dtype (and --quantize) ask for: the model in eval mode and its tokenizer. The
    tokenizer is read first, so a folder without one fails before gigabytes of weights load. Raises LoadError."""
    device, dtype = resolve(device, dtype)
    tokenizer = open_tokenizer(name)
    return open_model(name, device, dtype, quantize), tokenizer
