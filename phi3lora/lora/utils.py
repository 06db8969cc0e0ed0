"""loralib's two helpers, same semantics and keys: which parameters train, and which tensors an adapter saves."""
from __future__ import annotations

import torch
from torch import nn

from .layers import LoRALayer

BIAS_MODES = ("none", "all", "lora_only")


def _check_bias(bias: str) -> None:
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze every parameter whose name lacks "lora_"; then bias="all" unfreezes every parameter with "bias" in
    its name, bias="lora_only" the `bias` of each LoRA layer."""
    _check_bias(bias)
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.requires_grad = False
    if bias == "all":
        for name, p in model.named_parameters():
            if "bias" in name:
                p.requires_grad = True
    elif bias == "lora_only":
        for m in model.modules():
            if isinstance(m, LoRALayer) and getattr(m, "bias", None) is not None:
                m.bias.requires_grad = True


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The entries of model.state_dict() an adapter consists of: keys with "lora_", plus keys with "bias"
    (bias="all") or the bias next to each LoRA tensor (bias="lora_only")."""
    _check_bias(bias)
    state = model.state_dict()
    if bias == "none":
        return {k: v for k, v in state.items() if "lora_" in k}
    if bias == "all":
        return {k: v for k, v in state.items() if "lora_" in k or "bias" in k}
    out = {}
    for k, v in state.items():
        if "lora_" in k:
            out[k] = v
            bias_name = k.split("lora_")[0] + "bias"  # "x.lora_A" -> "x.bias"
            if bias_name in state:
                out[bias_name] = state[bias_name]
    return out
