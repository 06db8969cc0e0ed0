"""Triton kernels. Each module holds its kernels, launchers and autograd.Function; kernels/reference.py holds every
op's plain-torch reference (the numerical contract), kernels/_triton.py what the modules share.

The public names are imported here, eagerly: two of them (`lora_linear`, `swiglu`) are also the names of their
modules, and a lazy lookup loses to the submodule once anything imports `kernels.lora_linear` (Python binds the
submodule on the package after loading it). Triton reads TRITON_INTERPRET when a kernel is defined, so set it
before importing `kernels` (or `phi3mini`, which imports it).
"""
from .cross_entropy import fused_linear_cross_entropy
from .lora_linear import lora_linear
from .reference import (apply_rope_reference, fused_linear_cross_entropy_reference, lora_linear_reference,
                        rms_norm_reference, swiglu_reference)
from .rmsnorm import rms_norm
from .rope import apply_rope
from .swiglu import swiglu

__all__ = ["lora_linear", "lora_linear_reference", "rms_norm", "rms_norm_reference", "apply_rope",
           "apply_rope_reference", "swiglu", "swiglu_reference", "fused_linear_cross_entropy",
           "fused_linear_cross_entropy_reference"]
