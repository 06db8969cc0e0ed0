"""Attention plans: how one forward pass attends, decided once per call and shared by every layer.

A plan turns the call's structure (packed documents, the sliding window, padding, a KV cache) into the cheapest
exact way to run attention, without a dense (B, 1, T, T) mask wherever the structure allows:

- `CausalPlan`: a fresh sequence within the window: SDPA `is_causal` (the flash kernel on GPU).
- `DensePlan`: a boolean mask from `build_attention_mask`: generation with a KV cache or a padded `attention_mask`
  (the masks there are (B, 1, T_new, S), small while decoding), and the "dense" backend kept for comparison.
- `SegmentPlan`: packed rows (document_ids) and rows longer than the sliding window, split at document
  boundaries: each document runs alone through SDPA `is_causal`; a document longer than the window runs in query
  chunks against only the keys the window lets it see (memory O(T·W), never O(T²)). Exact: a query's softmax sees
  the same keys as under the dense mask, and the masked pairs are never computed. Documents of similar length are
  gathered into one batch (right-padded to a length bucket: causal attention never lets a real token see the
  padding after it), so a batch costs a handful of SDPA calls per layer, not one per document.
- `FlexPlan` (CUDA): the same mask as FlexAttention `mask_mod`s (same document, causal, inside the window) turned
  into one `BlockMask` per call; blocks that are fully masked are skipped by the kernel.

`attention_backend(device)` picks "flex" or "segments" once per process and device (FlexAttention is tried on a
small problem against SDPA first; if it is missing or fails, the segments path runs and a warning says why), and
logs its choice on the "phi3lora.attention" logger.

The interpretability probe (Attention.probe) still receives a dense mask (`plan.dense_mask()`, built only while
probing): it records the full attention-probability matrix, which is T×T anyway.
"""
from __future__ import annotations

import logging
import os
import warnings

import torch
import torch.nn.functional as F

log = logging.getLogger("phi3lora.attention")

BACKENDS = ("auto", "flex", "segments", "dense")
_CHOSEN: dict[str, tuple[str, str]] = {}  # device type -> (backend picked by "auto", why), once per process
_FLEX = None  # the compiled flex_attention (compiled once; it specializes per length bucket)


def build_attention_mask(q_len: int, kv_len: int, cache_start: int, sliding_window: int | None,
                         attention_mask: torch.Tensor | None, document_ids: torch.Tensor | None, device):
    """Boolean mask (B or 1, 1, q_len, kv_len), True where a query may attend, or None for plain causal.

    Indices are cache slots: query i sits in slot cache_start + i. attention_mask (B, kv_len) is 1 on real tokens
    (0 on padding); document_ids (B, q_len) separate packed examples (only without a cache).
    """
    window_cuts = sliding_window is not None and kv_len > sliding_window
    if attention_mask is None and document_ids is None and not window_cuts and cache_start == 0 and q_len == kv_len:
        return None
    q_idx = torch.arange(cache_start, cache_start + q_len, device=device)[:, None]  # (Tq, 1)
    k_idx = torch.arange(kv_len, device=device)[None, :]  # (1, Tk)
    allowed = k_idx <= q_idx
    if sliding_window is not None:
        allowed = allowed & (q_idx - k_idx < sliding_window)
    allowed = allowed[None, None]  # (1, 1, Tq, Tk)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :kv_len].bool()
    if document_ids is not None:
        allowed = allowed & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    # a query that may see nothing (a left-pad slot) would make softmax NaN: let it see everything; its output
    # is never used (no label, no later token attends to it)
    return allowed | ~allowed.any(dim=-1, keepdim=True)


def repeat_kv(k: torch.Tensor, v: torch.Tensor, n_head: int):
    # GQA: (B, Hkv, S, D) -> (B, Hq, S, D), each kv head serving n_head / Hkv query heads
    if k.shape[1] != n_head:
        k = k.repeat_interleave(n_head // k.shape[1], dim=1)
        v = v.repeat_interleave(n_head // v.shape[1], dim=1)
    return k, v


# ----- plans -----------------------------------------------------------------------------------------------------
class CausalPlan:
    name = "causal"

    def __init__(self, dense_args: tuple):
        self._dense_args = dense_args  # build_attention_mask's arguments, for the probe only
        self._dense = False

    def dense_mask(self):
        """The (B or 1, 1, T, S) boolean mask of this call (or None for plain causal): for the eager probe."""
        if self._dense is False:
            self._dense = build_attention_mask(*self._dense_args)
        return self._dense

    def attend(self, q, k, v):  # q (B, Hq, T, D), k/v (B, Hkv, T, D) -> (B, Hq, T, D)
        k, v = repeat_kv(k, v, q.shape[1])
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class DensePlan(CausalPlan):
    name = "dense"

    def __init__(self, dense_args: tuple):
        super().__init__(dense_args)
        self._dense = build_attention_mask(*dense_args)  # (B or 1, 1, T, S)

    def attend(self, q, k, v):  # q (B, Hq, T, D), k/v (B, Hkv, S, D)
        k, v = repeat_kv(k, v, q.shape[1])
        if self._dense is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self._dense)


def length_bucket(n: int) -> int:
    """Round a document length up to a multiple of a quarter of its power of two (at least 16): at most 25% more
    positions, and few distinct lengths (so few SDPA calls per layer)."""
    granule = max(16, 1 << max(0, n.bit_length() - 3))
    return -(-n // granule) * granule


def window_chunk(window: int) -> int:
    # queries per chunk in windowed attention: each chunk computes (chunk + window - 1) keys per query where the
    # window needs `window`; a quarter window wastes at most ~20% and keeps each chunk's scores small
    return max(128, window // 4)


def windowed_attention(q, k, v, window: int | None) -> torch.Tensor:
    """Causal attention with a sliding window (keys with q_idx - k_idx < window) over (N, H, L, D), in query chunks
    that each see only their keys: the scores are (chunk, chunk + window) per head, never (L, L)."""
    L = q.shape[2]
    if window is None or L <= window:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    chunk = window_chunk(window)
    out = []
    for s in range(0, L, chunk):
        e = min(s + chunk, L)
        ks = max(0, s - window + 1)  # the first key the chunk's first query may see
        qi = torch.arange(s, e, device=q.device)[:, None]  # (Cq, 1)
        ki = torch.arange(ks, e, device=q.device)[None, :]  # (1, Ck)
        allowed = (ki <= qi) & (qi - ki < window)  # (Cq, Ck); every query sees at least itself
        out.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, ks:e], v[:, :, ks:e], attn_mask=allowed))
    return torch.cat(out, dim=2)  # (N, H, L, D)


class SegmentPlan(CausalPlan):
    """Attention inside each document (a maximal run of equal document id in a row; padding, id 0, is a run of
    its own whose outputs nothing reads). Without document_ids, each row is one document (the long-sequence case)."""
    name = "segments"

    def __init__(self, dense_args: tuple, B: int, T: int, document_ids: torch.Tensor | None,
                 sliding_window: int | None, device):
        super().__init__(dense_args)
        self.window = sliding_window
        if document_ids is None:
            starts, lengths = torch.arange(B) * T, torch.full((B,), T)
        else:
            doc = document_ids.detach().to("cpu")  # (B, T): one host copy per call, not per layer
            new = torch.ones_like(doc, dtype=torch.bool)
            new[:, 1:] = doc[:, 1:] != doc[:, :-1]  # (B, T) True where a document starts
            starts = new.flatten().nonzero().squeeze(1)  # (R,) flat start index of each run, in order
            lengths = torch.diff(starts, append=torch.tensor([B * T]))  # (R,)
            runs = torch.stack([starts // T, doc.flatten()[starts]], dim=1)  # (R, 2): row, id
            if len(torch.unique(runs, dim=0)) != len(runs):
                raise ValueError("document_ids: a document's tokens must be contiguous in its row (an id appears in "
                                 "two separate runs)")
        # documents grouped by length bucket: one gather and one SDPA call (or chunk loop) per bucket
        buckets = torch.tensor([length_bucket(int(n)) for n in lengths])
        self.groups = []  # (bucket length, gather index (N, Lb) into the B*T tokens, kept (N, Lb) bool)
        order = []  # flat token index of each kept output, in the order the groups produce them
        for lb in torch.unique(buckets).tolist():
            sel = (buckets == lb).nonzero().squeeze(1)
            pos = torch.arange(lb)[None, :]  # (1, Lb)
            index = (starts[sel, None] + pos).clamp(max=B * T - 1)  # (N, Lb); past a document: any token (unused)
            kept = pos < lengths[sel, None]  # (N, Lb)
            self.groups.append((lb, index.to(device), kept.flatten().to(device)))
            order.append(index[kept])
        # kept outputs come out grouped; this permutation puts token t back at row-major position t
        self.inverse = torch.argsort(torch.cat(order)).to(device)  # (B*T,)
        self.B, self.T = B, T

    def attend(self, q, k, v):  # q (B, Hq, T, D), k/v (B, Hkv, T, D) -> (B, Hq, T, D)
        return _eager(SegmentPlan._attend)(self, q, k, v)

    def _attend(self, q, k, v):
        B, H, T, D = q.shape
        flat = [t.transpose(1, 2).reshape(B * T, t.shape[1], D) for t in (q, k, v)]  # (B*T, H or Hkv, D)
        outs = []
        for lb, index, kept in self.groups:
            # (N, Lb, H, D) -> (N, H, Lb, D): one batch of documents, right-padded to the bucket length
            qg, kg, vg = (t[index].transpose(1, 2) for t in flat)
            kg, vg = repeat_kv(kg, vg, H)
            y = windowed_attention(qg, kg, vg, self.window)  # (N, H, Lb, D)
            outs.append(y.transpose(1, 2).reshape(-1, H, D)[kept])  # (kept tokens, H, D)
        y = torch.cat(outs)[self.inverse]  # (B*T, H, D), row-major
        return y.view(B, T, H, D).transpose(1, 2)


_EAGER: dict = {}


def _eager(fn):
    """fn under torch.compiler.disable: under torch.compile (training's compile option compiles each block) the
    per-document loop runs eagerly, since it follows the batch's documents and would be a new graph for every batch.
    Wrapped at first use: the decorator imports torch._dynamo (seconds, and Triton), which `import phi3lora.phi3mini`
    must not."""
    if fn not in _EAGER:
        _EAGER[fn] = torch.compiler.disable(fn)
    return _EAGER[fn]


class FlexPlan(CausalPlan):
    """One BlockMask for the call (same document, causal, inside the window), shared by all layers. The length is
    padded to a bucket so the compiled kernel is reused across batches of nearby widths."""
    name = "flex"

    def __init__(self, dense_args: tuple, B: int, T: int, document_ids: torch.Tensor | None,
                 sliding_window: int | None, device):
        super().__init__(dense_args)
        from torch.nn.attention.flex_attention import create_block_mask
        self.T, self.Tp = T, flex_bucket(T)
        doc = None
        if document_ids is not None:  # padded slots get id -1: they see only each other, never a real token
            doc = F.pad(document_ids, (0, self.Tp - T), value=-1)  # (B, Tp)
        window = sliding_window

        def mask_mod(b, h, q_idx, kv_idx):
            keep = q_idx >= kv_idx
            if window is not None:
                keep = keep & (q_idx - kv_idx < window)
            if doc is not None:
                keep = keep & (doc[b, q_idx] == doc[b, kv_idx])
            return keep

        # compiled, the mask is evaluated tile by tile (never a (B, Tp, Tp) tensor); uncompiled on the CPU, where
        # only tests build it (a C++ compile per shape would cost minutes there)
        self.block_mask = create_block_mask(mask_mod, B if doc is not None else None, None, self.Tp, self.Tp,
                                            device=device, _compile=torch.device(device).type == "cuda")

    def attend(self, q, k, v):  # q (B, Hq, T, D), k/v (B, Hkv, T, D) -> (B, Hq, T, D)
        pad = self.Tp - self.T
        if pad:  # trailing slots: causal, so no real query sees them
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        y = compiled_flex()(q, k, v, block_mask=self.block_mask, enable_gqa=k.shape[1] != q.shape[1])
        return y[:, :, :self.T]

    def skipped_fraction(self) -> float:
        """Fraction of the (Tp/128)² tiles the kernel never computes (fully masked)."""
        n = self.Tp // 128
        return 1.0 - block_mask_computed(self.block_mask) / (n * n)


def block_mask_computed(block_mask) -> float:
    # tiles the kernel computes, averaged over batch rows: partial blocks plus full blocks
    counts = block_mask.kv_num_blocks.sum(dim=-1).float()  # (B or 1, 1)
    if block_mask.full_kv_num_blocks is not None:
        counts = counts + block_mask.full_kv_num_blocks.sum(dim=-1).float()
    return float(counts.mean())


def flex_bucket(T: int) -> int:
    """Pad to a multiple of 128 (FlexAttention's tile), in steps of a quarter power of two above 512: ~4 compiled
    shapes per doubling of the width."""
    granule = max(128, 1 << max(0, T.bit_length() - 3))
    return -(-T // granule) * granule


def compiled_flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention
        import torch._dynamo
        # each length bucket is one specialization; allow more than dynamo's default 8 so long runs with varied
        # widths do not fall back to the (slow, T²-memory) eager flex_attention
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 64))
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


# ----- choosing -------------------------------------------------------------------------------------------------
def _flex_self_check(device, dtype, n_head: int, n_kv: int, head_dim: int) -> str | None:
    """Run FlexAttention on a small packed problem and compare with per-document SDPA; None when it agrees."""
    try:
        T = 256
        doc = torch.repeat_interleave(torch.tensor([1, 2, 3]), torch.tensor([100, 120, 36]))[None].to(device)
        g = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(1, n_head, T, head_dim, generator=g).to(device, dtype)
        k, v = (torch.randn(1, n_kv, T, head_dim, generator=g).to(device, dtype) for _ in range(2))
        args = (T, T, 0, 64, None, doc, device)
        got = FlexPlan(args, 1, T, doc, 64, device).attend(q, k, v).float()
        want = SegmentPlan(args, 1, T, doc, 64, device).attend(q, k, v).float()
        err = float((got - want).abs().max())
        tol = 1e-3 if dtype == torch.float32 else 3e-2
        return None if err <= tol else f"max abs difference {err:.3g} from per-document SDPA (> {tol:g})"
    except Exception as e:  # noqa: BLE001 - any failure (missing module, compile error) means: do not use it
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def attention_backend(device, dtype=torch.float32, n_head: int = 4, n_kv: int = 4, head_dim: int = 16) -> str:
    """The structured-attention backend "auto" means on this device, decided once per process: "flex" on CUDA when
    FlexAttention runs and agrees with SDPA on a small packed problem, else "segments" (also on the CPU, where
    FlexAttention's eager path would build the full score matrix)."""
    return attention_backend_and_why(device, dtype, n_head, n_kv, head_dim)[0]


def attention_backend_and_why(device, dtype=torch.float32, n_head: int = 4, n_kv: int = 4,
                              head_dim: int = 16) -> tuple[str, str]:
    """attention_backend's choice and its reason in words, for a program to say at start."""
    device = torch.device(device)
    if device.type in _CHOSEN:
        return _CHOSEN[device.type]
    choice, why = "segments", "per-document SDPA (FlexAttention is used on CUDA only)"
    if device.type == "cuda":
        problem = _flex_self_check(device, dtype, n_head, n_kv, head_dim)
        if problem is None:
            choice, why = "flex", "FlexAttention with a block mask (document, causal, window)"
        else:
            if os.environ.get("PHI3LORA_STRICT_KERNELS") == "1":
                raise RuntimeError(f"FlexAttention failed its self-check: {problem} (PHI3LORA_STRICT_KERNELS=1)")
            why = f"per-document SDPA, because FlexAttention failed its self-check: {problem}"
            warnings.warn(f"packed attention: {why}", RuntimeWarning, stacklevel=2)
    _CHOSEN[device.type] = choice, why
    log.info("packed attention on %s: %s", device.type, why)
    return choice, why


def make_plan(backend: str, T: int, start: int, sliding_window: int | None, attention_mask, document_ids,
              B: int, device, dtype=torch.float32, heads: tuple[int, int, int] = (4, 4, 16)):
    """The plan for one forward call: q_len T after `start` cached slots. `heads` (n_head, n_kv, head_dim) and
    dtype size FlexAttention's self-check."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    dense_args = (T, start + T, start, sliding_window, attention_mask, document_ids, device)
    window_cuts = sliding_window is not None and T > sliding_window
    structured = start == 0 and attention_mask is None and (document_ids is not None or window_cuts)
    if not structured:  # generation (KV cache, left padding) and plain causal keep their paths
        return CausalPlan(dense_args) if build_attention_mask_is_causal(dense_args) else DensePlan(dense_args)
    if backend == "dense":
        return DensePlan(dense_args)
    if backend == "auto":
        backend = attention_backend(device, dtype, *heads)
    if backend == "flex":
        return FlexPlan(dense_args, B, T, document_ids, sliding_window, device)
    return SegmentPlan(dense_args, B, T, document_ids, sliding_window, device)


def build_attention_mask_is_causal(dense_args: tuple) -> bool:
    q_len, kv_len, cache_start, window, attention_mask, document_ids, _ = dense_args
    window_cuts = window is not None and kv_len > window
    return attention_mask is None and document_ids is None and not window_cuts and cache_start == 0 and q_len == kv_len


__all__ = ["BACKENDS", "build_attention_mask", "make_plan", "attention_backend", "attention_backend_and_why",
           "CausalPlan", "DensePlan", "SegmentPlan", "FlexPlan", "windowed_attention", "length_bucket", "flex_bucket"]
