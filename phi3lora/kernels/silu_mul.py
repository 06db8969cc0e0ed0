"""SwiGLU (https://arxiv.org/abs/2002.05202) over Phi-3's fused gate_up projection, forward and backward in Triton.

    gate, up = gate_up.chunk(2, -1)          the FIRST half is the gate (checkpoint rows are [gate | up])
    a = silu(gate) = gate / (1 + exp(−gate))  fp32 in the kernel, rounded to the input dtype
    h = up · a                                 rounded to the input dtype

Rounding: transformers computes `up_states * self.activation_fn(gate)` in the input dtype, i.e. in bf16 silu is
evaluated in fp32 and rounded to bf16 (torch's opmath), then the bf16·bf16 product is rounded once more. The kernel
rounds at the same two places, so it reproduces the reference except where an fp32 exp that differs by an ulp
from torch's moves a rounding: rare, and then by one ulp of the input dtype. The tests hold the kernel to that
(fp16 under the interpreter, bf16 on the GPU: at most one ulp apart anywhere, and almost everywhere identical);
in fp32 they agree to ~1e-6.

Backward, with the same roundings autograd does through the reference (σ = sigmoid(gate) in fp32):
    d_up   = dh · a                                         rounded to the input dtype
    da     = dh · up                                        rounded to the input dtype
    d_gate = da · σ · (1 + gate · (1 − σ))                  torch's silu_backward formula, rounded once
d(gate_up) = cat(d_gate, d_up) is a new (..., 2I) tensor (not written over gate_up, which other code may hold).

Layers, bottom up: the @triton.jit kernels, the launchers `swiglu_forward` / `swiglu_backward`, the
autograd.Function and the public `swiglu`; `swiglu_reference` (kernels/reference.py) is the numerical contract.
The module is named for what its kernels compute, silu(gate)·up, not for `swiglu`: a submodule named like a public
function would replace that function on the package once imported (kernels/__init__.py).
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, INTERPRET, device_guard, guarded, kernel_on, reference_vjp, rows, tl, triton
from .reference import swiglu_reference




CHECK_ROWS = 8  # rows the runtime guard compares with the reference, the first time the kernel runs on a GPU


def _block(I):
    """Columns per program: a Phi-3 row (I = 8192) is 8 programs on the GPU. The interpreter (slow per program)
    gets about 4 per row, at least 32 wide, so the odd test widths span a ragged last block."""
    return max(32, triton.next_power_of_2(triton.cdiv(I, 4))) if INTERPRET else 1024


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _swiglu_fwd_kernel(
        gu_ptr,  # (M, 2I) gate_up rows [gate | up], row stride stride_gu, unit column stride
        h_ptr,   # (M, I)  output in gate_up's dtype, row stride stride_h
        I, stride_gu, stride_h,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)       # grid (M, cdiv(I, BLOCK))
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < I
        dt = h_ptr.dtype.element_ty
        gate_ptrs = gu_ptr + row * stride_gu + cols  # (BLOCK,)
        g = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gate_ptrs + I, mask=mask, other=0.0).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)  # silu in fp32, rounded as torch's F.silu does
        tl.store(h_ptr + row * stride_h + cols, (u * a).to(dt), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(
        dh_ptr,   # (M, I)  upstream gradient, row stride stride_dh, unit column stride
        gu_ptr,   # (M, 2I) forward input [gate | up], row stride stride_gu
        dgu_ptr,  # (M, 2I) out: [d_gate | d_up] in gate_up's dtype, row stride stride_dgu
        I, stride_dh, stride_gu, stride_dgu,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < I
        dt = dgu_ptr.dtype.element_ty
        gate_ptrs = gu_ptr + row * stride_gu + cols
        g = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gate_ptrs + I, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-g))
        a = (g * sig).to(dt).to(tl.float32)         # silu(gate) as the forward rounded it
        d_up = dh * a
        da = (dh * u).to(dt).to(tl.float32)
        d_gate = da * sig * (1.0 + g * (1.0 - sig))
        dgate_ptrs = dgu_ptr + row * stride_dgu + cols
        tl.store(dgate_ptrs, d_gate.to(dt), mask=mask)
        tl.store(dgate_ptrs + I, d_up.to(dt), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

def swiglu_forward(gu2):
    """gu2 (M, 2I) with a unit column stride -> h (M, I) in its dtype."""
    M, I2 = gu2.shape
    I = I2 // 2
    h = torch.empty((M, I), dtype=gu2.dtype, device=gu2.device)
    if M * I:
        block = _block(I)
        # Triton launches on the current CUDA device, not the tensors' one (see _triton.device_guard).
        with device_guard(gu2):
            _swiglu_fwd_kernel[(M, triton.cdiv(I, block))](gu2, h, I, gu2.stride(0), h.stride(0), BLOCK=block,
                                                           num_warps=4)
    return h


def swiglu_backward(dh2, gu2):
    """dh2 (M, I), gu2 (M, 2I), unit column strides -> d(gate_up) (M, 2I) in gu2's dtype."""
    M, I2 = gu2.shape
    I = I2 // 2
    dgu = torch.empty((M, I2), dtype=gu2.dtype, device=gu2.device)
    if M * I:
        block = _block(I)
        with device_guard(gu2):  # see swiglu_forward
            _swiglu_bwd_kernel[(M, triton.cdiv(I, block))](dh2, gu2, dgu, I, dh2.stride(0), gu2.stride(0),
                                                           dgu.stride(0), BLOCK=block, num_warps=4)
    return dgu


# ----------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------

class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        I2 = gate_up.shape[-1]
        gu2 = rows(gate_up, I2)                 # (M, 2I)
        h2 = swiglu_forward(gu2)                 # (M, I)
        ctx.save_for_backward(gu2)
        ctx.shape = gate_up.shape
        return h2.reshape(*gate_up.shape[:-1], I2 // 2)

    @staticmethod
    def backward(ctx, dh):
        (gu2,) = ctx.saved_tensors
        dh2 = rows(dh, gu2.shape[1] // 2)                                        # (M, I)

        def reference(n=None):  # rows [:n] (all when None) through autograd of the reference
            return reference_vjp(swiglu_reference, (gu2[:n],), (True,), dh2[:n])[0]

        dgu = guarded("swiglu", dh, lambda: swiglu_backward(dh2, gu2), reference,
                      lambda got: [(got[:CHECK_ROWS], reference(CHECK_ROWS))], stage="backward")  # (M, 2I)
        return dgu.reshape(ctx.shape)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------

def swiglu(gate_up):
    """Phi-3's MLP activation: gate, up = gate_up.chunk(2, -1); returns up · silu(gate).

    gate_up (..., 2I) -> (..., I) in gate_up's dtype; differentiable (Triton backward gives d(gate_up)). Runs the
    Triton kernels on CUDA tensors (or anywhere under TRITON_INTERPRET=1), else `swiglu_reference`.
    """
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even ([gate | up]), got {gate_up.shape[-1]}")
    if not kernel_on("swiglu", gate_up):
        return swiglu_reference(gate_up)
    width = gate_up.shape[-1]
    return guarded("swiglu", gate_up, lambda: SwiGLUFunction.apply(gate_up), lambda: swiglu_reference(gate_up),
                   lambda h: [(rows(h, width // 2)[:CHECK_ROWS], swiglu_reference(rows(gate_up, width)[:CHECK_ROWS]))])
