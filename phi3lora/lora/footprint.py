"""LoRA's footprint on a model: how large each adapter is (‖s·B·A‖, Frobenius and spectral, per adapted module,
without building ΔW), the model with its adapters switched off, and the change in next-token log-probabilities
the adapter causes (base and adapted in one call). probe.py draws them; training/tracking.py logs the norms.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .inject import lora_layers


@dataclass
class AdapterNorm:
    """‖s·B·A‖ of one adapted module: Frobenius (overall size) and spectral (largest stretch of any direction)."""
    name: str
    layer: int | None  # the block index, None outside the blocks (embeddings, lm_head)
    rank: int
    frobenius: float
    spectral: float


def _low_rank_factors(m) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (m, r'), A (r', n)) with ΔW/s = B·A as a matrix (up to a transpose or a reshape, which keep both norms)."""
    cd = torch.promote_types(m.lora_A.dtype, torch.float32)
    B = m.full_B(cd) if hasattr(m, "full_B") else m.lora_B.to(cd)  # MergedLinear: block rows of every slice
    return B, m.lora_A.to(cd)


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


@torch.no_grad()
def adapter_norms(model: nn.Module) -> list[AdapterNorm]:
    """‖s·B·A‖ for every module with an adapter, in module order, without ever building ΔW: with B = Q_B·R_B and
    Aᵀ = Q_A·R_A (thin QR), B·A = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ has the norms of the small r×r matrix R_B·R_Aᵀ."""
    out = []
    for name, m in lora_layers(model):
        if not m.has_lora:
            continue
        B, A = _low_rank_factors(m)
        small = torch.linalg.qr(B).R @ torch.linalg.qr(A.T).R.T  # (r', r')
        s = abs(m.scaling)
        out.append(AdapterNorm(name, _layer_index(name), m.r, s * torch.linalg.matrix_norm(small).item(),
                               s * torch.linalg.matrix_norm(small, ord=2).item()))
    return out


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes its base outputs: every adapter's scale s is 0 (merged layers are
    unmerged first, and merged again on exit: in bf16 that round trip can move a weight by a rounding step).
    DoRA's rescaling is off too (m/‖·‖ is not 1 once m has trained), and a PiSSA / OLoRA layer, whose weight is the
    residual W − s·B₀·A₀, runs its initial B₀, A₀ instead of the trained ones, which gives W back.
    Biases trained with the adapter (bias="all" / "lora_only") stay as trained."""
    layers = [m for _, m in lora_layers(model) if m.has_lora]
    if not layers:
        raise ValueError("the model has no LoRA adapter to switch off")
    saved = [(m, m.scaling, m.merged, getattr(m, "use_dora", False), m.lora_A.data, m.lora_B.data) for m in layers]
    try:
        for m in layers:
            m.unmerge()  # with the real scale: subtracts exactly what merge added
            if getattr(m, "use_dora", False):
                m.use_dora = False
            if "lora_A_init" in m._buffers:
                m.lora_A.data, m.lora_B.data = m.lora_A_init.to(m.lora_A.dtype), m.lora_B_init.to(m.lora_B.dtype)
            else:
                m.scaling = 0.0
        yield model
    finally:
        for m, scaling, merged, dora, A, B in saved:
            m.scaling = scaling
            if dora:
                m.use_dora = True
            m.lora_A.data, m.lora_B.data = A, B
            if merged:
                m.merge()


@dataclass
class AdapterEffect:
    """Base vs adapted on one input. Position t is the prediction of token t+1."""
    base_logprobs: torch.Tensor  # (B, T-1): log p_base(input_ids[t+1] | input_ids[:t+1])
    adapted_logprobs: torch.Tensor  # (B, T-1)
    kl: torch.Tensor  # (B, T): KL(adapted ‖ base) of the next-token distributions, in nats
    max_logit_change: torch.Tensor  # (B, T): max over the vocabulary of |adapted - base| logits
    base_top: torch.Tensor  # (B, T): argmax next token without the adapter
    adapted_top: torch.Tensor  # (B, T): with it

    @property
    def logprob_change(self) -> torch.Tensor:
        return self.adapted_logprobs - self.base_logprobs


@torch.no_grad()
def adapter_effect(model: nn.Module, input_ids: torch.Tensor, **forward_kw) -> AdapterEffect:
    """Run input_ids (B, T) with the adapter and without it (same weights, same call) and compare."""
    adapted = model(input_ids, **forward_kw).float()  # (B, T, vocab)
    with adapter_disabled(model):
        base = model(input_ids, **forward_kw).float()
    lp_a, lp_b = adapted.log_softmax(-1), base.log_softmax(-1)
    target = input_ids[:, 1:, None]  # (B, T-1, 1)
    kl = (lp_a.exp() * (lp_a - lp_b)).sum(-1)
    return AdapterEffect(lp_b[:, :-1].gather(-1, target)[..., 0], lp_a[:, :-1].gather(-1, target)[..., 0], kl,
                         (adapted - base).abs().amax(-1), base.argmax(-1), adapted.argmax(-1))
