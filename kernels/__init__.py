"""Triton kernels. Each module holds its kernels, launchers and autograd.Function; kernels/reference.py holds every
op's plain-torch reference (the numerical contract), kernels/_triton.py what the modules share.

The names below load lazily (PEP 562): `import kernels.reference` (the model does, at start-up) imports torch
only, and TRITON_INTERPRET may still be set before the first kernel module is imported.
"""
import importlib

_EXPORTS = {
    "lora_linear": "lora_linear", "lora_linear_reference": "reference",
    "rms_norm": "rmsnorm", "rms_norm_reference": "reference",
    "apply_rope": "rope", "apply_rope_reference": "reference",
    "swiglu": "swiglu", "swiglu_reference": "reference",
    "fused_linear_cross_entropy": "cross_entropy", "fused_linear_cross_entropy_reference": "reference",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value
