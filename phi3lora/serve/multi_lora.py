"""Many LoRA adapters in one batch (Punica's BGMV, https://arxiv.org/abs/2310.18547): every LoRA-target Linear of
the base model is wrapped so that y = base(x) + the gathered low-rank term, where each batch row uses its own
adapter's A and B (or none: index -1, the base model's rows).

Adapters are read with the project's own loaders (ours and PEFT's): each is injected into the base model, its
factors are copied out, and the original modules are put back. A fused projection's per-part adapter
(MergedLinear over qkv_proj or gate_up_proj) becomes one A (r·n_enabled, K) and its block-structured B
(out, r·n_enabled) (`MergedLinear.full_B`), so x·Aᵀ·Bᵀ is exactly the layer's low-rank term.
"""
from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from phi3lora import lora
from phi3lora.kernels.reference import gathered_lora_reference
from phi3lora.lora.layers import BASE_CHANGING

Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module name -> (A (r, K), B (M, r), scaling)


class AdapterRows:
    """The adapter index of each batch row for the next forward pass, shared by every wrapped module; the engine
    sets it before each forward. ids (B,) long on the model's device; any: whether some row uses an adapter."""

    def __init__(self):
        self.ids: torch.Tensor | None = None
        self.any = False

    def set(self, ids: list[int], device) -> None:
        self.ids = torch.tensor(ids, dtype=torch.long, device=device)
        self.any = any(i >= 0 for i in ids)


class MultiLoraLinear(nn.Module):
    """base(x) + scaling[i]·(x·A[i]ᵀ)·B[i]ᵀ with i the row's adapter. A (L, R, K) and B (L, M, R) stack every
    adapter's factors, ranks zero-padded to the largest R (zero columns add nothing); an adapter that does not
    target this module has zeros here."""

    def __init__(self, base: nn.Module, rows: AdapterRows):
        super().__init__()
        self.base, self.rows = base, rows
        w = base.weight
        self.register_buffer("lora_A", w.new_zeros(0, 0, self.sizes()[0]))
        self.register_buffer("lora_B", w.new_zeros(0, self.sizes()[1], 0))
        self.register_buffer("scaling", torch.zeros(0, device=w.device))
        self.use_kernel = False  # the Triton gathered kernel (on CUDA it is used regardless)

    def sizes(self) -> tuple[int, int]:
        return self.base.in_features, self.base.out_features  # (K, M)

    def stack(self, factors: list[tuple[torch.Tensor, torch.Tensor, float] | None]) -> None:
        """factors[i]: adapter i's (A (r, K), B (M, r), scaling), or None where it does not target this module."""
        R = max([a.shape[0] for a, _, _ in filter(None, factors)], default=0)
        (K, M), L, w = self.sizes(), len(factors), self.base.weight
        A, B = w.new_zeros(L, R, K), w.new_zeros(L, M, R)  # (L, R, K), (L, M, R): zero-padded ranks
        scaling = torch.zeros(L, device=w.device)
        for i, f in enumerate(factors):
            if f is not None:
                a, b, s = f
                A[i, :a.shape[0]], B[i, :, :b.shape[1]], scaling[i] = a, b, s
        self.lora_A, self.lora_B, self.scaling = A, B, scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (B, T, M)
        if not self.rows.any or self.lora_A.shape[1] == 0:
            return y
        Bsz, T, K = x.shape
        ids = self.rows.ids.repeat_interleave(T)  # (B·T,): each token takes its row's adapter
        op = triton_gathered_lora() if x.is_cuda or self.use_kernel else gathered_lora_reference
        delta = op(x.reshape(-1, K), self.lora_A, self.lora_B, ids, self.scaling)  # (B·T, M)
        return y + delta.view(Bsz, T, -1)  # (B, T, M)


class MultiLoraEmbedding(MultiLoraLinear):
    """An embedding with many adapters: E[t] + scaling[i]·A[i][:, t]ᵀ·B[i]ᵀ (lora.Embedding's term, A (r, vocab)
    looked up by token like the embedding itself)."""

    def sizes(self) -> tuple[int, int]:
        return self.base.num_embeddings, self.base.embedding_dim  # (vocab, M)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # x (B, T) token ids -> (B, T, M)
        if not self.rows.any or self.lora_A.shape[1] == 0:
            return y
        tokens = x.reshape(-1)  # (N,)
        ids = self.rows.ids.repeat_interleave(x.shape[1])  # (N,)
        delta = torch.zeros(tokens.shape[0], y.shape[-1], dtype=y.dtype, device=y.device)  # (N, M)
        for i in ids.unique().tolist():
            if i >= 0:
                rows = (ids == i).nonzero().squeeze(-1)  # (n_i,)
                xa = self.lora_A[i][:, tokens[rows]].t()  # (n_i, R): columns of A picked by token
                delta[rows] = (xa @ self.lora_B[i].t()) * float(self.scaling[i])  # (n_i, M)
        return y + delta.view_as(y)


@functools.cache
def triton_gathered_lora():
    """kernels.gathered_lora (Triton), looked up on first use; the torch reference, with a warning, where this
    installation has no such kernel."""
    try:
        from phi3lora.kernels import gathered_lora
        return gathered_lora
    except ImportError as e:
        warnings.warn(f"no Triton gathered-LoRA kernel ({e}): the torch reference runs instead", stacklevel=2)
        return gathered_lora_reference


def unservable(folder) -> str | None:
    """Why the adapter in folder cannot share a batch with others, or None. Read from its adapter_config.json (ours
    keeps the settings under "lora", peft's at the top) before anything is loaded, because these variants change
    more than a low-rank term: DoRA rescales each row of the layer's whole output by its trained magnitude; PiSSA /
    OLoRA rewrite the base weights to a residual; modules_to_save replace whole modules (lm_head) for every row."""
    path = Path(folder) / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # the loader names what is wrong with the folder
    settings = cfg.get("lora", cfg) if isinstance(cfg, dict) else {}
    init = str(settings.get("init_lora_weights", "kaiming")).lower()
    if settings.get("use_dora"):
        return ("it is a DoRA adapter (use_dora): its magnitude rescales the whole output of each layer, which a "
                "shared batch cannot do per row; merge it (train.py --merge) and serve the merged model")
    if init.startswith(BASE_CHANGING):
        return (f"init_lora_weights={init!r} rewrote the base weights to a residual; export it with train.py "
                "--export-peft (a plain LoRA on the original base) and serve that folder")
    if settings.get("modules_to_save"):
        return (f"it trains whole modules ({', '.join(settings['modules_to_save'])}: modules_to_save), which would "
                "change every row of the batch; merge it (train.py --merge) and serve the merged model")
    return None


def adapter_factors(model: nn.Module, load) -> Factors:
    """Run load(model) (a project loader that injects LoRA layers and fills them), copy every layer's factors out,
    and put the model's original modules back. Linear, MergedLinear and Embedding adapters can be served."""
    before = dict(model.named_modules())
    load(model)
    layers = lora.lora_layers(model)
    try:
        factors: Factors = {}
        for name, m in layers:
            if not isinstance(m, (lora.Linear, lora.MergedLinear, lora.Embedding)) or getattr(m, "fan_in_fan_out",
                                                                                                False):
                raise ValueError(f"{name}: a {type(m).__name__} adapter cannot be served (only Linear, MergedLinear "
                                 "and Embedding layers)")
            if not m.has_lora:
                continue
            if getattr(m, "use_dora", False) or "lora_A_init" in m._buffers:  # unservable() says why, before loading
                raise ValueError(f"{name}: a DoRA or PiSSA/OLoRA layer cannot be served in a shared batch")
            B = m.full_B() if isinstance(m, lora.MergedLinear) else m.lora_B  # (M, r·n_enabled) or (M, r)
            factors[name] = (m.lora_A.detach().clone(), B.detach().clone(), float(m.scaling))
        return factors
    finally:
        for name, _ in layers:  # the base modules again (they kept their own weight Parameters)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, before[name])
        if hasattr(model, "lora_config"):
            del model.lora_config


def install(model: nn.Module, adapters: list[Factors]) -> AdapterRows:
    """Wrap every module some adapter targets in a MultiLoraLinear holding all adapters (index = position in
    `adapters`); returns the rows object the engine sets before each forward."""
    rows = AdapterRows()
    for name in sorted({n for f in adapters for n in f}):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        base = getattr(owner, child)
        wrapped = (MultiLoraEmbedding if isinstance(base, nn.Embedding) else MultiLoraLinear)(base, rows)
        wrapped.stack([f.get(name) for f in adapters])
        setattr(owner, child, wrapped)
    return rows
