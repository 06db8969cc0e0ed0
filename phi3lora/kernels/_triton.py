"""What every kernel module shares: the optional Triton import, the interpreter flag, the one dispatch test
("does this tensor go through Triton?"), the (M, width) row view, the CUDA device guard, and the runtime guard
(`guarded`: the first run of each kernel on each GPU is compared with its torch reference on a small slice; a
failure warns once and that kernel runs in torch for the rest of the process).

Kernel modules import `triton` and `tl` from here and define their @triton.jit kernels under `if HAS_TRITON:`.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: every op runs its torch reference
    triton = tl = None
    HAS_TRITON = False

# The interpreter runs kernels on the CPU, one program at a time with numpy. Read at import, as @triton.jit reads
# it when decorating: set TRITON_INTERPRET=1 before the first kernel module is imported, which is when a kernel is
# first used (`import phi3lora.phi3mini` imports none; tests/conftest.py sets it before importing anything).
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


# ----------------------------------------------------------------------------------------------------------------
# Runtime guard: a kernel that fails to compile or computes something else than its reference on this GPU warns
# once and falls back to torch for the rest of the process, so a user's training goes on.
# ----------------------------------------------------------------------------------------------------------------

class KernelMismatch(RuntimeError):
    """A kernel's result on a small slice differs from its torch reference's."""


FAILED: dict[str, str] = {}              # kernel name -> why it fell back (torch for the rest of the process)
CHECKED: set[tuple[str, str]] = set()    # (kernel, device) pairs whose first run was compared with the reference
CHECK_ON_CPU = False                     # tests set it to exercise the guard under the interpreter
# relative error (Frobenius) allowed between a kernel's slice and the reference's: compiled rounding (approximate
# exp/sqrt, fma contraction, summation order) moves ulps; a wrong kernel is off by O(1)
_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def strict() -> bool:
    """PHI3LORA_STRICT_KERNELS=1: a kernel failure raises instead of warning (GPU tests and benchmarks set it)."""
    return os.environ.get("PHI3LORA_STRICT_KERNELS") == "1"


def kernel_on(name: str, t: torch.Tensor) -> bool:
    """use_triton(t), unless this kernel already failed in this process."""
    return use_triton(t) and name not in FAILED


def mismatch(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """None when got is want up to the rounding its dtype allows; else what differs."""
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)}, reference {tuple(want.shape)}"
    got, want = got.detach().double(), want.detach().double()
    if not torch.equal(torch.isfinite(got), torch.isfinite(want)):
        return "non-finite values where the reference has finite ones (or the reverse)"
    ok = torch.isfinite(want)
    err = float((got[ok] - want[ok]).norm() / want[ok].norm().clamp_min(1e-30))
    tol = _TOLERANCE.get(want.dtype, _TOLERANCE.get(got.dtype, 2e-2))
    return f"relative error {err:.3g} > {tol:g}" if err > tol else None


def _fail(name: str, device, error: BaseException) -> None:
    message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    if strict():
        raise RuntimeError(f"Triton kernel {name} failed on {device}: {message} "
                           "(PHI3LORA_STRICT_KERNELS=1; unset it to fall back to torch instead)") from error
    if name not in FAILED:
        FAILED[name] = message
        warnings.warn(f"Triton kernel {name} failed on {device} and is switched off for this process; the torch "
                      f"reference runs instead (slower, same results). Error: {message}", RuntimeWarning,
                      stacklevel=3)


def _first_run(name: str, t: torch.Tensor) -> bool:
    if not (t.is_cuda or CHECK_ON_CPU):
        return False
    key = (name, str(t.device))  # name: "rmsnorm" (forward) or "rmsnorm backward", each checked once
    if key in CHECKED:
        return False
    CHECKED.add(key)
    return True


def guarded(name, t, run_kernel, run_reference, check_slices, stage=""):
    """run_kernel() -> result; the first time per (kernel, stage, device), check_slices(result) yields (got, want)
    pairs (a slice of the result and the reference on the same slice of the inputs) that must agree. A compile
    error, launch error or mismatch: one warning, the kernel is off for the process (forward and backward), and
    run_reference() is returned (PHI3LORA_STRICT_KERNELS=1: raise). Out-of-memory is not the kernel's fault: it
    propagates. stage: "" for the forward, "backward" for the backward launch."""
    try:
        result = run_kernel()
        if _first_run(f"{name} {stage}".strip(), t):
            for got, want in check_slices(result):
                why = mismatch(got, want)
                if why:
                    raise KernelMismatch(f"differs from its torch reference on a slice: {why}")
        return result
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of the kernel: compile, launch, numbers
        _fail(name, t.device, error)
        return run_reference()


if HAS_TRITON:
    @triton.jit
    def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(pid_m, pid_n) of program `pid` over a (M, N) output in (BLOCK_M, BLOCK_N) tiles, in grouped order:
        GROUP_M row-blocks sweep the columns together, so the column tiles they share stay in L2."""
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        first_pid_m = (pid // num_pid_in_group) * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
        pid_n = (pid % num_pid_in_group) // group_size_m
        return pid_m, pid_n
else:
    grouped_tile = None


if hasattr(torch, "compiler") and hasattr(torch.compiler, "disable"):
    guarded = torch.compiler.disable(guarded)  # Python-side state: run eagerly, never traced into a graph


def reference_vjp(fn, inputs, needs, cotangents):
    """Gradients of fn(*inputs) for the inputs whose `needs` flag is set (None for the others), by autograd
    through the torch reference: the backward a failed kernel falls back to, and what a backward is checked
    against. cotangents: one tensor per output of fn (a tensor or a tuple)."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(bool(n)) if t is not None else None for t, n in zip(inputs, needs)]
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        cots = cotangents if isinstance(cotangents, tuple) else (cotangents,)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(outs, wanted, cots, allow_unused=True)) if wanted else iter(())
    return [next(grads) if t is not None and t.requires_grad else None for t in leaves]
