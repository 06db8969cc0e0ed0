"""Generation: prefill the prompt, then decode one token at a time against a KV cache.

Left-padded batches carry an attention mask and position ids counted over real tokens only, so each row decodes
exactly as it would alone. With LongRoPE, keys cached with the short factors become wrong once the sequence
crosses original_max_position_embeddings: at that step the whole sequence is run again with the long factors, as
transformers does (its Phi-3 `prepare_inputs_for_generation`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .model import KVCache, Phi3


def default_stop_ids(model: Phi3, tokenizer=None) -> list[int]:
    """The ids that end a reply: generation_config.json's eos_token_id (Phi-3-mini: [32000, 32001, 32007], Phi-4-mini:
    [200020, 199999]), else config.json's, then the tokenizer's stop ids (its <|end|> and eos) when one is given.
    No id is written here: each checkpoint names its own."""
    eos = model.generation_config.get("eos_token_id", model.config.eos_token_id)
    ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if tokenizer is not None:
        ids += list(tokenizer.stop_ids)
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator=None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy. Otherwise the logits go through temperature, top-k
    and top-p exactly as transformers' warpers do them (same operations, so ties at the cut-offs go the same way)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # ascending, as transformers' TopPLogitsWarper: drop the least likely tokens while their total mass is at
        # most 1 - top_p; the most likely token always stays
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        drop_sorted = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop_sorted[:, -1] = False
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # mask (B, S) of 1 on real tokens -> positions counted over real tokens (pads get 0, never used)
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def generate(model: Phi3, input_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, stop_ids: Sequence[int] | None = None, attention_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None, on_token: Callable[[int], None] | None = None):
    """Generate up to max_new_tokens after input_ids and return the new token ids.

    input_ids: a list of ints or a 1-D tensor (returns a list of ints), or a 2-D left-padded batch (B, T) with its
    attention_mask (returns one list per row). Generation of a row ends at the first stop id (included in the
    result); stop_ids=None means `default_stop_ids(model)` (generation_config.json's or config.json's eos ids).
    on_token(id) is called for each new token of a single sequence as soon as it is chosen (for streaming).
    """
    single = not (torch.is_tensor(input_ids) and input_ids.dim() == 2)
    device = next(model.parameters()).device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    ids = ids[None] if single else ids
    B, T = ids.shape
    if T == 0:
        raise ValueError("generate needs at least one prompt token")
    mask = (torch.ones_like(ids) if attention_mask is None else attention_mask.to(device).long())
    stop_list = default_stop_ids(model) if stop_ids is None else [int(i) for i in stop_ids]
    stops = torch.tensor(stop_list, dtype=torch.long, device=device)
    max_len = T + max_new_tokens
    dtype = next(model.parameters()).dtype

    def prefill(all_ids, all_mask):
        cache = KVCache(model.config, B, max_len, dtype, device)
        logits = model(all_ids, attention_mask=all_mask, position_ids=_positions(all_mask), cache=cache,
                       logits_to_keep=1)
        return cache, logits[:, -1]

    was_training = model.training
    model.eval()
    try:  # restore the mode even when on_token raises (Ctrl-C while streaming) or generation fails
        cache, logits = prefill(ids, mask)
        out = torch.empty(B, 0, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            nxt = torch.where(done, torch.zeros_like(nxt), nxt)  # finished rows feed a dummy token, dropped below
            out = torch.cat([out, nxt[:, None]], dim=1)
            if single and on_token is not None:
                on_token(int(nxt[0]))
            done = done | torch.isin(nxt, stops)
            if bool(done.all()) or out.shape[1] == max_new_tokens:
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
            pos = _positions(mask)[:, -1:]  # (B, 1)
            if model.rotary.uses_long(int(pos.max())) and not cache.long_rope:
                # crossing original_max_position_embeddings: recompute every cached key with the long factors
                cache, logits = prefill(torch.cat([ids, out], dim=1), mask)
                continue
            logits = model(nxt[:, None], attention_mask=mask, position_ids=pos, cache=cache)[:, -1]
    finally:
        model.train(was_training)

    rows = []
    for row in out.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stop_list), len(row))  # through the first stop id
        rows.append(row[:end])
    return rows[0] if single else rows
