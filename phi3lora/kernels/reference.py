"""The numerical contract of every kernel, in plain torch: one definition per op.

The model's plain path (phi3mini/model.py) runs these, the Triton launchers fall back to them off CUDA, and the
tests hold the kernels to them. Each reproduces transformers' Phi-3 code, rounding order included (checked bit for
bit in tests/test_kernels_fused.py). This module imports only torch, so the model can import it at start-up.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_reference(x, weight, eps):
    """transformers' Phi3RMSNorm.forward: normalise in fp32, cast to x.dtype, then scale (the order matters in bf16).
    x (..., H), weight (H,) -> (..., H) in promote(weight, x)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x):
    """(..., R) -> cat(-x[R/2:], x[:R/2]): the half-rotation convention (GPT-NeoX / Llama / Phi-3)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q, k, cos, sin):
    """transformers' `apply_rotary_pos_emb` (Phi-3), with cos/sin cast to q.dtype first (a no-op when the model
    built them in its dtype). q (B, Hq, T, D), k (B, Hkv, T, D), cos/sin (B, T, R): only the first R dims rotate."""
    cos = cos.to(q.dtype).unsqueeze(1)  # (B, 1, T, R): broadcast over heads
    sin = sin.to(q.dtype).unsqueeze(1)
    R = cos.shape[-1]

    def rotate(x):
        x_rot, x_pass = x[..., :R], x[..., R:]
        return torch.cat(((x_rot * cos) + (rotate_half(x_rot) * sin), x_pass), dim=-1)

    return rotate(q), rotate(k)


def swiglu_reference(gate_up):
    """transformers' Phi3MLP activation: gate, up = gate_up.chunk(2, -1); up * silu(gate), in the input dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    return up * F.silu(gate)


def cross_entropy_reference(logits, labels, ignore_index=-100, reduction="mean"):
    """The loss of the model's plain path: F.cross_entropy on fp32 logits (N, V) against labels (N,)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction=reduction)


def fused_linear_cross_entropy_reference(hidden, lm_head_weight, labels, ignore_index=-100, reduction="mean"):
    """The unfused contract of the fused loss: cross_entropy_reference(hidden @ Wᵀ), holding all (N, V) logits."""
    H = hidden.shape[-1]
    logits = hidden.reshape(-1, H) @ lm_head_weight.t()                      # (N, V), hidden's dtype
    return cross_entropy_reference(logits, labels.reshape(-1), ignore_index, reduction)


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, lora_x=None):
    """y = x·Wᵀ + scaling·(x_l·Aᵀ)·Bᵀ (+ bias) as peft computes it (three GEMMs and an add); weight is detached
    (frozen). A, B and bias are cast to x's dtype."""
    lx = x if lora_x is None else lora_x
    xa = F.linear(lx, lora_A.to(x.dtype))                                  # (..., R)
    lowrank = F.linear(xa, lora_B.to(x.dtype))                             # (..., N)
    bias = bias.to(x.dtype) if bias is not None else None
    return F.linear(x, weight.detach(), bias) + scaling * lowrank


def gathered_lora_reference(x, lora_A, lora_B, adapter_ids, scaling):
    """Many adapters in one batch (Punica's BGMV): row n uses adapter adapter_ids[n], or none where it is -1.

    x (N, K); lora_A (L, R, K) and lora_B (L, M, R): L adapters, ranks zero-padded to a common R; adapter_ids (N,)
    long in [-1, L); scaling (L,) fp32 (lora_alpha / r of each adapter). Returns the low-rank term only, (N, M) in
    x's dtype: delta[n] = scaling[i] * (x[n] @ A[i]ᵀ) @ B[i]ᵀ with i = adapter_ids[n], and 0 where i == -1. Both
    products accumulate in fp32 (as the Triton kernel does) and the result is rounded once.
    """
    N, M = x.shape[0], lora_B.shape[1]
    out = torch.zeros(N, M, dtype=torch.float32, device=x.device)
    for i in adapter_ids.unique().tolist():  # one pair of GEMMs per adapter present in the batch
        if i < 0:
            continue
        rows = (adapter_ids == i).nonzero().squeeze(-1)                       # (n_i,)
        xa = x[rows].float() @ lora_A[i].float().t()                          # (n_i, R)
        out[rows] = (xa @ lora_B[i].float().t()) * float(scaling[i])          # (n_i, M)
    return out.to(x.dtype)
