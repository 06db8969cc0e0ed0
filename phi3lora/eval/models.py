"""Loading what an evaluation scores: a model (`hub.load`: "tiny", a folder or a Hub id) and, optionally, a LoRA
adapter (ours or a PEFT folder, `lora.load_adapter`), as chat.py loads them. Every failure is one EvalError line
naming the flag; an adapter trained on other base weights loads with the AdapterWarning line chat.py prints."""
from __future__ import annotations


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
    """lora's load_adapter_for_cli (as chat.py loads adapters), its failure an EvalError."""
    from phi3lora import lora

    try:
        lora.load_adapter_for_cli(model, adapter_dir, merge=merge, stderr=stderr)
    except lora.AdapterError as e:
        raise EvalError(str(e)) from None
