"""Preference data (chosen / rejected pairs) for DPO and ORPO: read in the forms people have, encode each pair as two
examples with the loss only on the response, batch them with a pair's chosen and rejected side by side.

Record forms (detected per record; JSONL, JSON, parquet, ... as for chats: files.py):
  {"prompt": ..., "chosen": ..., "rejected": ...}          TRL's explicit prompt; each a string or a message list
      (a string prompt is a user turn, a string chosen/rejected an assistant reply)
  {"chosen": [messages], "rejected": [messages]}           TRL's implicit prompt: the longest shared message prefix
      (a Phi-3 chat string, "<|user|>\\n...<|end|>\\n<|assistant|>\\n...", is read as its messages)
  {"conversations": [...], "chosen": {"from": "gpt", "value": ...}, "rejected": {...}, "system": "..."}
      ShareGPT pairwise, as LLaMA-Factory writes it ("system" optional)
  {"instruction": ..., "input": ..., "chosen": "...", "rejected": "...", "system": ...}   Alpaca pairwise
      (LLaMA-Factory)

A pair's prompt and response go through `ChatEncoder` exactly as an SFT chat (same template, same special-token
checks); the labels are then cleared over the prompt (its earlier assistant turns included), so only the response's
tokens and its closing <|end|> are targets. A response that does not fit in max_seq_len skips the pair (too long).
Every bad record of every file is reported with its file and line, as for chats.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .encoder import ChatEncoder, Example
from .files import MAX_LINE_BYTES, BadRecord, iter_records, resolve
from .formats import SHAREGPT_ROLES, DataError, parse_phi3_text, record_to_messages
from .pipeline import Batch, collate, split_eval
from .store import BadLines
from phi3lora.phi3mini.tokenizer import IGNORE

PAIR_FORMS = ('expected "chosen" and "rejected" with a "prompt" (TRL), message lists sharing their prompt (TRL '
              'implicit prompt), ShareGPT "conversations" or Alpaca "instruction"')


@dataclass
class Pair:
    chosen: Example
    rejected: Example
    source: str = ""

    def __len__(self) -> int:  # the row width the pair needs
        return max(len(self.chosen), len(self.rejected))


@dataclass
class PreferenceSet:
    """Encoded pairs, indexable like a list (the loop's data order plans over pairs)."""
    pairs: list[Pair] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return PreferenceSet(self.pairs[i])
        return self.pairs[i]

    def __iter__(self):
        return iter(self.pairs)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(p.chosen) + len(p.rejected) for p in self.pairs], dtype=np.int64)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for p in self.pairs:
            for ex in (p.chosen, p.rejected):
                h.update(np.asarray(ex.input_ids, dtype=np.int64).tobytes())
                h.update(np.asarray(ex.labels, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


# ----- records -> (prompt, chosen, rejected) messages -----------------------------------------------------------

def _side(value, what: str) -> list[dict]:
    """A chosen / rejected value: a reply string, one message, or a message list."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        if "from" in value:  # ShareGPT's single turn
            return [{"role": SHAREGPT_ROLES.get(value.get("from"), value.get("from")), "content": value.get("value")}]
        return [value]
    if isinstance(value, list):
        return value
    raise ValueError(f'"{what}" must be a string, a message or a list of messages, got {type(value).__name__}')


def _messages(value, what: str) -> list[dict]:
    """A message list of the implicit form, or a Phi-3 chat string."""
    if isinstance(value, str):
        try:
            return parse_phi3_text(value)
        except ValueError as e:
            raise ValueError(f'"{what}" without a "prompt": {e}') from None
    if not isinstance(value, list):
        raise ValueError(f'"{what}" must be a list of messages, got {type(value).__name__}')
    return value


def record_to_pair(obj) -> tuple[list[dict], list[dict], list[dict]]:
    """One record -> (prompt messages, chosen messages, rejected messages), each checked as a chat; ValueError says
    what is wrong (the caller adds the file and line)."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if obj.get("chosen") is None or obj.get("rejected") is None:
        raise ValueError(f"{PAIR_FORMS}, got keys {sorted(obj)}")
    if obj.get("conversations") is not None:
        prompt = record_to_messages({"conversations": obj["conversations"]})
        if obj.get("system"):
            prompt = [{"role": "system", "content": obj["system"]}] + prompt
        chosen, rejected = _side(obj["chosen"], "chosen"), _side(obj["rejected"], "rejected")
    elif obj.get("instruction") is not None:
        rec = {k: obj[k] for k in ("instruction", "input", "system") if k in obj}
        prompt = record_to_messages(rec | {"output": "x"})[:-1]  # Alpaca's prompt, without the placeholder reply
        chosen, rejected = _side(obj["chosen"], "chosen"), _side(obj["rejected"], "rejected")
    elif obj.get("prompt") is not None:
        p = obj["prompt"]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else p
        if not isinstance(prompt, list):
            raise ValueError(f'"prompt" must be a string or a list of messages, got {type(p).__name__}')
        chosen, rejected = _side(obj["chosen"], "chosen"), _side(obj["rejected"], "rejected")
    else:  # implicit prompt: the shared leading messages
        c, r = _messages(obj["chosen"], "chosen"), _messages(obj["rejected"], "rejected")
        k = 0
        while k < min(len(c), len(r)) and c[k] == r[k]:
            k += 1
        while k > 0 and c[k - 1].get("role") == "assistant":  # the response starts at an assistant turn
            k -= 1
        prompt, chosen, rejected = c[:k], c[k:], r[k:]
    if not prompt:
        raise ValueError("the pair has no prompt (no message before the responses)")
    checked = []
    for what, side in (("chosen", chosen), ("rejected", rejected)):
        if not side or side[0].get("role") != "assistant":
            raise ValueError(f'"{what}" must start with an assistant reply')
        try:
            full = record_to_messages({"messages": list(prompt) + list(side)})
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
        checked.append(full)
    n = len(prompt)
    return checked[0][:n], checked[0][n:], checked[1][n:]


# ----- encoding -------------------------------------------------------------------------------------------------

def encode_pair(encoder: ChatEncoder, prompt, chosen, rejected, source: str = "") -> tuple[Pair | None, str]:
    """Two Examples with labels only on the response -> (Pair, "ok"), or (None, "too_long" | "no_target").
    DataError for special-token text in a message."""
    n_prompt = len(encoder.tok.encode_chat(prompt, add_generation_prompt=True))  # ids before the reply's content
    sides = []
    for side in (chosen, rejected):
        ex, status = encoder.encode(list(prompt) + list(side), source)
        if ex is None:
            return None, status
        labels = np.asarray(ex.labels, dtype=np.int64)
        labels[:n_prompt] = IGNORE
        ex = Example(ex.input_ids, labels.tolist(), source)
        if ex.n_target == 0:  # the response was cut away: it did not fit
            return None, "too_long"
        sides.append(ex)
    return Pair(sides[0], sides[1], source), "ok"


def load_preferences(spec: str, tokenizer, max_seq_len: int, *, split: str = "train", eval_data: str = "",
                     eval_fraction: float = 0.0, seed: int = 0, max_examples: int = 0,
                     max_line_bytes: int = MAX_LINE_BYTES) -> tuple[PreferenceSet, PreferenceSet, list[str]]:
    """Training and evaluation pairs from data specs -> (train, eval, report lines). DataError naming every bad
    record's file and line. Not cached on disk: preference sets are small next to SFT corpora."""
    encoder = ChatEncoder(tokenizer, max_seq_len)
    report: list[str] = []
    train = _read(spec, split, encoder, max_examples, max_line_bytes, report)
    if eval_data:
        eval_set = _read(eval_data, split, encoder, 0, max_line_bytes, report)
    else:
        kept, held = split_eval(train.pairs, eval_fraction, seed)
        train, eval_set = PreferenceSet(kept), PreferenceSet(held)
        if len(eval_set):
            report.append(f"holding out {len(eval_set)} of {len(train) + len(eval_set)} pairs for evaluation")
    return train, eval_set, report


def _read(spec: str, split: str, encoder: ChatEncoder, max_examples: int, max_line_bytes: int,
          report: list[str]) -> PreferenceSet:
    bad, pairs = BadLines(), []
    for source in resolve(spec, split):
        limit = source.limit or max_examples
        kept, skipped = 0, {}
        for path in source.files:
            for where, rec in iter_records(path, max_line_bytes):
                if limit and kept >= limit:
                    break
                if isinstance(rec, BadRecord):
                    bad.add(f"{where}: {rec.reason}", source.spec)
                    continue
                try:
                    pair, status = encode_pair(encoder, *record_to_pair(rec), where)
                except (ValueError, DataError) as e:
                    bad.add(f"{where}: {e}" if not str(e).startswith(where) else str(e), source.spec)
                    continue
                if pair is None:
                    skipped[status] = skipped.get(status, 0) + 1
                    continue
                pairs.append(pair)
                kept += 1
        note = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in skipped.items())
        report.append(f"{source.spec}: {kept} preference pairs" + (f" (skipped {note})" if note else ""))
    bad.raise_if_any()
    if not pairs:
        raise DataError(f"{spec}: no usable preference pair")
    return PreferenceSet(pairs)


def collate_pairs(pairs, rows: list[list[int]], pad_id: int) -> Batch:
    """Rows of pair indices (one index per row: never packed) -> a Batch of 2 x len(rows) sequences, chosen ones
    first then rejected ones in the same order (rows i and n + i are one pair), right-padded to one width, so both
    sides of a pair go through the model in one forward."""
    idx = [row[0] for row in rows]
    examples = [pairs[i].chosen for i in idx] + [pairs[i].rejected for i in idx]
    return collate(examples, [[k] for k in range(len(examples))], pad_id)


__all__ = ["Pair", "PreferenceSet", "record_to_pair", "encode_pair", "load_preferences", "collate_pairs"]
