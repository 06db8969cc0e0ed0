"""RMSNorm (https://arxiv.org/abs/1910.07467) as Phi-3 computes it, forward and backward in Triton.

    n = (x_f32 · rsqrt(mean(x_f32²) + eps)).to(x.dtype)          normalise in fp32, round to the input dtype
    y = weight · n                                                then scale; y.dtype = promote(weight, x)

This is transformers' Phi3RMSNorm exactly, rounding order included: in bf16 the normalised row is rounded to bf16
before the multiply, and the product is rounded once more (a bf16·bf16 product is exact in fp32, so computing it in
fp32 and rounding on the store is what torch does). On the GPU the forward should match the reference bit for bit
up to rsqrt and summation-order differences of ~1 fp32 ulp, which only rarely move a bf16 rounding.

Backward (x̂ = x·rstd, g = dy·weight, both fp32):
    dx      = rstd · (g − x̂ · mean(g · x̂))                       per row, stored in x.dtype
    dweight = Σ_rows dy · n                                       fp32 partial sums per program, then torch.sum
Deviation from autograd through the reference: g = dy·weight stays fp32 here (autograd rounds it to the output
dtype first) and dweight accumulates in fp32 (autograd rounds each dy·n product in bf16). Both are more accurate;
in fp32 they are the same math.

Layers, bottom up: the two @triton.jit kernels, the launchers `rms_norm_forward` / `rms_norm_backward`, the
autograd.Function and the public `rms_norm`; `rms_norm_reference` (kernels/reference.py) is the numerical contract.
x may have any leading dimensions and any hidden size H (a row lives in one block of next_power_of_2(H) lanes).
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, INTERPRET, device_guard, guarded, kernel_on, reference_vjp, rows, tl, triton
from .reference import rms_norm_reference




# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _rms_norm_fwd_kernel(
        x_ptr,     # (M, H) input rows, row stride stride_x, unit column stride
        w_ptr,     # (H,)   weight
        y_ptr,     # (M, H) output in promote(weight, x) dtype, row stride stride_y
        rstd_ptr,  # (M,)   fp32 out: 1 / sqrt(mean(x²) + eps), kept for the backward
        H, stride_x, stride_y, eps,
        BLOCK_H: tl.constexpr,  # next_power_of_2(H): the whole row in one block
    ):
        row = tl.program_id(0).to(tl.int64)  # one program per row
        cols = tl.arange(0, BLOCK_H)
        mask = cols < H
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_H,)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
        # transformers rounds the normalised row to the input dtype before the weight multiply
        n = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_y + cols, (n * w).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(
        dy_ptr,    # (M, H) upstream gradient, row stride stride_dy, unit column stride
        x_ptr,     # (M, H) forward input, row stride stride_x
        w_ptr,     # (H,)   weight
        rstd_ptr,  # (M,)   fp32 from the forward
        dx_ptr,    # (M, H) out, x.dtype, row stride stride_dx
        dw_ptr,    # (P, H) out, fp32: this program's partial Σ dy·n over its rows (read only when HAS_DW)
        M, H, stride_dy, stride_x, stride_dx, rows_per_program,
        HAS_DW: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_H)
        mask = cols < H
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        row_start = pid * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, M)
        first = row_start.to(tl.int64)  # 64-bit offsets: M·H can pass 2³¹
        dy_ptr += first * stride_dy
        x_ptr += first * stride_x
        dx_ptr += first * stride_dx
        for row in range(row_start, row_end):  # the pointers walk down one row per iteration
            x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            xhat = x * rstd
            g = dy * w                                        # d loss / d n (the rounding cast passes it through)
            dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / H))
            tl.store(dx_ptr + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if HAS_DW:
                dw_acc += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)  # dy · n, n rounded as forward
            dy_ptr += stride_dy
            x_ptr += stride_x
            dx_ptr += stride_dx
        if HAS_DW:
            tl.store(dw_ptr + pid * H + cols, dw_acc, mask=mask)


CHECK_ROWS = 8  # rows the runtime guard compares with the reference, the first time the kernel runs on a GPU


def _num_warps(block):
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

def rms_norm_forward(x2, weight, eps):
    """x2 (M, H) with unit column stride, weight (H,) -> y (M, H) in promote(weight, x) dtype, rstd (M,) fp32."""
    M, H = x2.shape
    y = torch.empty((M, H), dtype=torch.promote_types(x2.dtype, weight.dtype), device=x2.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x2.device)
    if M == 0:
        return y, rstd
    # Triton launches on the current CUDA device, not the tensors' one (see _triton.device_guard).
    block = triton.next_power_of_2(H)
    with device_guard(x2):
        _rms_norm_fwd_kernel[(M,)](x2, weight, y, rstd, H, x2.stride(0), y.stride(0), float(eps),
                                   BLOCK_H=block, num_warps=_num_warps(block))
    return y, rstd


def rms_norm_backward(dy2, x2, weight, rstd, need_dw):
    """dy2, x2 (M, H) with unit column strides -> dx (M, H) in x.dtype, dweight (H,) in weight.dtype or None."""
    M, H = x2.shape
    dx = torch.empty((M, H), dtype=x2.dtype, device=x2.device)
    if M == 0:
        return dx, torch.zeros_like(weight) if need_dw else None
    # A few programs per SM, each looping over a run of rows, so the (P, H) fp32 partials for dweight stay small.
    # The interpreter gets 4 programs: ragged runs of rows are exercised, and it has no SMs to fill.
    sms = 2 if INTERPRET else torch.cuda.get_device_properties(x2.device).multi_processor_count
    programs = min(M, 2 * sms)
    rows_per_program = triton.cdiv(M, programs)
    programs = triton.cdiv(M, rows_per_program)
    partial = torch.empty((programs, H), dtype=torch.float32, device=x2.device) if need_dw else dx  # dx: unread
    block = triton.next_power_of_2(H)
    with device_guard(x2):  # see rms_norm_forward
        _rms_norm_bwd_kernel[(programs,)](dy2, x2, weight, rstd, dx, partial, M, H,
                                          dy2.stride(0), x2.stride(0), dx.stride(0), rows_per_program,
                                          HAS_DW=need_dw, BLOCK_H=block, num_warps=_num_warps(block))
    dw = partial.sum(0).to(weight.dtype) if need_dw else None
    return dx, dw


# ----------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------

class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        H = x.shape[-1]
        weight = weight.contiguous()  # both kernels read w_ptr + cols: unit stride assumed (no-op for a Parameter)
        x2 = rows(x, H)                                     # (M, H)
        y2, rstd = rms_norm_forward(x2, weight, eps)         # (M, H), (M,)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        ctx.eps = eps
        return y2.reshape(*x.shape[:-1], H)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        need_x, need_w, _ = ctx.needs_input_grad
        dy2 = rows(dy, x2.shape[1])                                                # (M, H)

        def reference(n=None):  # the rows [:n] (all when None) through autograd of the reference
            dx, dw = reference_vjp(lambda a, w: rms_norm_reference(a, w, ctx.eps), (x2[:n], weight),
                                   (True, need_w), dy2[:n].to(torch.promote_types(x2.dtype, weight.dtype)))
            return dx.to(x2.dtype), (dw.to(weight.dtype) if dw is not None else None)

        dx, dw = guarded("rmsnorm", dy, lambda: rms_norm_backward(dy2, x2, weight, rstd, need_w), reference,
                         lambda got: [(got[0][:CHECK_ROWS], reference(CHECK_ROWS)[0])], stage="backward")
        return (dx.reshape(ctx.x_shape) if need_x else None), dw, None


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------

def rms_norm(x, weight, eps):
    """Phi-3's RMSNorm: weight · (x · rsqrt(mean(x²) + eps) in fp32, cast to x.dtype).

    x (..., H), weight (H,), eps a python float. Returns (..., H) in torch.promote_types(weight.dtype, x.dtype),
    as transformers does. Differentiable in x and weight (Triton backward). Runs the Triton kernels on CUDA
    tensors (or anywhere under TRITON_INTERPRET=1), else `rms_norm_reference`.
    """
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, x has {x.shape[-1]} features")
    if not kernel_on("rmsnorm", x):
        return rms_norm_reference(x, weight, eps)
    H = x.shape[-1]
    return guarded("rmsnorm", x, lambda: RMSNormFunction.apply(x, weight, float(eps)),
                   lambda: rms_norm_reference(x, weight, eps),
                   lambda y: [(rows(y, H)[:CHECK_ROWS], rms_norm_reference(rows(x, H)[:CHECK_ROWS], weight, eps))])
