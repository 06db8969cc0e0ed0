"""Triton kernels. Each module holds its kernels, launchers and autograd.Function; kernels/reference.py holds every
op's plain-torch reference (the numerical contract), kernels/_triton.py what the modules share.

The public names below resolve on first access (module `__getattr__`, PEP 562), so importing the package, or
kernels.reference as phi3mini does, never imports Triton: a kernel module, and Triton with it, is imported when
its op is first looked up. No module is named like a public function (lora_linear lives in lora_matmul.py, swiglu
in silu_mul.py): Python binds an imported submodule on its package, which would shadow the function.
Triton reads TRITON_INTERPRET when a kernel is defined, i.e. when its module is first imported: set it before the
first kernel is used (tests/conftest.py sets it before importing anything).
"""
import importlib

# public name -> the module that defines it
_WHERE = {
    "lora_linear": "lora_matmul",
    "rms_norm": "rmsnorm",
    "apply_rope": "rope",
    "swiglu": "silu_mul",
    "fused_linear_cross_entropy": "cross_entropy",
    "lora_linear_reference": "reference",
    "rms_norm_reference": "reference",
    "apply_rope_reference": "reference",
    "swiglu_reference": "reference",
    "fused_linear_cross_entropy_reference": "reference",
    "gathered_lora": "lora_gather",
    "gathered_lora_reference": "reference",
}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:  # AttributeError lets `from phi3lora.kernels import nf4` fall back to the submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
