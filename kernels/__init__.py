"""Triton kernels. Each module holds its kernels, launchers, autograd.Function and a pure-torch reference."""
from .lora_linear import expand_merged_B, lora_linear, lora_linear_reference  # noqa: F401
from .rmsnorm import rms_norm, rms_norm_reference  # noqa: F401
from .rope import apply_rope, apply_rope_reference  # noqa: F401
from .swiglu import swiglu, swiglu_reference  # noqa: F401
from .cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference  # noqa: F401
