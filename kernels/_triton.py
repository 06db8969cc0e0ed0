"""What every kernel module shares: the optional Triton import, the interpreter flag, the one dispatch test
("does this tensor go through Triton?"), the (M, width) row view and the CUDA device guard.

Kernel modules import `triton` and `tl` from here and define their @triton.jit kernels under `if HAS_TRITON:`.
"""
from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: every op runs its torch reference
    triton = tl = None
    HAS_TRITON = False

# The interpreter runs kernels on the CPU, one program at a time with numpy. Read at import, as @triton.jit reads
# it when decorating: set TRITON_INTERPRET=1 before anything imports `kernels` (tests/conftest.py does).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# PHI3LORA_NO_TRITON=1: every op runs its torch reference in this process, whatever the modules' use_kernel says.
# Read once at import (like TRITON_INTERPRET), not per call.
DISABLED = os.environ.get("PHI3LORA_NO_TRITON") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on t runs its Triton kernel: on CUDA tensors, or anywhere under the interpreter."""
    return HAS_TRITON and not DISABLED and (t.is_cuda or INTERPRET)


def rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """(..., width) -> (M, width) with a unit column stride (a copy only when the last dim is strided)."""
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def device_guard(t: torch.Tensor):
    """Make t's CUDA device current while a kernel launches; a no-op off CUDA (the interpreter on the CPU).

    Triton launches on the *current* device and stream, not on the tensors' device: without this, tensors on
    cuda:1 (e.g. train.py --device cuda:1, which never calls set_device) would be read by a kernel running on
    cuda:0. torch.cuda.device rather than torch.cuda.device_of: torch.compile traces the former and graph-breaks
    on the latter.
    """
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
