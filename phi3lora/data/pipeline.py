"""Chat datasets for fine-tuning, and plain text for continued pre-training: read, validate, encode with label
masks, batch (optionally packed).

`load_data(...)` is the entry point train.py uses: data sources (files in the forms and formats of
data_formats.py / data_files.py, folders and globs of shards, Hub datasets; several at once, comma-separated) ->
tokenized training and evaluation sets (`TokenSet`, backed by the compact memory-mapped arrays of data_store.py, cached
on disk) and a fingerprint of the training set. `load_dataset(path, ...)` is the same for one file, returning plain
`Example` lists (tests, small scripts).

Ids and labels come from `ChatEncoder` (encoder.py), the one encoder of chats for training: per-message token
positions of each assistant reply and its closing <|end|>, never a search for a template string and never the pad
id (Phi-3's pad is its eos). Position 0 is never a target (nothing predicts it), so `n_target` counts labels[1:].
`ChatEncoder(tokenizer, max_seq_len, train_on).encode(messages)` gives one conversation's Example exactly as the
token store built by `load_data` holds it.

What is stopped and what is skipped:
- malformed JSON, an unknown role, empty or non-string content, text not in Phi-3's format, special-token text
  ("<|end|>", "<|endoftext|>", ...) inside a message, text that is not valid Unicode, a line over max_line_bytes,
  JSON nested too deeply: DataError naming file:line. Every bad line of every source is collected first, so one
  run lists them all (the first 20, then how many more);
- a conversation without an assistant turn, or one that leaves no trained token: skipped and counted;
- longer than max_seq_len: cut after the last complete assistant reply (its <|end|> included) that fits, and
  counted as truncated; when not even the first reply fits, skipped and counted as too long. A reply is never
  cut in the middle and never loses its <|end|>, so the model always learns where replies stop.

Plain text (.txt and .md files, or a folder of them: files.py): each file's tokens and the eos token, cut into
pieces of max_seq_len tokens (the last one of a file shorter), every token a target whatever train_on says;
special-token text in it is a bad line as in a chat. With packing, a file's short last piece shares a row.

Batches: right-padded with the pad id, labels -100 on padding. With packing, several examples share a row; each
keeps its own position ids (restarting at 0) and a document id, so attention stays inside the example, and the
first token of each example is never a target of the previous one.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .encoder import ChatEncoder, Example
from .files import MAX_LINE_BYTES, Source, resolve
from .formats import DataError, parse_phi3_text, record_to_messages
from .store import DataStats, TokenStore, load_or_build
from phi3lora.phi3mini.tokenizer import IGNORE, ROLES


# The default hold-out (eval_fraction 0.05) stops growing here: a few hundred examples measure the loss well enough,
# and every evaluation runs over all of them.
MAX_EVAL_EXAMPLES = 200


class TokenSet:
    """Examples of a TokenStore (all of them, or a selection `rows`), indexable like a list of Example:
    ex = tokens[i] has numpy input_ids (int32) and labels (int64, -100 where no loss)."""

    def __init__(self, store: TokenStore, rows: np.ndarray | None = None):
        self.store = store
        self.rows = np.arange(len(store), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Example:
        r = int(self.rows[i])
        a, b = int(self.store.offsets[r]), int(self.store.offsets[r + 1])
        ids = np.array(self.store.ids[a:b])  # a copy: the mapped file is read-only (torch warns on such arrays)
        labels = np.where(self.store.mask[a:b] != 0, ids, IGNORE).astype(np.int64)
        return Example(ids, labels, self.store.where(r))

    @property
    def lengths(self) -> np.ndarray:
        return self.store.lengths[self.rows]

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def n_target(self) -> int:
        return int(np.asarray(self.store.n_target)[self.rows].sum())

    def subset(self, indices) -> "TokenSet":
        return TokenSet(self.store, self.rows[np.asarray(indices, dtype=np.int64)])

    def fingerprint(self) -> str:
        """Of the data's contents, the tokenizer, the settings and the selected examples (not of the paths)."""
        h = hashlib.sha256(self.store.content_key.encode())
        h.update(self.rows.tobytes())
        return h.hexdigest()[:16]

    def to_examples(self) -> list[Example]:
        """Plain Examples with list ids and labels."""
        out = []
        for i in range(len(self)):
            ex = self[i]
            out.append(Example(ex.input_ids.tolist(), ex.labels.tolist(), ex.source))
        return out


def load_dataset(path, tokenizer, max_seq_len: int, train_on: str = "assistant", cache: str = "off",
                 max_line_bytes: int = MAX_LINE_BYTES) -> tuple[list[Example], DataStats]:
    """Read, validate and encode one data file -> (Examples with list ids, its DataStats). DataError if the
    file is malformed or nothing usable is left."""
    store, _ = load_or_build([Source(str(path), [Path(path)])], tokenizer, max_seq_len, train_on, cache,
                             max_line_bytes)
    return TokenSet(store).to_examples(), store.stats[0]


def n_held_out(n: int, fraction: float) -> int:
    """How many of n examples split_eval holds out: fraction x n rounded to the nearest whole (none when that is
    under a half, as 5% of fewer than 10 examples is), at most MAX_EVAL_EXAMPLES."""
    return min(MAX_EVAL_EXAMPLES, math.floor(fraction * n + 0.5))


def split_eval(examples, fraction: float, seed: int):
    """Hold out a seeded random fraction (n_held_out of them) for evaluation -> (train, eval). Works on a list
    (-> lists) and on a TokenSet (-> TokenSets); both keep the original order."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"eval_fraction must be in [0, 1), got {fraction}")
    n_eval = n_held_out(len(examples), fraction)
    if n_eval == 0:
        return examples, examples[:0] if isinstance(examples, list) else examples.subset([])
    if n_eval >= len(examples):
        raise DataError(f"eval_fraction {fraction} of {len(examples)} examples leaves nothing to train on")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).numpy()
    held = np.zeros(len(examples), dtype=bool)
    held[order[:n_eval]] = True
    if isinstance(examples, TokenSet):
        return examples.subset(np.flatnonzero(~held)), examples.subset(np.flatnonzero(held))
    return [e for i, e in enumerate(examples) if not held[i]], [e for i, e in enumerate(examples) if held[i]]


def fingerprint(examples) -> str:
    """A short hash of the encoded examples, to check that a resumed run sees the same data."""
    if isinstance(examples, TokenSet):
        return examples.fingerprint()
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([list(map(int, ex.input_ids)), list(map(int, ex.labels))]).encode())
    return h.hexdigest()[:16]


@dataclass
class DataSets:
    """What load_data returns: the training and evaluation sets, the training set's fingerprint, and the lines
    that say what was read (one per source, then the skipped examples and the split)."""
    train: TokenSet
    eval: TokenSet
    fingerprint: str
    report: list[str] = field(default_factory=list)
    from_cache: bool = False


def _load_sets(spec: str, split: str, tokenizer, max_seq_len: int, train_on: str, max_examples: int, cache: str,
               report: list[str], split_only: bool = False, max_line_bytes: int = MAX_LINE_BYTES
               ) -> tuple[TokenSet, bool]:
    sources = resolve(spec, split)
    if split_only:  # --eval-split of the training sources: the files named by split, not the plain files again
        sources = [s for s in sources if s.by_split]
        if not sources:
            raise DataError(f"--eval-split {split}: none of the data sources ({spec}) has splits (a Hub dataset or a "
                            "folder of split-named files); use --eval-data or --eval-fraction")
    for s in sources:
        s.limit = s.limit or max_examples
    store, cached = load_or_build(sources, tokenizer, max_seq_len, train_on, cache, max_line_bytes)
    for stats in store.stats:
        report.append(stats.summary())
        report += [f"  skipped {line}" for line in stats.examples[:3]]
    return TokenSet(store), cached


def load_data(data: str, tokenizer, max_seq_len: int, train_on: str = "assistant", *, split: str = "train",
              eval_data: str = "", eval_split: str = "", eval_fraction: float = 0.05, seed: int = 0,
              max_examples: int = 0, cache: str = "auto", max_line_bytes: int = MAX_LINE_BYTES) -> DataSets:
    """Training and evaluation sets from data specs (see data_files.py: "a.jsonl,b.parquet:500", a folder, a glob,
    a Hub dataset id). Evaluation: eval_data if given (read with eval_split, or split), else eval_split of the
    training sources when given, else a seeded eval_fraction of the training examples held out (n_held_out: at
    most MAX_EVAL_EXAMPLES; 0: no evaluation). max_examples caps each source without its own ":N". cache: "auto"
    (~/.cache/phi3-lora/data), "off", or a folder. A JSON line longer than max_line_bytes is a bad line
    (--max-line-mb).
    DataError (naming the file and line) for anything unusable."""
    report: list[str] = []
    train, cached = _load_sets(data, split, tokenizer, max_seq_len, train_on, max_examples, cache, report,
                               max_line_bytes=max_line_bytes)
    if eval_data or eval_split:
        eval_set, _ = _load_sets(eval_data or data, eval_split or split, tokenizer, max_seq_len, train_on,
                                 0 if eval_data else max_examples, cache, report, split_only=not eval_data,
                                 max_line_bytes=max_line_bytes)
    else:
        train, eval_set = split_eval(train, eval_fraction, seed)
        n = len(train) + len(eval_set)
        if len(eval_set):
            report.append(f"holding out {len(eval_set)} of {n} examples for evaluation (--eval-fraction "
                          f"{eval_fraction:g}); --eval-data FILE to choose them, --eval-fraction 0 for none")
        elif eval_fraction > 0:  # too few examples to spare one: said, not an evaluation silently missing
            report.append(f"no evaluation: {eval_fraction:g} of {n} examples rounds to none held out "
                          "(--eval-fraction); --eval-data FILE to evaluate on chosen examples")
    return DataSets(train, eval_set, fingerprint(train), report, cached)


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


def epoch_plan(examples, batch_size: int, seed: int, epoch: int, packing: bool = False,
               max_seq_len: int = 0, shuffle: bool = True) -> list[list[list[int]]]:
    order = epoch_order(len(examples), seed, epoch) if shuffle else list(range(len(examples)))
    if packing:
        lengths = examples.lengths.tolist() if isinstance(examples, TokenSet) else [len(e) for e in examples]
        rows = pack_rows(lengths, order, max_seq_len)
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
            ids[b, start:end] = torch.as_tensor(ex.input_ids)
            labels[b, start:end] = torch.as_tensor(ex.labels)
            labels[b, start] = IGNORE  # an example's first token is never a target (of the previous example)
            if packed:
                pos[b, start:end] = torch.arange(len(ex))
                doc[b, start:end] = d
            n_target += ex.n_target
            n_tokens += len(ex)
            start = end
    return Batch(ids, labels, pos, doc, n_target, n_tokens)


__all__ = ["DataError", "DataStats", "DataSets", "ChatEncoder", "Example", "TokenSet", "Batch", "ROLES", "IGNORE",
           "parse_phi3_text", "record_to_messages", "load_data", "load_dataset", "split_eval", "fingerprint",
           "n_held_out", "epoch_order", "pack_rows", "epoch_plan", "collate"]
