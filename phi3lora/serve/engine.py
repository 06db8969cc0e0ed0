"""Continuous batching: one background thread runs every forward pass; requests join the running batch between
decode steps and leave it the moment they finish or their client goes away.

The batch shares one KV cache, (B, Hkv, S, D) per layer, with one row per running request. Rows are right-aligned,
as in generate's left-padded batches: every row writes its next token into the same slot, a row's tokens are the
last n slots, and the attention mask (B, S) is 1 on them. A new request is prefilled alone (batch of one, exactly
as chat.py prefills), then its keys and values are copied into a new row ending at the shared slot (the batch is
padded on the left first when the new prompt is longer). Leaving drops the row and any leading slots no row uses
any more. Positions are counted per row, so each row decodes as it would alone (the sliding window, counted in
slots, sees the same keys because a row's slots are contiguous).
LongRoPE picks its factors per forward call from the largest position, so for such models the server keeps the
context within original_max_position_embeddings (the short factors), where all rows agree.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from phi3lora.phi3mini import Phi3, Tokenizer, default_stop_ids
from phi3lora.phi3mini.generation import sample_next
from phi3lora.phi3mini.model import KVCache

from .multi_lora import AdapterRows

HEADROOM = 64  # cache slots allocated ahead of the shared write slot (grown by this much when full)


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # run to max_tokens past stop ids (vLLM's option; benchmarks use it)


class Request:
    """One completion. emit(event) is called from the engine thread with ("text", str) for each new piece of text,
    then ("done", finish_reason, prompt_tokens, completion_tokens) or ("error", message). Set cancelled to drop it."""

    def __init__(self, prompt_ids: list[int], adapter: int, sampling: Sampling, emit: Callable, tokenizer: Tokenizer,
                 device):
        self.prompt, self.adapter, self.sampling, self.emit = list(prompt_ids), adapter, sampling, emit
        self.cancelled = False
        self.tokens: list[int] = []  # sampled so far (stop token included)
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.held = ""  # text that could still be the start of a stop string
        self.finished = False
        seed = sampling.seed if sampling.seed is not None else int(torch.randint(2**62, ()).item())
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def push(self, token: int, stop_ids) -> None:
        """Take one sampled token: emit its text, finish on a stop id, a stop string or max_tokens."""
        self.tokens.append(token)
        if token in stop_ids and not self.sampling.ignore_eos:
            return self.finish("stop")
        text = self.held + self.decoder.push(token)
        if len(self.tokens) >= self.sampling.max_tokens:
            text += self.decoder.flush()
        for s in self.sampling.stop:
            if s in text:
                self.emit_text(text[:text.index(s)])
                return self.finish("stop")
        # hold back the longest tail that may still grow into a stop string
        keep = max([k for s in self.sampling.stop for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])],
                   default=0)
        self.emit_text(text[:len(text) - keep])
        self.held = text[len(text) - keep:]
        if len(self.tokens) >= self.sampling.max_tokens:
            self.emit_text(self.held)
            self.finish("length")

    def emit_text(self, text: str) -> None:
        if text:
            self.emit(("text", text))

    def finish(self, reason: str) -> None:
        self.finished = True
        self.emit(("done", reason, len(self.prompt), len(self.tokens)))


class Engine:
    """The scheduler and the batched decode loop. submit() may be called from any thread; it raises queue.Full when
    max_queue requests already wait (the server answers 429)."""

    def __init__(self, model: Phi3, tokenizer: Tokenizer, rows: AdapterRows | None = None, max_batch: int = 16,
                 max_queue: int = 64):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.rows = rows or AdapterRows()
        self.max_batch = max_batch
        self.stop_ids = set(default_stop_ids(model, tokenizer))
        c = model.config
        self.context = c.original_max_position_embeddings if c.rope_scaling else c.max_position_embeddings
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.waiting: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.running: list[Request] = []
        self.cache: KVCache | None = None  # one row per running request
        self.mask: torch.Tensor | None = None  # (B, cache.length): 1 on each row's slots
        self.steps = 0  # decode steps run (for tests and the benchmark)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="phi3lora-engine", daemon=True)

    # ----- the thread ---------------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self.thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.thread.join(timeout)

    def submit(self, request: Request) -> None:
        self.waiting.put_nowait(request)

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    self._admit()
                    if self.running:
                        self._step()
                except Exception as e:  # a failed forward ends the requests in it, never the server
                    for r in self.running:
                        r.emit(("error", f"{type(e).__name__}: {e}"))
                    self.running, self.cache, self.mask = [], None, None

    # ----- joining --------------------------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Prefill waiting requests into free rows; wait briefly for one when nothing runs."""
        while len(self.running) < self.max_batch:
            try:
                r = self.waiting.get(timeout=0.05) if not self.running else self.waiting.get_nowait()
            except queue.Empty:
                return
            if r.cancelled:
                continue
            try:
                self._prefill(r)
            except Exception as e:  # this request fails alone; the batch goes on
                r.emit(("error", f"{type(e).__name__}: {e}"))

    def _prefill(self, r: Request) -> None:
        P = len(r.prompt)
        one = KVCache(self.model.config, 1, P, self.dtype, self.device)
        ids = torch.tensor([r.prompt], device=self.device)  # (1, P)
        self.rows.set([r.adapter], self.device)
        logits = self.model(ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(P)[None].to(ids),
                            cache=one, logits_to_keep=1)[:, -1]  # (1, V)
        r.push(self._sample(r, logits), self.stop_ids)
        if not r.finished:
            self._join(r, one)

    def _join(self, r: Request, one: KVCache) -> None:
        P = one.length
        if self.cache is None:
            self.cache, self.mask = one, torch.ones(1, P, dtype=torch.long, device=self.device)
            self._resize(0, 0, P + HEADROOM)
        else:
            S = self.cache.length
            if P > S:  # room on the left for the longer prompt
                self._resize(P - S, 0, P + HEADROOM)
                S = P
            row_k, row_v = [], []
            for k, v in zip(one.k, one.v):  # (1, Hkv, P, D) -> (1, Hkv, cap, D) ending at slot S
                rk = k.new_zeros((1, k.shape[1], self.cache.max_len, k.shape[3]))
                rv = torch.zeros_like(rk)
                rk[:, :, S - P:S], rv[:, :, S - P:S] = k[:, :, :P], v[:, :, :P]
                row_k.append(rk)
                row_v.append(rv)
            self.cache.k = [torch.cat([a, b]) for a, b in zip(self.cache.k, row_k)]
            self.cache.v = [torch.cat([a, b]) for a, b in zip(self.cache.v, row_v)]
            row_mask = torch.zeros(1, S, dtype=torch.long, device=self.device)
            row_mask[:, S - P:] = 1
            self.mask = torch.cat([self.mask, row_mask])
        self.running.append(r)

    def _resize(self, pad_left: int, drop_left: int, capacity: int) -> None:
        """Rebuild the cache with pad_left empty slots in front, its first drop_left slots gone, capacity slots."""
        c, n = self.cache, self.cache.length - drop_left
        for layer in range(len(c.k)):
            for store in (c.k, c.v):
                old = store[layer]  # (B, Hkv, max_len, D)
                new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
                new[:, :, pad_left:pad_left + n] = old[:, :, drop_left:c.length]
                store[layer] = new
        pad = self.mask.new_zeros(self.mask.shape[0], pad_left)
        self.mask = torch.cat([pad, self.mask[:, drop_left:]], dim=1)  # (B, pad_left + n)
        c.length, c.max_len = pad_left + n, capacity

    # ----- decoding -------------------------------------------------------------------------------------------------
    def _sample(self, r: Request, logits: torch.Tensor) -> int:
        s = r.sampling
        return int(sample_next(logits, s.temperature, 0, s.top_p, r.generator)[0])

    def _step(self) -> None:
        """One token for every running row, then drop the rows that finished or were cancelled."""
        self._leave([r for r in self.running if r.cancelled])
        if not self.running:
            return
        c = self.cache
        if c.length == c.max_len:
            self._resize(0, 0, c.length + HEADROOM)
        B = len(self.running)
        last = torch.tensor([[r.tokens[-1]] for r in self.running], device=self.device)  # (B, 1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(B, 1)], dim=1)  # (B, S + 1)
        positions = self.mask.sum(-1, keepdim=True) - 1  # (B, 1): each row's own count of tokens
        self.rows.set([r.adapter for r in self.running], self.device)
        logits = self.model(last, attention_mask=self.mask, position_ids=positions, cache=c)[:, -1]  # (B, V)
        self.steps += 1
        for b, r in enumerate(self.running):
            if not r.cancelled:
                r.push(self._sample(r, logits[b:b + 1]), self.stop_ids)
        self._leave([r for r in self.running if r.finished or r.cancelled])

    def _leave(self, gone: list[Request]) -> None:
        if not gone:
            return
        keep = [b for b, r in enumerate(self.running) if r not in gone]
        self.running = [self.running[b] for b in keep]
        if not keep:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(keep, device=self.device)
        self.cache.k = [k.index_select(0, index) for k in self.cache.k]
        self.cache.v = [v.index_select(0, index) for v in self.cache.v]
        self.mask = self.mask.index_select(0, index)
        first = int(self.mask.any(0).long().argmax())  # leading slots no remaining row uses
        if first:
            self._resize(0, first, self.cache.max_len - first)
