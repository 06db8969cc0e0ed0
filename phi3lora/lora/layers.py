"""LoRA layers with the API of microsoft/LoRA's loralib 0.1.2 (https://github.com/microsoft/LoRA).

    h = x·W₀ᵀ + s·dropout(x)·Aᵀ·Bᵀ,   A (r, in), B (out, r), s = lora_alpha / r     (https://arxiv.org/abs/2106.09685)

Same as loralib: class names, constructor signatures and defaults (r=0, lora_alpha=1, lora_dropout=0,
merge_weights=True), bare `lora_A` / `lora_B` parameters (so state-dict keys and `mark_only_lora_as_trainable`
match), initialisation (Linear, MergedLinear, Conv: A Kaiming-uniform a=sqrt(5), B zeros; Embedding: A zeros,
B normal), the pretrained weight frozen when r > 0, `fan_in_fan_out`, dropout on the low-rank path only, and
eval() merging ΔW into the weight / train() taking it out again when merge_weights, tracked by `merged`.

Deliberate differences:
- MergedLinear takes `slice_sizes` (unequal slices, e.g. q, k, v under grouped-query attention; default: equal
  slices as loralib), and its forward never builds ΔW: x·Aᵀ once, then each enabled slice's B on its own rows.
  With no enabled slice (or r=0) it is a plain linear layer (loralib fails in forward).
- `use_rslora` on every layer: s = lora_alpha / sqrt(r) (rsLoRA, https://arxiv.org/abs/2312.03732).
- Merging computes s·ΔW in fp32 (fp64 for an fp64 weight) and rounds once into the weight's dtype; unmerging
  subtracts the same fp32 delta. (loralib adds B·A in the weight's dtype: bf16 merges drift, peft #1388.)
- Explicit `merge()` / `unmerge()` methods, which work whatever merge_weights says; `train()` returns self.
- MergedLinear's `lora_ind` is a non-persistent buffer, so it follows `.to(device)` (loralib's does not).
- No dropout is `nn.Identity` rather than a lambda, so layers pickle.
- A and B are cast to the input's dtype in forward, so fp32 adapters run on a bf16 model without autocast.
- On CUDA, Linear and MergedLinear run `kernels.lora_linear` (the low-rank term fused into the base GEMM) unless
  their `use_kernel` is False (`model.set_kernels(lora_linear=False)`; PHI3LORA_NO_TRITON=1 for every kernel),
  the weight is being trained, or autocast asks for another dtype than the input's; elsewhere plain torch.
- Conv1d / Conv3d size A as (r·k, in·k^(d-1)) so that B·A has the weight's size for any kernel size k (loralib's
  only work for k=1); Conv2d is loralib's exactly. As in loralib, conv layers ignore lora_dropout.
- Invalid arguments raise ValueError / TypeError (loralib: assert, NotImplementedError).

Additions with peft's names and meanings (peft 0.21, peft/tuners/lora/{layer,dora}.py):
- `use_dora` on Linear, MergedLinear and Embedding (DoRA, https://arxiv.org/abs/2402.09353): a trainable magnitude
  `lora_magnitude_vector` (out,), initialised to ‖W + s·B·A‖ per output row, and
      h = m/‖W + s·B·A‖ · (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b            (the norm detached, as the paper's section 4.3 and peft)
  On MergedLinear the norm is per output row of the fused weight (the ΔW of a disabled slice is zero there), so it
  equals peft's DoRA on transformers' fused qkv_proj. With dropout active in training peft scales the base
  term of the dropped input: h = x·Wᵀ + b + (m/‖·‖ − 1)·dropout(x)·Wᵀ + m/‖·‖·s·dropout(x)·Aᵀ·Bᵀ; so do we.
  An Embedding, as in peft, has one magnitude per embedding dimension: the norm of each column of W (num, dim).
  DoRA runs in plain torch, never the fused kernel: the norm needs every row of W + s·B·A (a full (out, in)
  matrix) before the first output tile can be scaled, which a GEMM epilogue over output tiles does not have.
- `init_lora_weights`: "kaiming" (True: loralib's), "gaussian" (A ~ N(0, 1/r²), B = 0), and the base-changing
  "pissa", "pissa_niter_K" (B·A = the top-r singular part of W, randomized SVD with K iterations) and "olora"
  (B·A from the QR decomposition of W): the weight becomes the residual W − s·B₀·A₀, so the output is unchanged.
  B₀, A₀ are kept (non-persistent buffers lora_B_init, lora_A_init) for the export onto the original base.
"""
from __future__ import annotations

import math
import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn


def _use_triton(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # The kernel computes in x's dtype, which must be the weight's, and never gives the weight a gradient. So plain
    # torch runs when autocast asks for another dtype (the kernel would skip autocast's cast: fp32 GEMMs under bf16
    # autocast) and when the weight is being trained (the kernel would silently leave its gradient None). The
    # layer's own switch (use_kernel) is checked by the caller; PHI3LORA_NO_TRITON by kernels.lora_linear.
    return (x.is_cuda and x.dtype == weight.dtype
            and not (weight.requires_grad and torch.is_grad_enabled())
            and not (torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") != x.dtype))


INITS = ("kaiming", "gaussian", "pissa", "olora")  # and "pissa_niter_K"
BASE_CHANGING = ("pissa", "olora")  # inits after which the layer's weight is the residual W − s·B₀·A₀


def check_init(init) -> str:
    """peft's init_lora_weights value -> ours: True is "kaiming"; "gaussian", "pissa", "pissa_niter_K", "olora"."""
    if init is True or (isinstance(init, str) and init.lower() == "true"):
        return "kaiming"
    if isinstance(init, str):
        low = init.lower()
        if low in INITS or re.fullmatch(r"pissa_niter_[1-9]\d*", low):
            return low
    raise ValueError(f"init_lora_weights must be True/'kaiming', 'gaussian', 'pissa', 'pissa_niter_K' (K >= 1) "
                     f"or 'olora', got {init!r}")


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 for an fp64 weight: the precision merges are computed in."""
    return torch.promote_types(weight.dtype, torch.float32)


def expand_merged_B(lora_B, slice_sizes, enable_lora, r):
    """loralib MergedLinear's per-slice adapters as one B_full (sum(slice_sizes), r·n_enabled), differentiable.

    The output rows split into slices of `slice_sizes` (unequal allowed, e.g. q, k, v under GQA); slice i has an
    adapter when enable_lora[i]. lora_B (sum of enabled slice sizes, r) stacks the enabled slices' B blocks and
    lora_A (r·n_enabled, K) their A blocks, so with B_full block-structured (enabled slice e's rows hold its B in
    columns [e·r, (e+1)·r), disabled slices are zero rows)
        x·Wᵀ + s·(x·Aᵀ)·B_fullᵀ
    is exactly MergedLinear (loralib builds B_full·A with a grouped conv1d and scatters it into the enabled rows).
    """
    if len(slice_sizes) != len(enable_lora):
        raise ValueError(f"{len(slice_sizes)} slice sizes but {len(enable_lora)} enable_lora flags")
    enabled_sizes = [size for size, on in zip(slice_sizes, enable_lora) if on]
    n_enabled = len(enabled_sizes)
    if tuple(lora_B.shape) != (sum(enabled_sizes), r):
        raise ValueError(f"lora_B has shape {tuple(lora_B.shape)}, expected ({sum(enabled_sizes)}, {r}) "
                         f"for slices {list(slice_sizes)} with enable_lora {list(enable_lora)}")
    if n_enabled == 0:
        return lora_B.new_zeros(sum(slice_sizes), 0)
    # block_diag puts enabled slice e's rows against columns [e·r, (e+1)·r): (sum(enabled_sizes), r·n_enabled)
    blocks = torch.block_diag(*lora_B.split(enabled_sizes, 0)).split(enabled_sizes, 0)
    blocks = iter(blocks)
    rows = [next(blocks) if on else lora_B.new_zeros(size, r * n_enabled)
            for size, on in zip(slice_sizes, enable_lora)]
    return torch.cat(rows, 0)                                             # (sum(slice_sizes), r·n_enabled)


class LoRALayer:
    """State shared by every LoRA layer (a mixin, as in loralib: the nn.Module comes from the other base)."""

    def __init__(self, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool, use_rslora: bool = False):
        if isinstance(r, bool) or int(r) != r or r < 0:
            raise ValueError(f"r must be a non-negative integer, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        self.r = int(r)
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.merged = False
        self.merge_weights = merge_weights
        self.scaling = (lora_alpha / (math.sqrt(r) if use_rslora else r)) if r > 0 else 0.0

    # --- hooks each layer provides ---
    def _base_weight(self) -> nn.Parameter:
        return self.weight

    def delta_weight(self) -> torch.Tensor:
        """s·ΔW in the merge precision (fp32), shaped like the stored weight."""
        raise NotImplementedError

    def reset_lora_parameters(self) -> None:
        # A as nn.Linear initialises its weight, B zero: the layer starts as the pretrained one (Embedding differs)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def has_lora(self) -> bool:
        return self.r > 0 and hasattr(self, "lora_A")

    # --- merging ---
    @torch.no_grad()
    def merge(self) -> None:
        """Fold s·B·A into the weight (fp32 sum, one rounding to the weight's dtype); no-op if already merged."""
        if not self.merged:
            if self.has_lora:
                self._fold(+1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take s·B·A out of the weight again; no-op if not merged."""
        if self.merged:
            if self.has_lora:
                self._fold(-1.0)
            self.merged = False

    def _fold(self, sign: float) -> None:
        w = self._base_weight()
        delta = self.delta_weight()
        if getattr(self, "use_dora", False):
            return self._fold_dora(sign, w, delta)
        if w.dtype == delta.dtype:
            w.add_(delta, alpha=sign)
        else:
            w.copy_(w.to(delta.dtype).add_(delta, alpha=sign))  # copy_ rounds to nearest, once

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like the stored weight, viewed with DoRA's magnitude axis first: (out, in) for a linear
        layer, (dim, num) for an embedding (peft normalises an embedding per column)."""
        raise NotImplementedError

    def _fold_dora(self, sign: float, w: torch.Tensor, delta: torch.Tensor) -> None:
        # peft's DoRA merge: W' = m/‖W + s·B·A‖ · (W + s·B·A) row by row (fp32); unmerging divides by the factor
        # of the merge (the norm kept from then: W' alone no longer gives it) and takes s·B·A out again
        cd = delta.dtype
        W, D = self._rows(w.to(cd)), self._rows(delta)
        if sign > 0:
            self._merged_norm = torch.linalg.vector_norm(W + D, dim=1)  # (rows,)
            new = (self.lora_magnitude_vector.to(cd) / self._merged_norm).view(-1, 1) * (W + D)
        else:
            new = W / (self.lora_magnitude_vector.to(cd) / self._merged_norm).view(-1, 1) - D
        w.copy_(self._rows(new))

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """m = ‖W + s·B·A‖ per output row (peft's DoRA init), so the layer starts as W + s·B·A."""
        w = self._base_weight()
        cd = _compute_dtype(w) if w.is_floating_point() else torch.float32
        full = self._rows(self._dense_weight(cd) + self.delta_weight().to(cd))
        self.lora_magnitude_vector.copy_(torch.linalg.vector_norm(full, dim=1))

    def _dense_weight(self, dtype) -> torch.Tensor:
        """The weight as stored, in dtype (a 4-bit layer dequantizes, giving (out, in))."""
        return self._base_weight().to(dtype)

    def _merge_for_mode(self, mode: bool) -> None:
        # loralib's train(): eval merges, train unmerges, only when merge_weights
        if self.merge_weights:
            self.unmerge() if mode else self.merge()
        elif mode and self.merged and self.has_lora and self.lora_A.requires_grad:
            # merged explicitly (lora.merge): the forward pass skips A and B, so training would leave them untouched
            warnings.warn(f"{type(self).__name__} is merged, so training does not reach its LoRA weights: call "
                          "lora.unmerge(model) before training", stacklevel=3)

    # --- building without touching the pretrained weight (used by lora.inject) ---
    def _materialize_lora(self, device, dtype) -> None:
        """Give lora_A / lora_B fresh storage on device in dtype (the layer was built on the meta device) and
        initialise them; rebuild index buffers."""
        for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
            p = getattr(self, name, None)
            if p is not None:
                setattr(self, name, nn.Parameter(torch.empty(p.shape, device=device, dtype=dtype)))
        if self.has_lora:
            self.reset_lora_parameters()
        self._build_buffers(device)

    def _build_buffers(self, device) -> None:
        pass


class Embedding(nn.Embedding, LoRALayer):
    """nn.Embedding + LoRA: ΔW = (B·A)ᵀ, A (r, num_embeddings) zeros, B (embedding_dim, r) normal; no dropout."""

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 0, lora_alpha: float = 1,
                 merge_weights: bool = True, use_rslora: bool = False, use_dora: bool = False, **kwargs):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=0.0, merge_weights=merge_weights,
                           use_rslora=use_rslora)
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, num_embeddings)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((embedding_dim, r)))
            self.weight.requires_grad = False
        self.reset_parameters()
        if not isinstance(use_dora, bool):
            raise TypeError(f"use_dora must be a bool, got {use_dora!r}")
        self.use_dora = use_dora and self.has_lora
        if self.use_dora:  # one magnitude per embedding dimension (peft normalises an embedding per column)
            self.lora_magnitude_vector = nn.Parameter(self.weight.new_zeros(embedding_dim))
            if not self.weight.is_meta:
                self.reset_magnitude()

    def reset_parameters(self):
        nn.Embedding.reset_parameters(self)
        if hasattr(self, "lora_A"):
            self.reset_lora_parameters()

    def reset_lora_parameters(self):
        nn.init.zeros_(self.lora_A)
        nn.init.normal_(self.lora_B)
        if getattr(self, "use_dora", False):
            self.reset_magnitude()

    def _rows(self, t):
        return t.transpose(0, 1)  # (dim, num)

    def delta_weight(self):
        cd = _compute_dtype(self.weight)
        return (self.lora_B.to(cd) @ self.lora_A.to(cd)).transpose(0, 1) * self.scaling  # (num, dim)

    def train(self, mode: bool = True):
        nn.Embedding.train(self, mode)
        self._merge_for_mode(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = nn.Embedding.forward(self, x)  # (..., dim)
        if not self.has_lora or self.merged:
            return result
        A, B = self.lora_A.to(result.dtype), self.lora_B.to(result.dtype)
        # rows of Aᵀ (num, r) looked up like the embedding itself
        after_A = F.embedding(x, A.transpose(0, 1), self.padding_idx, self.max_norm, self.norm_type,
                              self.scale_grad_by_freq, self.sparse)  # (..., r)
        lora = (after_A @ B.transpose(0, 1)) * self.scaling  # (..., dim)
        if not self.use_dora:
            return result + lora
        with torch.no_grad():  # DoRA (peft's DoraEmbeddingLayer): the norm of each column of W + s·(B·A)ᵀ, detached
            norm = torch.linalg.vector_norm(self.weight.to(result.dtype) + self.scaling * (B @ A).transpose(0, 1),
                                            dim=0)  # (dim,)
        return self.lora_magnitude_vector.to(result.dtype) / norm * (result + lora)


class _LinearLoRA(nn.Linear, LoRALayer):
    """What Linear and MergedLinear share: a weight matrix (out, in), stored (in, out) when fan_in_fan_out."""

    kernel = "lora_linear"  # the fused Triton GEMM on CUDA (see _use_triton); Phi3.set_kernels switches it
    use_kernel = True       # a class default, so layers built or unpickled without __init__ have it too

    use_dora = False
    init_lora_weights = "kaiming"

    def reset_parameters(self):
        nn.Linear.reset_parameters(self)
        if hasattr(self, "lora_A"):
            self.reset_lora_parameters()

    def _T(self, w):
        return w.transpose(0, 1) if self.fan_in_fan_out else w

    def train(self, mode: bool = True):
        nn.Linear.train(self, mode)
        self._merge_for_mode(mode)
        return self

    # --- DoRA and the peft initialisations (module docstring) ---
    def _set_variants(self, use_dora: bool, init_lora_weights) -> None:
        """Called by __init__ once the weight has its final layout: the magnitude vector, then the chosen init."""
        self.init_lora_weights = check_init(init_lora_weights)
        if not isinstance(use_dora, bool):
            raise TypeError(f"use_dora must be a bool, got {use_dora!r}")
        self.use_dora = use_dora and self.has_lora
        if self.use_dora:
            self.lora_magnitude_vector = nn.Parameter(self.weight.new_zeros(self.out_features))
        if self.has_lora and (self.use_dora or self.init_lora_weights != "kaiming") and not self.weight.is_meta:
            self.reset_lora_parameters()

    def reset_lora_parameters(self):
        init = self.init_lora_weights
        if init == "gaussian":  # peft: A ~ N(0, 1/r²), B = 0
            nn.init.normal_(self.lora_A, std=1 / self.r)
            nn.init.zeros_(self.lora_B)
        elif init.startswith(BASE_CHANGING):
            self._init_from_weight(init)
        else:
            LoRALayer.reset_lora_parameters(self)
        if self.use_dora:
            self.reset_magnitude()

    @torch.no_grad()
    def _init_from_weight(self, init: str) -> None:
        """PiSSA / OLoRA (peft's pissa_init / olora_init): B₀·A₀ from W in fp32, the weight becomes
        W − s·B₀·A₀ (rounded once to its dtype). A second call first puts s·B₀·A₀ back."""
        if isinstance(self, MergedLinear):
            raise ValueError(f"init_lora_weights={init!r} needs one adapter over the whole weight, not per slice "
                             "(lora.inject gives a fused qkv_proj a Linear adapter for it)")
        if self.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16) or hasattr(self, "nf4_tensors"):
            raise TypeError(f"init_lora_weights={init!r} needs a float32/float16/bfloat16 weight, not "
                            f"{'4-bit NF4' if hasattr(self, 'nf4_tensors') else self.weight.dtype} (as in peft: "
                            "initialise on the full-precision base, then quantize the residual)")
        s, r = self.scaling, self.r
        W = self._T(self.weight).to(torch.float32)  # (out, in)
        if "lora_A_init" in self._buffers:
            W = W + s * (self.lora_B_init @ self.lora_A_init)
        if init == "olora":
            Q, R = torch.linalg.qr(W)  # Q (out, k), R (k, in)
            B0, A0 = Q[:, :r].contiguous(), R[:r].contiguous()
        else:
            if init == "pissa":
                V, S, Uh = torch.linalg.svd(W, full_matrices=False)  # W = V·diag(S)·Uh
                Vr, Sr, Uhr = V[:, :r], S[:r] / s, Uh[:r]
            else:  # pissa_niter_K: randomized SVD; its random draws from a fixed seed, so a reload finds the same
                with torch.random.fork_rng(devices=[W.device] if W.is_cuda else []):
                    torch.manual_seed(0)
                    Vr, Sr, Ur = torch.svd_lowrank(W, r, niter=int(init.rsplit("_", 1)[1]))
                Sr, Uhr = Sr / s, Ur.t()
            A0 = torch.diag(torch.sqrt(Sr)) @ Uhr  # (r, in)
            B0 = Vr @ torch.diag(torch.sqrt(Sr))   # (out, r)
        # A and B in fp32 at least, as peft sets them: rounding the principal part s·B₀·A₀ to bf16 would move the
        # model away from the base by far more than the residual's own rounding
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        self.lora_A.data, self.lora_B.data = A0.to(dtype).clone(), B0.to(dtype).clone()
        self.register_buffer("lora_A_init", A0, persistent=False)
        self.register_buffer("lora_B_init", B0, persistent=False)
        self.weight.copy_(self._T(W - s * (B0 @ A0)))

    def _dora(self, x: torch.Tensor, weight: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """DoRA's output, weight (out, in) and B (out, rank) in x's dtype (peft's DoraLinearLayer.forward)."""
        A = self.lora_A.to(x.dtype)
        with torch.no_grad():  # the norm is a constant for autograd (DoRA section 4.3)
            norm = torch.linalg.vector_norm(weight + self.scaling * (B @ A), dim=1)  # (out,)
        scale = self.lora_magnitude_vector.to(x.dtype) / norm  # (out,)
        lx = self.lora_dropout(x)
        lora = F.linear(F.linear(lx, A) * self.scaling, B)  # (..., out)
        base = F.linear(x, weight)
        if lx is x:  # eval, or no dropout: m/‖·‖ · (x·Wᵀ + s·x·Aᵀ·Bᵀ)
            out = scale * (base + lora)
        else:  # peft rescales the base term of the dropped input
            out = base + (scale - 1) * F.linear(lx, weight) + scale * lora
        return out if self.bias is None else out + self.bias

    def _rows(self, t):
        return self._T(t)  # (out, in)


class Linear(_LinearLoRA):
    """nn.Linear + LoRA: y = x·Wᵀ + b + s·dropout(x)·Aᵀ·Bᵀ; A (r, in), B (out, r).

    fan_in_fan_out=True: the weight is stored (in, out), as GPT-2's Conv1D does."""

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, merge_weights: bool = True,
                 use_rslora: bool = False, use_dora: bool = False, init_lora_weights=True, **kwargs):
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           merge_weights=merge_weights, use_rslora=use_rslora)
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((out_features, r)))
            self.weight.requires_grad = False
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)
        self._set_variants(use_dora, init_lora_weights)

    def delta_weight(self):
        cd = _compute_dtype(self.weight)
        return self._T(self.lora_B.to(cd) @ self.lora_A.to(cd)) * self.scaling  # like the stored weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._T(self.weight)  # (out, in)
        if not self.has_lora or self.merged:
            return F.linear(x, weight, self.bias)
        if self.use_dora:
            return self._dora(x, weight, self.lora_B.to(x.dtype))
        lx = self.lora_dropout(x)  # the low-rank path's input; the base path always sees x
        if self.use_kernel and _use_triton(x, weight):
            from phi3lora.kernels.lora_matmul import lora_linear
            return lora_linear(x, weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                               lora_x=None if lx is x else lx)
        result = F.linear(x, weight, self.bias)  # (..., out)
        xa = F.linear(lx, self.lora_A.to(x.dtype)) * self.scaling  # (..., r): scale the thin product, not (..., out)
        return result.add_(F.linear(xa, self.lora_B.to(x.dtype)))  # in place: linear's backward needs no output


class MergedLinear(_LinearLoRA):
    """A fused projection (qkv, gate_up) whose output rows split into slices, each with its own rank-r adapter
    when enable_lora[i] is true.

    lora_A (r·n_enabled, in) stacks the enabled slices' A blocks, lora_B (rows of the enabled slices, r) their B
    blocks, in slice order (loralib's layout). `slice_sizes` (our addition) gives unequal slices, e.g.
    [heads·d, kv_heads·d, kv_heads·d]; None splits out_features equally into len(enable_lora) slices.
    Forward computes xa = dropout(x)·Aᵀ (…, r·n_enabled) once and adds s·xa_e·B_eᵀ to each enabled slice's
    columns: ΔW (out, in) is never built."""

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, enable_lora=(False,), fan_in_fan_out: bool = False,
                 merge_weights: bool = True, slice_sizes=None, use_rslora: bool = False, use_dora: bool = False,
                 init_lora_weights=True, **kwargs):
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           merge_weights=merge_weights, use_rslora=use_rslora)
        enable_lora = [bool(e) for e in enable_lora]
        if not enable_lora:
            raise ValueError("enable_lora needs at least one entry")
        if slice_sizes is None:
            if out_features % len(enable_lora):
                raise ValueError(f"The length of enable_lora ({len(enable_lora)}) must divide out_features "
                                 f"({out_features}); pass slice_sizes for unequal slices")
            slice_sizes = [out_features // len(enable_lora)] * len(enable_lora)
        slice_sizes = [int(s) for s in slice_sizes]
        if len(slice_sizes) != len(enable_lora) or sum(slice_sizes) != out_features or min(slice_sizes) <= 0:
            raise ValueError(f"slice_sizes {slice_sizes} must be {len(enable_lora)} positive sizes (one per "
                             f"enable_lora entry) summing to out_features {out_features}")
        self.enable_lora = enable_lora
        self.slice_sizes = slice_sizes
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0 and any(enable_lora):
            self.lora_A = nn.Parameter(self.weight.new_zeros((r * sum(enable_lora), in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((sum(self._enabled_sizes()), r)))
            self.weight.requires_grad = False
            self._build_buffers(self.weight.device)
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)
        self._set_variants(use_dora, init_lora_weights)

    def _build_buffers(self, device):
        if not self.has_lora:
            return
        # lora_ind (out,): True on the rows of enabled slices (loralib's name; here a buffer that follows .to())
        ind = torch.cat([torch.full((s,), on, dtype=torch.bool, device=device)
                         for s, on in zip(self.slice_sizes, self.enable_lora)])
        self.register_buffer("lora_ind", ind, persistent=False)

    def _enabled_sizes(self) -> list[int]:
        """The row counts of the enabled slices, in order: lora_B.split(_enabled_sizes()) gives their B blocks
        (and lora_A.split(r) their A blocks)."""
        return [size for size, on in zip(self.slice_sizes, self.enable_lora) if on]

    def full_B(self, dtype=None) -> torch.Tensor:
        """Block-structured B (out, r·n_enabled): x·Aᵀ·full_Bᵀ is this layer's low-rank term (zero rows for
        disabled slices)."""
        B = self.lora_B if dtype is None else self.lora_B.to(dtype)
        return expand_merged_B(B, self.slice_sizes, self.enable_lora, self.r)

    def delta_weight(self):
        cd = _compute_dtype(self.weight)
        return self._T(self.full_B(cd) @ self.lora_A.to(cd)) * self.scaling  # like the stored weight

    def merge_AB(self):
        """loralib's name: ΔW without the scaling, transposed when fan_in_fan_out."""
        return self._T(self.full_B() @ self.lora_A)

    def zero_pad(self, x):
        """loralib's helper: rows of the enabled slices (n_enabled_rows, ...) -> (out, ...) with zeros elsewhere."""
        result = x.new_zeros((len(self.lora_ind), *x.shape[1:]))
        result[self.lora_ind] = x
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._T(self.weight)  # (out, in)
        if not self.has_lora or self.merged:
            return F.linear(x, weight, self.bias)
        if self.use_dora:
            return self._dora(x, weight, self.full_B(x.dtype))
        lx = self.lora_dropout(x)
        if self.use_kernel and _use_triton(x, weight):
            from phi3lora.kernels.lora_matmul import lora_linear
            return lora_linear(x, weight, self.bias, self.lora_A, self.full_B(), self.scaling,
                               lora_x=None if lx is x else lx)
        result = F.linear(x, weight, self.bias)  # (..., out)
        xa = F.linear(lx, self.lora_A.to(x.dtype)) * self.scaling  # (..., r·n_enabled), scaled while it is thin
        xa_blocks = iter(xa.split(self.r, dim=-1))  # enabled slice e: (..., r)
        B_blocks = iter(self.lora_B.to(x.dtype).split(self._enabled_sizes()))  # enabled slice e: (size, r)
        # one (..., out) low-rank term in slice order: an enabled slice is its xa block times its own B, a
        # disabled slice zeros. One cat and one add (whose backward is plain slicing) instead of an indexed add
        # per slice, which costs a zero-filled (..., out) gradient for each slice in backward.
        pieces = [F.linear(next(xa_blocks), next(B_blocks)) if on else xa.new_zeros((*xa.shape[:-1], size))
                  for size, on in zip(self.slice_sizes, self.enable_lora)]
        return result.add_(torch.cat(pieces, dim=-1))


class ConvLoRA(nn.Module, LoRALayer):
    """A convolution + LoRA on its weight viewed as a matrix: ΔW = (B·A).view(weight.shape), A (r·k, in·k^(d-1)),
    B (out/groups·k, r·k) for kernel size k (an int) in d spatial dims. The conv is `self.conv`, as in loralib."""

    def __init__(self, conv_module, in_channels, out_channels, kernel_size, r=0, lora_alpha=1, lora_dropout=0.0,
                 merge_weights=True, use_rslora=False, **kwargs):
        nn.Module.__init__(self)
        self.conv = conv_module(in_channels, out_channels, kernel_size, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           merge_weights=merge_weights, use_rslora=use_rslora)
        if not isinstance(kernel_size, int):
            raise TypeError(f"kernel_size must be an int for LoRA convolutions, got {kernel_size!r}")
        if r > 0:
            k, spatial = kernel_size, self.conv.weight.dim() - 2
            self.lora_A = nn.Parameter(self.conv.weight.new_zeros((r * k, in_channels * k ** (spatial - 1))))
            self.lora_B = nn.Parameter(self.conv.weight.new_zeros((out_channels // self.conv.groups * k, r * k)))
            self.conv.weight.requires_grad = False
        self.reset_parameters()

    def _base_weight(self):
        return self.conv.weight

    def reset_parameters(self):
        self.conv.reset_parameters()
        if hasattr(self, "lora_A"):
            self.reset_lora_parameters()

    def delta_weight(self):
        cd = _compute_dtype(self.conv.weight)
        return (self.lora_B.to(cd) @ self.lora_A.to(cd)).view(self.conv.weight.shape) * self.scaling

    def train(self, mode: bool = True):
        nn.Module.train(self, mode)
        self._merge_for_mode(mode)
        return self

    def forward(self, x):
        if self.has_lora and not self.merged:
            w = self.conv.weight
            delta = (self.lora_B.to(w.dtype) @ self.lora_A.to(w.dtype)).view(w.shape) * self.scaling
            return self.conv._conv_forward(x, w + delta, self.conv.bias)
        return self.conv(x)


class Conv1d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv1d, *args, **kwargs)


class Conv2d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv2d, *args, **kwargs)


class Conv3d(ConvLoRA):
    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv3d, *args, **kwargs)
