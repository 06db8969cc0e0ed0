"""LoRA on a 4-bit NF4 base (QLoRA, https://arxiv.org/abs/2305.14314): the frozen weight stays NF4, A and B train.

    h = x·dequant(W4)ᵀ + s·dropout(x)·Aᵀ·Bᵀ

With use_dora the norm ‖dequant(W4) + s·B·A‖ needs the dense weight, so DoRA layers dequantize in forward (as
peft does for a bitsandbytes base) and run the torch DoRA path of layers.py.

`Linear4bitLoRA` / `MergedLinear4bitLoRA` are lora.Linear / lora.MergedLinear (same parameters, state-dict keys,
adapter files, LayerSpec) whose weight is a phi3mini.quant.Linear4bit's NF4 codes; lora.inject builds them when the
targeted module is a Linear4bit. Their forward is kernels.nf4_lora (the W tiles decoded inside the fused GEMM) on
CUDA, and the dense dequant + torch elsewhere.

Merging cannot fold ΔW into 4-bit codes without quantizing W + ΔW again (which loses most of the adapter: peft
#2321). `merge_4bit` instead replaces each 4-bit layer by a dense one holding dequant(W4) in fp32, folds s·B·A in
fp32 and rounds once to the model's dtype, with a warning: the adapter was trained against dequant(W4), so the
merged model reproduces the 4-bit model + adapter, not the original full-precision base + adapter.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from phi3lora.phi3mini.quant import Linear4bit, NF4Weight

from .layers import Linear, MergedLinear


class _LoRA4bit(NF4Weight):
    """The 4-bit parts of a LoRA linear layer: taking the base's NF4 state, forward, and no in-place merge."""

    def take_4bit(self, base: Linear4bit) -> None:
        self.set_tensors(base.nf4_tensors(), where=type(base).__name__)

    def _B(self) -> torch.Tensor:
        return self.lora_B

    def _dense_weight(self, dtype) -> torch.Tensor:
        return self.dequantized(dtype)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from phi3lora.kernels.nf4_lora import nf4_lora_linear, nf4_lora_linear_reference

        if self.has_lora and self.use_dora:  # DoRA's norm needs the dense W: dequantize (peft does the same)
            return self._dora(x, self.dequantized(x.dtype), self._B().to(x.dtype))

        fn = nf4_lora_linear if self.use_kernel else nf4_lora_linear_reference
        tensors = self.nf4_tensors()
        if not self.has_lora:
            no_lora = x.new_zeros(0, self.in_features), x.new_zeros(self.out_features, 0)
            return fn(x, tensors, self.bias, *no_lora, 1.0, **({"meta": self.nf4_meta} if self.use_kernel else {}))
        lx = self.lora_dropout(x)
        kw = {"meta": self.nf4_meta} if self.use_kernel else {}
        return fn(x, tensors, self.bias, self.lora_A, self._B(), self.scaling, lora_x=None if lx is x else lx, **kw)

    def _fold(self, sign: float) -> None:
        raise ValueError(f"{type(self).__name__}: a 4-bit weight cannot take the adapter in place (that would "
                         "quantize W + ΔW again); lora.merge(model) replaces 4-bit layers by dense merged ones")

    def dense_layer(self, dtype: torch.dtype) -> nn.Module:
        """The plain LoRA layer with dequant(W4) in fp32 and this layer's own A, B (and bias) Parameters."""
        plain = Linear if isinstance(self, Linear) else MergedLinear
        with torch.device("meta"):
            kw = dict(r=self.r, lora_alpha=self.lora_alpha, merge_weights=False, use_rslora=self.use_rslora,
                      bias=self.bias is not None, use_dora=self.use_dora)
            if plain is MergedLinear:
                kw.update(enable_lora=self.enable_lora, slice_sizes=self.slice_sizes)
            new = plain(self.in_features, self.out_features, **kw)
        new.weight = nn.Parameter(self.dequantized(torch.float32), requires_grad=False)
        new.bias = self.bias
        if self.has_lora:
            new.lora_A, new.lora_B = self.lora_A, self.lora_B
            if self.use_dora:
                new.lora_magnitude_vector = self.lora_magnitude_vector
            new._build_buffers(self.weight.device)
        new.lora_dropout = self.lora_dropout
        return new.train(self.training)


class Linear4bitLoRA(_LoRA4bit, Linear):
    """lora.Linear over an NF4 weight."""


class MergedLinear4bitLoRA(_LoRA4bit, MergedLinear):
    """lora.MergedLinear (one adapter per enabled slice of a fused qkv) over an NF4 weight."""

    def _B(self) -> torch.Tensor:
        return self.full_B()


def merge_4bit(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace every 4-bit layer (with or without an adapter) by a dense one: dequant(W4) in fp32, the adapter
    folded in fp32, rounded once to dtype (default: the embedding's dtype, i.e. the model's). Returns how many."""
    if dtype is None:
        emb = next((m.weight for m in model.modules() if isinstance(m, nn.Embedding)), None)
        dtype = emb.dtype if emb is not None and emb.is_floating_point() else torch.bfloat16
    names = [n for n, m in model.named_modules() if isinstance(m, (Linear4bit, _LoRA4bit))]
    if not names:
        return 0
    warnings.warn(f"merging into a 4-bit base: {len(names)} layers become dense dequant(W4) + s·B·A (fp32, rounded "
                  f"once to {str(dtype).removeprefix('torch.')}). The adapter was trained against dequant(W4), so "
                  "the merged model reproduces the 4-bit model + adapter, not the original base + adapter",
                  stacklevel=2)
    with torch.no_grad():
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            old = getattr(parent, child)
            if isinstance(old, _LoRA4bit):
                new = old.dense_layer(dtype)
                new.merge()                                   # fp32 weight + fp32 delta
                new.weight = nn.Parameter(new.weight.to(dtype), requires_grad=False)  # the one rounding
            else:
                new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
                new.weight = nn.Parameter(old.dequantized(dtype), requires_grad=False)
                new.bias = old.bias
            setattr(parent, child, new)
    return len(names)
