"""The device guard every launcher wraps its Triton launch in."""
from __future__ import annotations

import contextlib

import torch


def device_guard(t: torch.Tensor):
    """Make t's CUDA device current while a kernel launches; a no-op off CUDA (the interpreter on the CPU).

    Triton launches on the *current* device and stream, not on the tensors' device: without this, tensors on
    cuda:1 (e.g. train.py --device cuda:1, which never calls set_device) would be read by a kernel running on
    cuda:0. torch.cuda.device rather than torch.cuda.device_of: torch.compile traces the former and graph-breaks
    on the latter.
    """
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
