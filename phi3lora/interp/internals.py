"""See inside a forward pass of the same `Phi3` that trains and chats: no second model class, no copy.

    with probe.capture(model, attention=True, residual=True) as cap:
        logits = model(ids)
    cap.attentions[layer]  # (B, heads, T, S) softmax probabilities
    cap.residual[layer]    # (B, T, hidden) residual stream after block `layer`

Sites, per layer (what `capture` records, and what `patch` may replace):
- "attention": the attention probabilities (B, Hq, T, S). Only while they are asked for does the layer run eager
  attention (q·kᵀ/√d, mask, fp32 softmax, as transformers' eager path); otherwise SDPA runs untouched.
- "heads": each head's attention output before o_proj (B, T, Hq, D); `ablate_heads` zeroes chosen heads here.
- "residual": the residual stream after the block (B, T, hidden).
- "mlp": the SwiGLU activation up·silu(gate), down_proj's input (B, T, intermediate).
Forward hooks do the recording, so nothing changes and nothing is paid when `capture` is not in use. Each forward
pass inside the context overwrites what the previous one recorded. Recorded tensors are what flowed on: after
any patch.

Also here: the logit lens (each layer's residual through the final norm and lm_head,
https://www.lesswrong.com/posts/AcKRB8wDpdaN6v6ru). LoRA's footprint (what an adapter changed) is in
lora/footprint.py.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Union

import torch
from torch import nn

SITES = ("attention", "heads", "residual", "mlp")
Edit = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


@dataclass
class Capture:
    """What one forward pass recorded, by layer index. Shapes: see the module docstring."""
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)
    heads: dict[int, torch.Tensor] = field(default_factory=dict)
    residual: dict[int, torch.Tensor] = field(default_factory=dict)
    mlp: dict[int, torch.Tensor] = field(default_factory=dict)


def _blocks(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"expected a phi3mini.Phi3 (with .model.layers), got {type(model).__name__}")
    return layers


def _check_layer(layer, n: int, what: str) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
        raise ValueError(f"{what}: layer {layer!r} does not exist; the model has layers 0..{n - 1}")
    return layer % n


def _apply(edit: Edit, x: torch.Tensor, where: str) -> torch.Tensor:
    out = edit(x) if callable(edit) else edit.to(device=x.device, dtype=x.dtype)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"patch {where}: expected a tensor of shape {tuple(x.shape)}, got {got}")
    return out


def _edits(patch, ablate_heads, n: int) -> dict[tuple[str, int], list[Edit]]:
    """{(site, layer): [edits in order]} from patch={(site, layer): edit} and ablate_heads={layer: heads}."""
    edits: dict[tuple[str, int], list[Edit]] = {}
    for key, edit in (patch or {}).items():
        if not (isinstance(key, tuple) and len(key) == 2 and key[0] in SITES):
            raise ValueError(f"patch keys are (site, layer) with site one of {SITES}; got {key!r}")
        if not (callable(edit) or isinstance(edit, torch.Tensor)):
            raise TypeError(f"patch {key}: give a tensor or a function of the tensor, not {type(edit).__name__}")
        edits.setdefault((key[0], _check_layer(key[1], n, "patch")), []).append(edit)
    for layer, heads in (ablate_heads or {}).items():
        heads = [heads] if isinstance(heads, int) else list(heads)

        def zero(x, heads=heads):  # x (B, T, Hq, D)
            bad = [h for h in heads if not -x.shape[2] <= h < x.shape[2]]
            if bad:
                raise ValueError(f"ablate_heads: no head {bad[0]}; the layer has heads 0..{x.shape[2] - 1}")
            x = x.clone()
            x[:, :, heads] = 0
            return x

        edits.setdefault(("heads", _check_layer(layer, n, "ablate_heads")), []).append(zero)
    return edits


def _run_edits(edits: dict, site: str, layer: int, x: torch.Tensor) -> torch.Tensor:
    for edit in edits.get((site, layer), ()):
        x = _apply(edit, x, f"({site!r}, {layer})")
    return x


def eager_attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax(q·kᵀ/√d + mask) as transformers' eager attention computes it (fp32 softmax, cast back to q's dtype).
    q (B, H, T, D), k (B, H, S, D) with GQA heads already repeated, mask (B|1, 1, T, S) bool (True: may attend) or
    None for plain causal attention over a fresh sequence -> (B, H, T, S)."""
    T, S = q.shape[2], k.shape[2]
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5  # (B, H, T, S)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # query i sees keys <= S - T + i
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)


@contextmanager
def capture(model: nn.Module, attention: bool = False, residual: bool = False, mlp: bool = False,
            heads: bool = False, layers: Iterable[int] | None = None,
            patch: dict[tuple[str, int], Edit] | None = None,
            ablate_heads: dict[int, int | Iterable[int]] | None = None, detach: bool = True) -> Iterator[Capture]:
    """Record the chosen sites of the chosen layers (default: all) during forward passes inside the block.

    patch={(site, layer): tensor or function}: replace that site's value (a tensor of the same shape, or f(x)).
    ablate_heads={layer: [head, ...]}: zero those heads' outputs. detach=False keeps recorded tensors in the
    autograd graph (for attribution). Hooks and the attention switch are removed on exit, even on error."""
    blocks = _blocks(model)
    n = len(blocks)
    record = set(range(n)) if layers is None else {_check_layer(i, n, "layers") for i in layers}
    edits = _edits(patch, ablate_heads, n)
    cap = Capture()
    keep = (lambda t: t.detach()) if detach else (lambda t: t)

    def wanted(site: str, on: bool, i: int) -> bool:
        return (on and i in record) or (site, i) in edits

    def attention_probe(i: int, store: bool):
        def run(layer_idx, q, k, v, mask):  # q (B, Hq, T, D), k/v (B, Hq, S, D) -> (B, Hq, T, D)
            probs = _run_edits(edits, "attention", i, eager_attention_probs(q, k, mask))
            if store:
                cap.attentions[i] = keep(probs)
            return torch.matmul(probs, v)
        return run

    def pre_hook(site: str, i: int, store: bool, n_head: int | None = None):
        def hook(module, args):
            x = args[0]  # heads: (B, T, Hq*D) -> (B, T, Hq, D); mlp: (B, T, intermediate)
            view = x.view(*x.shape[:-1], n_head, -1) if n_head else x
            view = _run_edits(edits, site, i, view)
            if store:
                getattr(cap, site)[i] = keep(view)
            return (view.reshape(x.shape), *args[1:])
        return hook

    def residual_hook(i: int, store: bool):
        def hook(module, args, out):  # out (B, T, hidden)
            out = _run_edits(edits, "residual", i, out)
            if store:
                cap.residual[i] = keep(out)
            return out
        return hook

    handles, probed = [], []
    try:
        for i, block in enumerate(blocks):
            attn = block.self_attn
            if wanted("attention", attention, i):
                if attn.probe is not None:
                    raise RuntimeError(f"layer {i} is already being probed: capture contexts do not nest")
                attn.probe = attention_probe(i, attention and i in record)
                probed.append(attn)
            if wanted("heads", heads, i):
                handles.append(attn.o_proj.register_forward_pre_hook(
                    pre_hook("heads", i, heads and i in record, n_head=attn.n_head)))
            if wanted("mlp", mlp, i):
                handles.append(block.mlp.down_proj.register_forward_pre_hook(
                    pre_hook("mlp", i, mlp and i in record)))
            if wanted("residual", residual, i):
                handles.append(block.register_forward_hook(residual_hook(i, residual and i in record)))
        yield cap
    finally:
        for h in handles:
            h.remove()
        for attn in probed:
            attn.probe = None


# ----- logit lens ----------------------------------------------------------------------------------------------------
def lens_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A residual stream (..., hidden) read as the model reads its last one: final norm, then lm_head -> (..., vocab).
    On the last layer's residual this is exactly the model's logits."""
    return model.lm_head(model.model.norm(hidden))


@dataclass
class LogitLens:
    """Per recorded layer (in `layers` order): the top-k next tokens and their probabilities, and the probability
    each layer gives the model's final prediction (how early the answer forms)."""
    layers: list[int]
    top_ids: torch.Tensor  # (L, B, T, k)
    top_probs: torch.Tensor  # (L, B, T, k) fp32
    final_ids: torch.Tensor  # (B, T): the model's own argmax next token
    final_probs: torch.Tensor  # (L, B, T) fp32: each layer's probability of final_ids


@torch.no_grad()
def logit_lens(model: nn.Module, input_ids: torch.Tensor, k: int = 5, layers: Iterable[int] | None = None,
               **forward_kw) -> LogitLens:
    """Run input_ids (B, T) once and read every chosen layer's residual stream through the final norm and lm_head.
    One layer's (B, T, vocab) logits exist at a time."""
    with capture(model, residual=True, layers=layers) as cap:
        final_ids = model(input_ids, **forward_kw).argmax(-1)  # (B, T)
    order = sorted(cap.residual)
    top_ids, top_probs, final_probs = [], [], []
    for i in order:
        probs = torch.softmax(lens_logits(model, cap.residual[i]).float(), dim=-1)  # (B, T, vocab)
        p, ids = probs.topk(min(k, probs.shape[-1]), dim=-1)
        top_ids.append(ids)
        top_probs.append(p)
        final_probs.append(probs.gather(-1, final_ids[..., None])[..., 0])
    return LogitLens(order, torch.stack(top_ids), torch.stack(top_probs), final_ids, torch.stack(final_probs))
