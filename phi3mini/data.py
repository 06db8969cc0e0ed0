"""Chat datasets for fine-tuning: read JSONL, validate, encode with label masks, batch (optionally packed).

A dataset is a JSONL file, one example a line, in any of three forms (they may be mixed):
  {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
  {"text": "<|system|>\\n...<|end|>\\n<|user|>\\n...<|end|>\\n<|assistant|>\\n...<|end|>\\n<|endoftext|>"}
      text already in Phi-3's chat format: it is parsed back into messages at the special tokens, so the labels
      still cover only the assistant replies (a leading <s> and a trailing <|endoftext|> are optional)
  {"prompt": "...", "completion": "..."}
      a user turn and an assistant reply; either side may also be a list of messages (TRL's conversational form)

Labels come from the tokenizer's per-message encoding (`Tokenizer.encode_for_training`): token positions of each
assistant reply and its closing <|end|>, never a search for a template string and never the pad id (Phi-3's pad
is its eos). Position 0 is never a target (nothing predicts it), so `n_target` counts labels[1:].

What is stopped and what is skipped:
- malformed JSON, an unknown role, empty or non-string content, text not in Phi-3's format: DataError naming
  file:line (every bad line is collected first, so one run lists them all);
- a conversation without an assistant turn, or one that leaves no trained token: skipped and counted;
- longer than max_seq_len: cut after the last complete assistant reply (its <|end|> included) that fits, and
  counted as truncated; when not even the first reply fits, skipped and counted as too long. A reply is never
  cut in the middle and never loses its <|end|>, so the model always learns where replies stop.

Batches: right-padded with the pad id, labels -100 on padding. With packing, several examples share a row; each
keeps its own position ids (restarting at 0) and a document id, so attention stays inside the example, and the
first token of each example is never a target of the previous one.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch


from .tokenizer import ROLES, check_messages

IGNORE = -100
END_ID = 32007  # <|end|>: closes every turn; the last trained token of each assistant reply

# "<|role|>\n{content}<|end|>\n" blocks of a Phi-3 chat string (the newline after each special token is optional:
# Phi-3's special tokens absorb it anyway)
_TURN = re.compile(r"<\|(system|user|assistant)\|>\n?(.*?)<\|end\|>\n?", re.DOTALL)
_SPECIAL = re.compile(r"<\|[a-z0-9_]+\|>")
_PHI3_TAG = re.compile(r"<\|(system|user|assistant|end|endoftext|placeholder\d+)\|>")  # Phi-3's special tokens


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file (and line) and what is wrong."""


# ----- reading and validating ---------------------------------------------------------------------------------

def parse_phi3_text(text: str) -> list[dict]:
    """A string in Phi-3's chat format back into messages; ValueError if it is not in that format."""
    s = text.strip()
    if s.startswith("<s>"):
        s = s[3:].lstrip()
    if s.endswith("<|endoftext|>"):
        s = s[: -len("<|endoftext|>")].rstrip()
    messages, pos = [], 0
    for m in _TURN.finditer(s):
        if m.start() != pos:
            break
        tag = _PHI3_TAG.search(m.group(2))
        if tag:  # the turn swallowed the next one: trained as reply text, the model would learn to emit <|user|>
            raise ValueError(f"{tag.group(0)} inside the {m.group(1)} turn at character {m.start(2) + tag.start()} "
                             f"(a missing <|end|>?)")
        messages.append({"role": m.group(1), "content": m.group(2)})
        pos = m.end()
    if pos != len(s) or not messages:
        rest = s[pos:pos + 40]
        tag = _SPECIAL.match(rest)
        if tag and tag.group(0) not in ("<|system|>", "<|user|>", "<|assistant|>"):
            raise ValueError(f"unknown role tag {tag.group(0)} in text at character {pos}")
        raise ValueError(f"text is not in Phi-3's chat format at character {pos} ({rest!r}...): expected "
                         "'<|user|>\\n...<|end|>\\n' / '<|assistant|>\\n...<|end|>\\n' / '<|system|>...' blocks")
    return messages


def _as_messages(value, role: str, what: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise ValueError(f'"{what}" must be a string or a list of messages, got {type(value).__name__}')


def record_to_messages(obj) -> list[dict]:
    """One parsed JSON line (any of the three forms) -> messages; ValueError says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list):
            raise ValueError(f'"messages" must be a list, got {type(messages).__name__}')
    elif "text" in obj:
        if not isinstance(obj["text"], str):
            raise ValueError(f'"text" must be a string, got {type(obj["text"]).__name__}')
        messages = parse_phi3_text(obj["text"])
    elif "prompt" in obj and "completion" in obj:
        messages = _as_messages(obj["prompt"], "user", "prompt") + \
            _as_messages(obj["completion"], "assistant", "completion")
    else:
        raise ValueError(f'expected a "messages", "text" or "prompt" + "completion" field, got keys {sorted(obj)}')
    return [{"role": role, "content": content} for role, content in check_messages(messages)]


@dataclass
class DataStats:
    """What happened to each line of a dataset file."""
    path: str
    lines: int = 0  # non-blank lines read
    kept: int = 0
    no_assistant: int = 0  # skipped: no assistant turn
    no_target: int = 0  # skipped: no trained token left
    too_long: int = 0  # skipped: not even the first assistant reply fits in max_seq_len
    truncated: int = 0  # kept, cut after the last complete assistant reply that fits
    examples: list = field(default_factory=list, repr=False)  # "file:line: reason" of each skipped example

    def summary(self) -> str:
        parts = [f"{self.kept} of {self.lines} examples kept"]
        for name, n in (("no assistant turn", self.no_assistant), ("no trained token", self.no_target),
                        ("too long", self.too_long)):
            if n:
                parts.append(f"{n} skipped ({name})")
        if self.truncated:
            parts.append(f"{self.truncated} truncated after their last complete reply")
        return f"{self.path}: " + ", ".join(parts)


def read_conversations(path, stats: DataStats | None = None) -> list[tuple[str, list[dict]]]:
    """Read and validate a JSONL file -> [(\"file:line\", messages)]. Conversations without an assistant turn are
    skipped and counted in stats; every malformed line is collected and reported together in one DataError."""
    path = Path(path)
    stats = stats if stats is not None else DataStats(str(path))
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a .jsonl file") from None
    except OSError as e:  # permission denied, ...
        raise DataError(f"{path}: cannot read it: {e.strerror}") from None
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark (Windows editors write one): not JSON
        raw = raw[3:]
    out, errors = [], []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            errors.append(f"{where}: not UTF-8 ({e.reason} at byte {e.start})")
            continue
        if not text.strip():
            continue
        stats.lines += 1
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            errors.append(f"{where}: malformed JSON: {e.msg} (column {e.colno})")
            continue
        try:
            messages = record_to_messages(obj)
        except ValueError as e:
            errors.append(f"{where}: {e}")
            continue
        if not any(m["role"] == "assistant" for m in messages):
            stats.no_assistant += 1
            stats.examples.append(f"{where}: no assistant turn")
            continue
        out.append((where, messages))
    if len(errors) == 1:
        raise DataError(errors[0])
    if errors:
        more = f"\n  ... and {len(errors) - 5} more" if len(errors) > 5 else ""
        raise DataError(f"{len(errors)} bad lines in {path}:\n  " + "\n  ".join(errors[:5]) + more)
    if stats.lines == 0:
        raise DataError(f"{path}: the dataset is empty (no JSON lines)")
    return out


# ----- encoding -----------------------------------------------------------------------------------------------

@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids: -100 where no loss, else the token id itself
    source: str = ""  # file:line

    @property
    def n_target(self) -> int:
        # position 0 is never predicted (the model shifts: token t predicts labels[t + 1])
        return sum(1 for y in self.labels[1:] if y != IGNORE)

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_example(tokenizer, messages: list[dict], max_seq_len: int, train_on: str = "assistant",
                   source: str = "") -> tuple[Example | None, str]:
    """Encode one conversation -> (Example, "ok" | "truncated"), or (None, reason) with reason one of
    "no_target", "too_long". Truncation keeps whole assistant replies only (see the module docstring)."""
    if train_on not in ("assistant", "all"):
        raise ValueError(f"train_on must be 'assistant' or 'all', got {train_on!r}")
    ids, asst = tokenizer.encode_for_training(messages, train_on="assistant")
    ids, asst = list(ids), list(asst)
    labels = asst
    if train_on == "all":
        ids_all, labels = tokenizer.encode_for_training(messages, train_on="all")
        ids_all, labels = list(ids_all), list(labels)
        if ids_all != ids:
            raise RuntimeError(f"{source}: the tokenizer encodes the conversation differently for train_on='all'")
    if len(labels) != len(ids) or any(y != IGNORE and y != t for y, t in zip(labels, ids)):
        raise RuntimeError(f"{source}: tokenizer labels are not aligned with its input ids")
    status = "ok"
    if len(ids) > max_seq_len:
        # ends of assistant replies: a trained <|end|> followed by an untrained token (or the end)
        ends = [p for p in range(min(len(ids), max_seq_len)) if asst[p] == END_ID
                and (p + 1 == len(asst) or asst[p + 1] == IGNORE)]
        if not ends:
            return None, "too_long"
        cut = ends[-1] + 1
        ids, labels, status = ids[:cut], labels[:cut], "truncated"
    ex = Example(ids, labels, source)
    if ex.n_target == 0:
        return None, "no_target"
    return ex, status


def load_dataset(path, tokenizer, max_seq_len: int, train_on: str = "assistant") -> tuple[list[Example], DataStats]:
    """Read, validate and encode a JSONL file. DataError if the file is malformed or nothing usable is left."""
    stats = DataStats(str(path))
    examples = []
    for where, messages in read_conversations(path, stats):
        try:
            ex, status = encode_example(tokenizer, messages, max_seq_len, train_on, where)
        except ValueError as e:  # the tokenizer's own validation (a role it rejects, ...)
            raise DataError(f"{where}: {e}") from None
        if ex is None:
            setattr(stats, status, getattr(stats, status) + 1)
            stats.examples.append(f"{where}: {status.replace('_', ' ')}")
            continue
        stats.truncated += status == "truncated"
        examples.append(ex)
    stats.kept = len(examples)
    if not examples:
        hint = f" at max_seq_len {max_seq_len}" if stats.too_long else ""
        raise DataError(f"no usable examples in {stats.summary()}{hint}")
    return examples, stats


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out a seeded random fraction (at least one example) for evaluation -> (train, eval)."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"eval_fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return examples, []
    n_eval = max(1, math.ceil(fraction * len(examples)))
    if n_eval >= len(examples):
        raise DataError(f"eval_fraction {fraction} of {len(examples)} examples leaves nothing to train on")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def fingerprint(examples: list[Example]) -> str:
    """A short hash of the encoded examples (ids and labels), to check that a resumed run sees the same data."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.input_ids, ex.labels]).encode())
    return h.hexdigest()[:16]


# ----- batching -----------------------------------------------------------------------------------------------
# An epoch's plan is a list of micro-batches; a micro-batch is a list of rows; a row is a list of example indices
# (one index unpacked, several when packed). Plans are cheap lists of ints, rebuilt from (seed, epoch) on resume.

def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of an epoch: a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def pack_rows(lengths: list[int], order: list[int], max_seq_len: int) -> list[list[int]]:
    """Greedy packing in the given order: start a new row when the next example does not fit."""
    rows, row, used = [], [], 0
    for i in order:
        if row and used + lengths[i] > max_seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += lengths[i]
    if row:
        rows.append(row)
    return rows


def epoch_plan(examples: list[Example], batch_size: int, seed: int, epoch: int, packing: bool = False,
               max_seq_len: int = 0, shuffle: bool = True) -> list[list[list[int]]]:
    order = epoch_order(len(examples), seed, epoch) if shuffle else list(range(len(examples)))
    if packing:
        rows = pack_rows([len(e) for e in examples], order, max_seq_len)
    else:
        rows = [[i] for i in order]
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded with the pad id
    labels: torch.Tensor  # (B, T), -100 on padding and on every untrained token
    position_ids: torch.Tensor | None = None  # (B, T) packed: restarting at 0 in each example
    document_ids: torch.Tensor | None = None  # (B, T) packed: 1, 2, ... per example, 0 on padding
    n_target: int = 0  # tokens the loss sees (labels[:, 1:] != -100)
    n_tokens: int = 0  # real (non-padding) tokens

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.position_ids), move(self.document_ids),
                     self.n_target, self.n_tokens)

    def model_kwargs(self) -> dict:
        kw = {"input_ids": self.input_ids, "labels": self.labels}
        if self.document_ids is not None:
            kw.update(position_ids=self.position_ids, document_ids=self.document_ids)
        return kw


def collate(examples: list[Example], rows: list[list[int]], pad_id: int, packed: bool = False) -> Batch:
    """Rows of example indices -> a right-padded Batch. Labels never come from the pad id: padding gets -100."""
    width = max(sum(len(examples[i]) for i in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    labels = torch.full((B, width), IGNORE, dtype=torch.long)
    pos = torch.zeros((B, width), dtype=torch.long) if packed else None
    doc = torch.zeros((B, width), dtype=torch.long) if packed else None
    n_target = n_tokens = 0
    for b, row in enumerate(rows):
        start = 0
        for d, i in enumerate(row, start=1):
            ex = examples[i]
            end = start + len(ex)
            ids[b, start:end] = torch.tensor(ex.input_ids)
            labels[b, start:end] = torch.tensor(ex.labels)
            labels[b, start] = IGNORE  # an example's first token is never a target (of the previous example)
            if packed:
                pos[b, start:end] = torch.arange(len(ex))
                doc[b, start:end] = d
            n_target += ex.n_target
            n_tokens += len(ex)
            start = end
    return Batch(ids, labels, pos, doc, n_target, n_tokens)


__all__ = ["DataError", "DataStats", "Example", "Batch", "ROLES", "IGNORE", "parse_phi3_text", "record_to_messages",
           "read_conversations", "encode_example", "load_dataset", "split_eval", "fingerprint", "epoch_order",
           "pack_rows", "epoch_plan", "collate"]
