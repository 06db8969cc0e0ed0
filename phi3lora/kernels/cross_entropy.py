"""Fused lm_head + cross-entropy: the loss of softmax(hidden·Wᵀ) without ever holding the (N, V) fp32 logits.

For Phi-3-mini (V = 32064) a 4096-token micro-batch has 131M logits: 525 MB in fp32, plus as much again for their
gradient, which is often the peak of a LoRA step. Here (after Liger-Kernel's FusedLinearCrossEntropy,
https://arxiv.org/abs/2410.10989) the rows go through in chunks of C, and the whole backward is done during the
forward, chunk by chunk:

    logits = hidden_c·Wᵀ                        (C, V) in hidden's dtype, one matmul
    Triton, one program per row, in place:      fp32 math; two passes over the row in blocks of BLOCK_V
        lse  = logsumexp(logits)                online max / rescaled sum
        loss = lse − logits[label]
        logits ← scale·(softmax(logits) − onehot(label))     = d loss / d logits, rounded to hidden's dtype
    grad_hidden_c = dlogits·W                   (C, H)
    grad_W       += dlogitsᵀ·hidden_c           (V, H) fp32 accumulator, only when W requires grad (LoRA
                                                freezes lm_head: then neither it nor its matmul exists)

so at most one (C, V) chunk of logits exists at a time (in hidden's dtype) and the backward only scales the stored
gradients by the incoming scalar. Rows whose label is ignore_index give loss 0 and gradient 0.
scale = 1 for reduction="sum", 1/n_valid for "mean" (n_valid = number of labels != ignore_index).

Numerics are the reference's, F.cross_entropy((hidden @ W.T).float(), ...): logits rounded to hidden's dtype by the
matmul, then fp32 softmax; the logits gradient is rounded to hidden's dtype before the two matmuls, as autograd
does through the `.float()`. Differences: summation order, and grad_W accumulates chunk by chunk in fp32.
Deviation: reduction="mean" with every label ignored returns 0 with zero gradients; F.cross_entropy returns nan.

Triton kernel, or a plain-torch version of the same per-chunk step (`_softmax_ce_grad_torch_`, used off CUDA without
the interpreter): the chunked algorithm and its memory saving are the same either way.
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, INTERPRET, device_guard, guarded, kernel_on, rows, tl, triton
from .reference import fused_linear_cross_entropy_reference  # noqa: F401 - the op's contract, exported with it




def _block_v(V):
    """Vocabulary columns per loop step: Phi-3's 32064 are 8 steps per pass. The interpreter (slow per step) gets
    about 8 steps whatever V is, at least 32 wide, so the odd test vocabularies span several ragged blocks."""
    return max(32, triton.next_power_of_2(triton.cdiv(V, 8))) if INTERPRET else 4096


# Vocabulary rows per grad_W update in 16-bit dtypes: bounds the (rows, H) temporary product (25 MB for Phi-3).
_GRAD_W_SLICE = 64 if INTERPRET else 4096


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _softmax_ce_grad_kernel(
        logits_ptr,  # (C, V) one chunk of logits, row stride stride_l, unit column stride; overwritten by dloss/dlogits
        labels_ptr,  # (C,)   integer targets (ignore_index for rows that do not count)
        loss_ptr,    # (C,)   fp32 out: per-row loss, 0 for ignored rows
        V, stride_l, ignore_index,
        scale,       # python float: 1 ("sum") or 1 / n_valid ("mean"), applied to the gradient only
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # one program per row
        row_ptr = logits_ptr + row * stride_l
        label = tl.load(labels_ptr + row)
        dt = logits_ptr.dtype.element_ty

        if label == ignore_index:  # no loss, no gradient
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                tl.store(row_ptr + cols, tl.zeros((BLOCK_V,), dtype=tl.float32).to(dt), mask=cols < V)
            tl.store(loss_ptr + row, 0.0)
            return

        # pass 1: running max m and running Σ exp(x − m), rescaled whenever m grows (online softmax)
        m = float("-inf")
        d = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)  # (BLOCK_V,)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        x_label = tl.load(row_ptr + label).to(tl.float32)
        tl.store(loss_ptr + row, lse - x_label)

        # pass 2: overwrite the row with scale·(softmax − onehot)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
            tl.store(row_ptr + cols, (grad * scale).to(dt), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers: the per-chunk step (Triton or torch) and the chunk loop
# ----------------------------------------------------------------------------------------------------------------

def _softmax_ce_grad_triton_(logits, labels, ignore_index, scale):
    """logits (C, V) unit column stride, overwritten with scale·d loss/d logits; returns per-row loss (C,) fp32."""
    C, V = logits.shape
    loss = torch.empty((C,), dtype=torch.float32, device=logits.device)
    if C:
        # Triton launches on the current CUDA device, not the tensors' one (see _triton.device_guard).
        with device_guard(logits):
            _softmax_ce_grad_kernel[(C,)](logits, labels, loss, V, logits.stride(0), int(ignore_index), float(scale),
                                          BLOCK_V=_block_v(V), num_warps=8)
    return loss


def _softmax_ce_grad_torch_(logits, labels, ignore_index, scale):
    """The same as `_softmax_ce_grad_triton_` in torch (fp32 temporaries of one chunk only)."""
    valid = labels != ignore_index                                            # (C,)
    target = torch.where(valid, labels, torch.zeros_like(labels))             # (C,) ignored rows point at column 0
    x = logits.float()                                                        # (C, V)
    lse = torch.logsumexp(x, dim=-1)                                          # (C,)
    loss = (lse - x.gather(1, target[:, None])[:, 0]) * valid
    grad = torch.exp(x - lse[:, None])                                        # softmax, (C, V)
    grad.scatter_add_(1, target[:, None], -torch.ones_like(grad[:, :1]))      # − onehot
    grad.mul_((valid * scale)[:, None])                                       # ignored rows -> 0
    logits.copy_(grad)
    return loss


CHECK_ROWS = 8  # rows the runtime guard compares with the torch step, the first time the kernel runs on a GPU


def _ce_step(logits, h_c, weight, labels, ignore_index, scale):
    """The per-chunk step: Triton where it runs (guarded: the first chunk on each GPU is compared with the torch
    step; a failure recomputes the chunk's logits and falls back), else torch."""
    def torch_step(n=None):  # on fresh logits of rows [:n], so an interrupted kernel cannot have touched them
        fresh = h_c[:n] @ weight.t()
        loss = _softmax_ce_grad_torch_(fresh, labels[:n], ignore_index, scale)
        return loss, fresh

    def reference():
        loss, fresh = torch_step()
        logits.copy_(fresh)
        return loss

    def check(loss):
        want_loss, want_grad = torch_step(CHECK_ROWS)
        return [(loss[:CHECK_ROWS], want_loss), (logits[:CHECK_ROWS], want_grad)]

    if not kernel_on("fused_ce", logits):
        return _softmax_ce_grad_torch_(logits, labels, ignore_index, scale)
    return guarded("fused_ce", logits, lambda: _softmax_ce_grad_triton_(logits, labels, ignore_index, scale),
                   reference, check)


def _default_chunk_size(N, V, H):
    # Liger's heuristic: chunks of C rows with C·V about N·H, so a chunk of logits is about the size of hidden.
    chunks = max(1, -(-V // H))
    return max(1, 1 << (-(-N // chunks) - 1).bit_length())  # next power of two of N / chunks


def fused_linear_ce_forward(hidden, weight, labels, ignore_index, reduction, chunk_size, need_h, need_w):
    """Loss and the gradients of (hidden (N, H), weight (V, H)) for upstream gradient 1, chunk by chunk."""
    N, H = hidden.shape
    V = weight.shape[0]
    valid = labels != ignore_index
    # one host sync for the label check and the "mean" divisor
    n_valid, n_bad = torch.stack([valid.sum(), (valid & ((labels < 0) | (labels >= V))).sum()]).tolist()
    if n_bad:
        raise ValueError(f"{n_bad} labels are outside [0, {V}) and not ignore_index={ignore_index}")
    scale = 1.0 if reduction == "sum" else 1.0 / max(n_valid, 1)
    C = chunk_size or _default_chunk_size(N, V, H)

    loss_rows = torch.empty((N,), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty((N, H), dtype=hidden.dtype, device=hidden.device) if need_h else None  # (N, H)
    grad_w = torch.zeros((V, H), dtype=torch.float32, device=hidden.device) if need_w else None
    for start in range(0, N, C):
        end = min(start + C, N)
        h_c = hidden[start:end]                                               # (c, H)
        logits = h_c @ weight.t()                                             # (c, V), hidden's dtype
        loss_rows[start:end] = _ce_step(logits, h_c, weight, labels[start:end], ignore_index, scale)  # -> dlogits
        if need_h:
            torch.mm(logits, weight, out=grad_h[start:end])                   # (c, V)·(V, H)
        if need_w:
            if logits.dtype == torch.float32:
                grad_w.addmm_(logits.t(), h_c)                                # (V, c)·(c, H)
            else:  # rounded to hidden's dtype once per chunk, summed in fp32; vocab slices keep the temporary small
                for v0 in range(0, V, _GRAD_W_SLICE):
                    grad_w[v0:v0 + _GRAD_W_SLICE] += logits[:, v0:v0 + _GRAD_W_SLICE].t() @ h_c  # (v, c)·(c, H)
    loss = loss_rows.sum() if reduction == "sum" else loss_rows.sum() * scale
    return loss, grad_h, grad_w


# ----------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------

class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Gradients are computed in the forward; backward scales them by the incoming scalar gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk_size, need_h, need_w):
        loss, grad_h, grad_w = fused_linear_ce_forward(hidden, weight, labels, ignore_index, reduction, chunk_size,
                                                       need_h, need_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, dloss):
        grad_h, grad_w = ctx.saved_tensors
        # not in place: a second backward (retain_graph) must see the stored gradients unscaled
        dh = grad_h * dloss.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * dloss).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------

def fused_linear_cross_entropy(hidden, lm_head_weight, labels, ignore_index=-100, reduction="mean", chunk_size=None):
    """Cross-entropy of softmax(hidden·lm_head_weightᵀ) against labels, in row chunks (no full fp32 logits).

    hidden (..., H), already shifted to line up with labels (...); lm_head_weight (V, H) in hidden's dtype;
    ignore_index rows count for nothing. reduction "sum" (the summed loss over target tokens) or "mean" (divided by
    the number of non-ignored labels; 0, not nan, when there are none). chunk_size: rows per chunk, default about
    N·H/V (a chunk of logits the size of hidden). Returns a 0-dim fp32 loss, differentiable in hidden and, when it
    requires grad, in the weight. The per-chunk softmax runs in Triton on CUDA (or under TRITON_INTERPRET=1),
    else in torch.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    H = hidden.shape[-1]
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != H:
        raise ValueError(f"lm_head_weight {tuple(lm_head_weight.shape)} does not fit hidden {tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not line up with hidden {tuple(hidden.shape)}")
    if lm_head_weight.dtype != hidden.dtype:
        raise ValueError(f"lm_head_weight is {lm_head_weight.dtype} but hidden is {hidden.dtype}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and hidden.requires_grad
    need_w = grad_on and lm_head_weight.requires_grad
    h2 = rows(hidden, H)                                                      # (N, H)
    y = labels.reshape(-1).contiguous()                                       # (N,)
    return FusedLinearCrossEntropyFunction.apply(h2, lm_head_weight, y, int(ignore_index), reduction, chunk_size,
                                                 need_h, need_w)
