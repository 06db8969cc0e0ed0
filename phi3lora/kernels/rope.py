"""Rotary position embedding (https://arxiv.org/abs/2104.09864) for q and k in one Triton launch, forward and backward.

Half-rotation convention (GPT-NeoX / Llama / Phi-3, not GPT-J's interleaved pairs): with R = rotary_dim, h = R/2,
x1 = x[:h], x2 = x[h:R], and rotate_half(x) = cat(-x2, x1),

    out[:h]  = x1·cos[:h] − x2·sin[:h]
    out[h:R] = x2·cos[h:] + x1·sin[h:]
    out[R:]  = x[R:]                                   partial rotary (Phi-4-mini rotates 96 of 128 dims)

cos/sin (B, T, R) already carry any LongRoPE attention factor; they are cast to q.dtype first and every product
and sum is rounded to q.dtype, which is what transformers' `apply_rotary_pos_emb` computes in bf16 (a bf16·bf16
product is exact in fp32, so the rounding is the only difference, and it is reproduced): the kernel should agree
with the reference bit for bit in any dtype.

Backward: the map is linear with a block matrix [[c1, −s1], [s2, c2]] per frequency, so its transpose gives
    dx1 = g1·cos[:h] + g2·sin[h:],   dx2 = g2·cos[h:] − g1·sin[:h]
(the rotation by −θ when the two halves of cos/sin are equal, as RoPE builds them), with the same roundings autograd
does through the reference. cos and sin get no gradient (they come from buffers under no_grad; passing ones that
require grad is an error rather than a silent zero).

One program per (batch, position): it loads that position's cos/sin once and rotates all Hq query heads and Hkv key
heads (GQA: any Hkv) as (heads, h) tiles. q and k may be strided views (B, H, T, D), e.g. the transpose of the qkv
projection's output: only a unit stride over D is required (otherwise they are copied). Outputs are new contiguous
(B, H, T, D) tensors, as the reference's torch.cat returns.
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, device_guard, guarded, kernel_on, reference_vjp, tl, triton
from .reference import apply_rope_reference




# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _rotate_heads(
        x_ptr,   # this (b, t)'s head 0 of x (B, H, T, D): heads stride_h apart, unit stride over D
        o_ptr,   # this (b, t)'s head 0 of the output (B, H, T, D), heads stride_oh apart, unit stride over D
        c1, c2, sa, sb,  # (1, BLOCK_HALF) fp32 coefficients, already rounded to x's dtype
        n_heads, stride_h, stride_oh, HALF, R, D,
        BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    ):
        # o1 = x1·c1 + x2·sa, o2 = x2·c2 + x1·sb, every product and the sum rounded to x's dtype.
        dt = o_ptr.dtype.element_ty
        heads = tl.arange(0, BLOCK_HEADS)[:, None]  # (BLOCK_HEADS, 1)
        cols = tl.arange(0, BLOCK_HALF)[None, :]    # (1, BLOCK_HALF)
        mask = (heads < n_heads) & (cols < HALF)
        x_rows = x_ptr + heads * stride_h           # (BLOCK_HEADS, 1) pointers
        o_rows = o_ptr + heads * stride_oh
        x1 = tl.load(x_rows + cols, mask=mask, other=0.0).to(tl.float32)         # (BLOCK_HEADS, BLOCK_HALF)
        x2 = tl.load(x_rows + HALF + cols, mask=mask, other=0.0).to(tl.float32)
        o1 = (x1 * c1).to(dt).to(tl.float32) + (x2 * sa).to(dt).to(tl.float32)
        o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * sb).to(dt).to(tl.float32)
        tl.store(o_rows + cols, o1.to(dt), mask=mask)
        tl.store(o_rows + HALF + cols, o2.to(dt), mask=mask)
        if BLOCK_PASS > 0:  # dims R..D pass through unchanged
            pcols = R + tl.arange(0, BLOCK_PASS)[None, :]
            pmask = (heads < n_heads) & (pcols < D)
            tl.store(o_rows + pcols, tl.load(x_rows + pcols, mask=pmask, other=0.0), mask=pmask)

    @triton.jit
    def _rope_kernel(
        q_ptr,    # (B, Hq, T, D)  input (or dq_out backward), strides sqb, sqh, sqt, unit over D
        k_ptr,    # (B, Hkv, T, D) input (or dk_out backward), strides skb, skh, skt, unit over D
        qo_ptr,   # (B, Hq, T, D)  output, contiguous
        ko_ptr,   # (B, Hkv, T, D) output, contiguous
        cos_ptr,  # (B, T, R) strides scb (0 when one table serves the batch), sct, unit over R
        sin_ptr,  # (B, T, R) same strides as cos
        T, Hq, Hkv, HALF, R, D,
        sqb, sqh, sqt, skb, skh, skt, scb, sct,
        BACKWARD: tl.constexpr,  # apply the transpose (rotate by −θ)
        BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    ):
        pid = tl.program_id(0)  # one program per (b, t)
        b = (pid // T).to(tl.int64)
        t = (pid % T).to(tl.int64)
        dt = qo_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK_HALF)[None, :]  # (1, BLOCK_HALF)
        cmask = cols < HALF
        c_row = b * scb + t * sct
        # transformers casts cos/sin to the activations' dtype before use
        c1 = tl.load(cos_ptr + c_row + cols, mask=cmask, other=0.0).to(dt).to(tl.float32)
        c2 = tl.load(cos_ptr + c_row + HALF + cols, mask=cmask, other=0.0).to(dt).to(tl.float32)
        s1 = tl.load(sin_ptr + c_row + cols, mask=cmask, other=0.0).to(dt).to(tl.float32)
        s2 = tl.load(sin_ptr + c_row + HALF + cols, mask=cmask, other=0.0).to(dt).to(tl.float32)
        if BACKWARD:  # transpose of [[c1, -s1], [s2, c2]]
            sa = s2
            sb = -s1
        else:
            sa = -s1
            sb = s2
        # contiguous outputs: (b, head, t) of (B, H, T, D) sits at ((b·H + head)·T + t)·D
        _rotate_heads(q_ptr + b * sqb + t * sqt, qo_ptr + (b * Hq * T + t) * D, c1, c2, sa, sb,
                      Hq, sqh, T * D, HALF, R, D, BLOCK_HQ, BLOCK_HALF, BLOCK_PASS)
        _rotate_heads(k_ptr + b * skb + t * skt, ko_ptr + (b * Hkv * T + t) * D, c1, c2, sa, sb,
                      Hkv, skh, T * D, HALF, R, D, BLOCK_HKV, BLOCK_HALF, BLOCK_PASS)


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------

CHECK_POSITIONS = 4  # positions the runtime guard compares with the reference, the first time on a GPU


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def rope_launch(q, k, cos, sin, backward=False):
    """Rotate q (B, Hq, T, D) and k (B, Hkv, T, D) by cos/sin (B, T, R) (by −θ when backward).

    q, k: any strides with a unit stride over D. cos, sin: (B or 1, T, R). Returns new contiguous tensors.
    """
    q, k, cos, sin = _unit_last(q), _unit_last(k), _unit_last(cos), _unit_last(sin)
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    R = cos.shape[-1]
    cos = cos.expand(B, T, R)  # a batch of 1 broadcasts with stride 0
    sin = sin.expand(B, T, R)
    assert cos.stride() == sin.stride(), "cos and sin must share a layout"
    qo = torch.empty((B, Hq, T, D), dtype=q.dtype, device=q.device)
    ko = torch.empty((B, Hkv, T, D), dtype=k.dtype, device=k.device)
    if B * T == 0:
        return qo, ko
    # Triton launches on the current CUDA device, not the tensors' one (see _triton.device_guard).
    with device_guard(q):
        _rope_kernel[(B * T,)](
            q, k, qo, ko, cos, sin,
            T, Hq, Hkv, R // 2, R, D,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            cos.stride(0), cos.stride(1),
            BACKWARD=backward,
            BLOCK_HQ=triton.next_power_of_2(Hq), BLOCK_HKV=triton.next_power_of_2(Hkv),
            BLOCK_HALF=triton.next_power_of_2(R // 2),
            BLOCK_PASS=triton.next_power_of_2(D - R) if D > R else 0,
            num_warps=4,
        )
    return qo, ko


# ----------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------

class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rope_launch(q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors

        def reference(n=None):  # positions [:n] (all when None): the map is linear, so zeros stand in for q, k
            dq_n, dk_n = dq_out[:, :, :n], dk_out[:, :, :n]
            return tuple(reference_vjp(apply_rope_reference, (torch.zeros_like(dq_n), torch.zeros_like(dk_n),
                                                              cos[:, :n], sin[:, :n]),
                                       (True, True, False, False), (dq_n, dk_n))[:2])

        def check(got):
            want = reference(CHECK_POSITIONS)
            return [(got[0][:, :, :CHECK_POSITIONS], want[0]), (got[1][:, :, :CHECK_POSITIONS], want[1])]

        dq, dk = guarded("rope", dq_out, lambda: rope_launch(dq_out, dk_out, cos, sin, backward=True), reference,
                         check, stage="backward")
        need_q, need_k, _, _ = ctx.needs_input_grad
        return (dq if need_q else None), (dk if need_k else None), None, None


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------

def _check(q, k, cos, sin):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (B, H, T, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if k.shape[0] != B or k.shape[2:] != (T, D) or Hkv == 0 or Hq % Hkv:
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)} (same B, T, D; Hkv dividing Hq)")
    if q.dtype != k.dtype:
        raise ValueError(f"q is {q.dtype} but k is {k.dtype}")
    R = cos.shape[-1]
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, B) or cos.shape[1] != T:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be (B or 1, T, R) "
                         f"for q {tuple(q.shape)}")
    if R % 2 or R > D or R == 0:
        raise ValueError(f"rotary_dim {R} must be even, positive and at most head_dim {D}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("apply_rope gives cos and sin no gradient; detach them (RoPE tables are buffers)")


def apply_rope(q, k, cos, sin):
    """Rotate queries and keys with RoPE (half-rotation convention, partial rotary, GQA).

    q (B, Hq, T, D), k (B, Hkv, T, D) with Hkv dividing Hq, any strides with a unit stride over D; cos, sin
    (B or 1, T, R) with R ≤ D even, cast to q.dtype. Only the first R dims of each head rotate. Returns
    (q_rot, k_rot), new contiguous tensors in q's dtype; differentiable in q and k. Runs the Triton kernel on CUDA
    tensors (or anywhere under TRITON_INTERPRET=1), else `apply_rope_reference`.
    """
    _check(q, k, cos, sin)
    if not kernel_on("rope", q):
        return apply_rope_reference(q, k, cos, sin)

    def check(out):
        n = CHECK_POSITIONS
        want = apply_rope_reference(q[:, :, :n], k[:, :, :n], cos[:, :n], sin[:, :n])
        return [(out[0][:, :, :n], want[0]), (out[1][:, :, :n], want[1])]

    return guarded("rope", q, lambda: RoPEFunction.apply(q, k, cos, sin),
                   lambda: apply_rope_reference(q, k, cos, sin), check)
