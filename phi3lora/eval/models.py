"""Loading what an evaluation scores: a model (`hub.load`: "tiny", a folder or a Hub id) and, optionally, a LoRA
adapter (ours or a PEFT folder, `lora.load_adapter`), as chat.py loads them. Every failure is one EvalError line
naming the flag; an adapter trained on other base weights loads with the AdapterWarning line chat.py prints."""
from __future__ import annotations

import sys
import warnings

from phi3lora import console
from phi3lora.phi3mini import Phi3, Tokenizer, hub


class EvalError(ValueError):
    """A problem the user can fix: printed as `error: ...` by the command line, exit code 2."""


def load(model: str, adapter: str | None = None, device: str = "auto", dtype: str = "auto", quantize: str = "none",
         merge: bool = False, stderr=None) -> tuple[Phi3, Tokenizer]:
    """The model in eval mode with the adapter in it (merged if asked) and its tokenizer. Raises EvalError."""
    try:
        net, tokenizer = hub.load(model, device, dtype, hub.quantize_name(quantize))
    except hub.LoadError as e:
        raise EvalError(str(e)) from None
    if adapter:
        load_adapter(net, adapter, merge=merge, stderr=stderr)
    return net.eval(), tokenizer


def load_adapter(model: Phi3, adapter_dir: str, merge: bool = False, stderr=None) -> None:
    from phi3lora import lora

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", lora.AdapterWarning)
            lora.load_adapter(model, adapter_dir)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, OSError) as e:
        raise EvalError(f"--adapter {adapter_dir}: {e}") from None
    for w in caught:  # trained on another base: one plain line, not Python's warning format
        if issubclass(w.category, lora.AdapterWarning):
            console.warn(str(w.message), file=stderr or sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if merge:
        lora.merge(model)
