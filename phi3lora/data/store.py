"""Tokenized examples in three flat arrays, built in batches and cached on disk.

A store holds n examples and T tokens:
  ids      int32 (T,)    every example's token ids, one after the other
  mask     uint8 (T,)    1 where the token is a training target (labels = ids there, -100 elsewhere)
  offsets  int64 (n+1,)  example i is ids[offsets[i]:offsets[i + 1]]
plus per example its number of targets (n_target, int32: mask[1:] of the example, position 0 is never predicted) and
where it came from (a file number and a line/row number, int32 + int64). 5 bytes per token, whatever the dataset.

Building reads the records in chunks (a few MB of text), encodes each chunk with `ChatEncoder.encode_chunk`
(encoder.py: the labels and truncation rules, tokenized in one batch) and appends it to ids.bin / mask.bin: no
Python list of all ids is ever held.

The cache folder is named by a key that hashes the store format, the data files' contents and paths, the
tokenizer (tokenizer.json and its special tokens) and every setting that changes the ids (max_seq_len, train_on,
limits, max_line_bytes). A folder is written under a temporary name and renamed when complete, then memory-mapped:
a second run (or --resume) reads only the small index arrays.
"""
from __future__ import annotations

import array
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from phi3lora import atomic, console
from .encoder import ChatEncoder
from .files import MAX_LINE_BYTES, BadRecord, Source, is_text, iter_records, iter_text, open_file
from .formats import DataError, record_to_messages

STORE_VERSION = 1
MAX_SHOWN = 20  # bad lines listed in one DataError; the rest are counted
CHUNK_CHARS = 1 << 20  # text per tokenizer batch (~250k tokens): enough for the Rust threads, small next to the arrays
_WHERE = re.compile(r"^(.*?)(\d+)$")


@dataclass
class DataStats:
    """What happened to the records of one data source."""
    path: str
    lines: int = 0  # records read (non-blank lines, rows)
    kept: int = 0
    no_assistant: int = 0  # skipped: no assistant turn
    no_target: int = 0  # skipped: no trained token left
    too_long: int = 0  # skipped: not even the first assistant reply fits in max_seq_len
    truncated: int = 0  # kept, cut after the last complete assistant reply that fits
    limit: int = 0  # the source's limit, when it stopped the reading
    examples: list = field(default_factory=list, repr=False)  # "file:line: reason" of the first skipped examples

    def summary(self) -> str:
        parts = [f"{self.kept} of {self.lines} examples kept"]
        for name, n in (("no assistant turn", self.no_assistant), ("no trained token", self.no_target),
                        ("too long", self.too_long)):
            if n:
                parts.append(f"{n} skipped ({name})")
        if self.truncated:
            parts.append(f"{self.truncated} truncated after their last complete reply")
        if self.limit:
            parts.append(f"stopped at its limit of {self.limit}")
        return f"{self.path}: " + ", ".join(parts)

    def skip(self, reason: str, where: str) -> None:
        setattr(self, reason, getattr(self, reason) + 1)
        if len(self.examples) < 20:
            label = "no assistant turn" if reason == "no_assistant" else reason.replace("_", " ")
            self.examples.append(f"{where}: {label}")


class TokenStore:
    """The arrays of a built (or memory-mapped) store; see the module docstring."""

    def __init__(self, ids, mask, offsets, n_target, where_file, where_pos, prefixes: list[str], key: str,
                 content_key: str, stats: list[DataStats]):
        self.ids, self.mask, self.offsets, self.n_target = ids, mask, offsets, n_target
        self.where_file, self.where_pos, self.prefixes = where_file, where_pos, prefixes
        self.key, self.content_key, self.stats = key, content_key, stats

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def where(self, i: int) -> str:
        return f"{self.prefixes[int(self.where_file[i])]}{int(self.where_pos[i])}"


# ----- the key ------------------------------------------------------------------------------------------------

def tokenizer_hash(tokenizer) -> str:
    h = hashlib.sha256(tokenizer.backend.to_str().encode())
    h.update(json.dumps(tokenizer.special_tokens, sort_keys=True).encode())
    h.update(tokenizer.chat_format.name.encode())  # the same vocabulary renders Phi-3's or Phi-4-mini's format
    return h.hexdigest()


def file_hash(path: Path) -> str:
    with open_file(path) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def store_keys(sources: list[Source], tokenizer, max_seq_len: int, train_on: str, max_line_bytes: int
               ) -> tuple[str, str]:
    """(key, content_key): both hash the store format, the tokenizer, the settings that change the ids and the
    files' contents; the key (the cache folder's name) also hashes the files' paths, which the store records."""
    hashes = [[f, file_hash(f)] for s in sources for f in s.files]
    parts = {"version": STORE_VERSION, "tokenizer": tokenizer_hash(tokenizer), "max_seq_len": max_seq_len,
             "train_on": train_on, "max_line_bytes": max_line_bytes, "limits": [s.limit for s in sources],
             "files": [len(s.files) for s in sources], "content": [h for _, h in hashes]}
    content_key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    parts["paths"] = [str(f.resolve()) for f, _ in hashes]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32], content_key


# ----- building -----------------------------------------------------------------------------------------------

class _Writer:
    """Appends chunks to ids.bin / mask.bin in a folder; keeps the small per-example index in compact arrays."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.ids_f = open(folder / "ids.bin", "wb")
        self.mask_f = open(folder / "mask.bin", "wb")
        self.lengths, self.n_target = array.array("q"), array.array("i")
        self.where_file, self.where_pos = array.array("i"), array.array("q")
        self.prefixes: dict[str, int] = {}

    def add(self, ids: np.ndarray, mask: np.ndarray, kept) -> None:
        self.ids_f.write(ids.astype(np.int32, copy=False).tobytes())
        self.mask_f.write(mask.tobytes())
        for length, n_target, where in kept:
            prefix, num = _WHERE.match(where).groups()
            self.lengths.append(length)
            self.n_target.append(n_target)
            self.where_file.append(self.prefixes.setdefault(prefix, len(self.prefixes)))
            self.where_pos.append(int(num))

    def finish(self, key: str, content_key: str, stats: list[DataStats]) -> None:
        self.ids_f.close()
        self.mask_f.close()
        offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(np.frombuffer(self.lengths, dtype=np.int64), out=offsets[1:])
        np.save(self.folder / "offsets.npy", offsets)
        for name in ("n_target", "where_file", "where_pos"):
            np.save(self.folder / f"{name}.npy", np.frombuffer(getattr(self, name), dtype=np.int32 if name !=
                                                               "where_pos" else np.int64))
        meta = {"version": STORE_VERSION, "key": key, "content_key": content_key, "n_examples": len(self.lengths),
                "n_tokens": int(offsets[-1]), "prefixes": list(self.prefixes), "stats": [asdict(s) for s in stats]}
        (self.folder / "meta.json").write_text(json.dumps(meta))


def read_source(source: Source, max_line_bytes: int, stats: DataStats):
    """(where, messages) of a source's records with an assistant turn, in file order; a bad record gives
    (where, "where: what is wrong") instead; no-assistant records are counted in stats and not yielded."""
    for path in source.files:
        if is_text(path):  # plain text: _text_examples
            continue
        for where, rec in iter_records(path, max_line_bytes):
            stats.lines += 1
            if isinstance(rec, BadRecord):
                yield where, f"{where}: {rec.reason}"
                continue
            try:
                messages = record_to_messages(rec)
            except ValueError as e:
                yield where, f"{where}: {e}"
                continue
            if not any(m["role"] == "assistant" for m in messages):
                stats.skip("no_assistant", where)
                continue
            yield where, messages


class BadLines:
    """The bad records of a build, in file order: the first `shown` lines kept, the rest only counted."""

    def __init__(self, shown: int = MAX_SHOWN):
        self.lines: list[str] = []
        self.count, self.shown = 0, shown
        self.sources: list[str] = []  # the specs with bad records, for the heading

    def add(self, line: str, source: str) -> None:
        self.count += 1
        if len(self.lines) < self.shown:
            self.lines.append(line)
        if source not in self.sources:
            self.sources.append(source)

    def raise_if_any(self) -> None:
        raise_errors(self.lines, ", ".join(self.sources), self.count)


def raise_errors(errors: list[str], name: str, total: int | None = None) -> None:
    """DataError listing the bad lines: one alone, or "N bad lines in name:" and each on its own line (the
    first MAX_SHOWN, then how many more)."""
    total = len(errors) if total is None else total
    if total == 1:
        raise DataError(errors[0])
    if total:
        shown = errors[:MAX_SHOWN]
        more = f"\n  ... and {total - len(shown)} more" if total > len(shown) else ""
        raise DataError(f"{total} bad lines in {name}:\n  " + "\n  ".join(shown) + more)


def _build_source(source: Source, encoder: ChatEncoder, writer: _Writer, max_line_bytes: int,
                  bad: BadLines) -> DataStats:
    """Encode one source into writer. Bad records go to `bad`, all of them: every chunk is encoded even after one
    (the special-token and chat-format checks run on the token ids), and nothing more is written once one is seen."""
    stats = DataStats(source.spec)
    chunk, chars, tokens = [], 0, 0
    pending: list[tuple[int, str]] = []  # (order read, line) of the bad records since the last flush
    order: dict[str, int] = {}  # where -> order read, for the records of the chunk
    # a progress line (count, rate) once tokenizing has taken 2 s: a large set takes minutes, a small one says nothing
    meter = console.Meter(f"tokenizing {source.spec}", unit="examples", after=2.0)

    def flush() -> bool:  # True when the source's limit is reached
        nonlocal chunk, chars, tokens
        found: list[str] = []
        out = encoder.encode_chunk(chunk, found) if chunk else None
        pending.extend((_order_of(line, order), line) for line in found)
        for _, line in sorted(pending):  # the encoder's finds go back among the reader's, in file order
            bad.add(line, source.spec)
        pending.clear()
        order.clear()
        chunk, chars = [], 0
        if out is None:
            return False
        for reason, where in out.skipped:
            stats.skip(reason, where)
        stats.truncated += out.truncated
        if not out.kept:
            return False
        ids, mask, kept = out.ids, out.mask, out.kept
        if source.limit and stats.kept + len(kept) >= source.limit:
            kept = kept[: source.limit - stats.kept]
            n = sum(k[0] for k in kept)
            ids, mask, stats.limit = ids[:n], mask[:n], source.limit
        if not bad.count:  # a build with bad records is never used: only looked through for more
            writer.add(ids, mask, kept)
        stats.kept += len(kept)
        tokens += len(ids)
        meter.update(stats.lines, f"{stats.kept:,} kept, {tokens:,} tokens")
        return bool(stats.limit)

    for n, (where, item) in enumerate(read_source(source, max_line_bytes, stats)):
        if isinstance(item, str):
            pending.append((n, item))
            continue
        chunk.append((where, item))
        order[where] = n
        chars += sum(len(m["content"]) for m in item)
        if chars >= CHUNK_CHARS and flush():
            break
    else:
        flush()
    for path in [f for f in source.files if is_text(f)]:
        for ids, where in ([] if stats.limit else _text_examples(path, encoder, bad, source.spec)):
            stats.lines += 1
            if not bad.count:
                writer.add(ids, np.ones(len(ids), dtype=np.uint8), [(len(ids), len(ids) - 1, where)])
            stats.kept += 1
            tokens += len(ids)
            meter.update(stats.lines, f"{stats.kept:,} kept, {tokens:,} tokens")
            if source.limit and stats.kept >= source.limit:
                stats.limit = source.limit
                break
    meter.close(f"{stats.kept:,} kept, {tokens:,} tokens")
    if bad.count:
        return stats
    if stats.lines == 0:
        raise DataError(f"{source.spec}: the dataset is empty (no records)")
    if stats.kept == 0:
        hint = f" at max_seq_len {encoder.max_seq_len}" if stats.too_long else ""
        raise DataError(f"no usable examples in {stats.summary()}{hint}")
    return stats


def _text_examples(path: Path, encoder: ChatEncoder, bad: BadLines, spec: str):
    """(ids int32 (n,), "file:line") of one plain-text file for continued pre-training: the file's tokens, then the
    eos token (where the document ends), cut into pieces of max_seq_len tokens (the last one shorter), every token
    a target. Special-token text in it is a bad line, as in a chat's content. The text is tokenized in pieces of
    about TEXT_PIECE_BYTES cut at line ends: a tokenizer that marks word starts (Phi-3's '▁') sees one more at each
    cut, about one token in 250,000."""
    size = encoder.max_seq_len or (1 << 62)
    # the encoder's own backend (its word cache is off: a text piece is one "word" to Phi-3's BPE), through
    # encode_batch, not encode_batch_fast: the offsets (which name each piece's line) are needed here
    backend = encoder.encode_batch.__self__
    carry, carry_where = np.zeros(0, dtype=np.int32), ""  # the tokens of a piece not yet full, where it starts
    last = f"{path}:1"  # the line the text read so far ends on
    for where, text in iter_text(path):
        if isinstance(text, BadRecord):
            bad.add(f"{where}: {text.reason}", spec)
            return
        enc = backend.encode_batch([text], add_special_tokens=False)[0]
        ids, offsets = np.asarray(enc.ids, dtype=np.int32), enc.offsets
        first = int(where.rsplit(":", 1)[1])
        newlines = np.flatnonzero(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32) == 10)  # char positions

        def where_of(k: int) -> str:  # the line of token k of this piece
            return f"{path}:{first + int(np.searchsorted(newlines, offsets[k][0]))}"

        reported = set()
        for k in np.flatnonzero(encoder.special_lut[ids]):
            at = where_of(int(k))
            if at not in reported:
                reported.add(at)
                bad.add(f"{at}: the special token {encoder.special_text.get(int(ids[k]), '?')!r} in plain text: it "
                        "would be read as that token, not as text; remove or rewrite it", spec)
        stream = np.concatenate([carry, ids])
        full = len(stream) // size
        # where piece i of the stream starts: in the carry (only piece 0 can) or at a token of this text
        starts = [carry_where if i == 0 and len(carry) else where_of(i * size - len(carry))
                  for i in range(full + (full * size < len(stream)))]
        for i in range(full):
            yield stream[i * size:(i + 1) * size], starts[i]
        carry, carry_where = stream[full * size:], starts[full] if full * size < len(stream) else ""
        last = f"{path}:{first + len(newlines)}"
    stream = np.concatenate([carry, encoder.tail])  # the eos closes the document
    for i in range(0, len(stream), size):
        if len(stream[i:i + size]) >= 2:  # one token alone has no target (position 0 is never predicted)
            yield stream[i:i + size], carry_where if i == 0 and carry_where else last


def _order_of(line: str, order: dict[str, int]) -> int:
    """The read order of the record an encoder line ("where: why") is about; where may itself hold ": "."""
    at = line.find(": ")
    while at != -1:
        if line[:at] in order:
            return order[line[:at]]
        at = line.find(": ", at + 1)
    return len(order)


def build_store(sources: list[Source], tokenizer, max_seq_len: int, train_on: str, folder: Path,
                keys: tuple[str, str], max_line_bytes: int = MAX_LINE_BYTES) -> list[DataStats]:
    """Tokenize every source into `folder` (which must exist and be empty). DataError lists the bad records."""
    encoder = ChatEncoder(tokenizer, max_seq_len, train_on)
    writer, bad = _Writer(folder), BadLines()
    try:
        stats = [_build_source(s, encoder, writer, max_line_bytes, bad) for s in sources]
    finally:
        writer.ids_f.close()
        writer.mask_f.close()
    bad.raise_if_any()  # every source's bad records in one error
    writer.finish(*keys, stats)
    return stats


def open_store(folder: Path, key: str) -> TokenStore | None:
    """Memory-map a complete store folder; None when it is missing, of another key or damaged."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("version") != STORE_VERSION or meta.get("key") != key:
            return None
        n = meta["n_tokens"]
        ids = np.memmap(folder / "ids.bin", dtype=np.int32, mode="r", shape=(n,)) if n else np.zeros(0, np.int32)
        mask = np.memmap(folder / "mask.bin", dtype=np.uint8, mode="r", shape=(n,)) if n else np.zeros(0, np.uint8)
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r")
                  for name in ("offsets", "n_target", "where_file", "where_pos")}
        if len(arrays["offsets"]) != meta["n_examples"] + 1 or int(arrays["offsets"][-1]) != n:
            return None
        stats = [DataStats(**s) for s in meta["stats"]]
        return TokenStore(ids, mask, arrays["offsets"], arrays["n_target"], arrays["where_file"],
                          arrays["where_pos"], meta["prefixes"], key, meta["content_key"], stats)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cache_root(setting: str) -> Path | None:
    """data_cache: "auto" -> $XDG_CACHE_HOME (or ~/.cache)/phi3-lora/data, "off" -> None, else that folder."""
    if setting in ("off", "none", ""):
        return None
    if setting == "auto":
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "phi3-lora" / "data"
    return Path(setting).expanduser()


def load_or_build(sources: list[Source], tokenizer, max_seq_len: int, train_on: str, cache: str = "auto",
                  max_line_bytes: int = MAX_LINE_BYTES) -> tuple[TokenStore, bool]:
    """The store of these sources and settings: memory-mapped from the cache when there, else built (into the
    cache, or into a temporary folder removed once mapped) -> (store, from_cache)."""
    keys = store_keys(sources, tokenizer, max_seq_len, train_on, max_line_bytes)
    key = keys[0]
    root = cache_root(cache)
    if root is not None:
        store = open_store(root / key, key)
        if store is not None:
            return store, True
        try:
            if (root / key).exists():  # damaged (an interrupted copy, a full disk): moved away, then rebuilt
                stale = atomic.temp_sibling(root / key, "stale")
                os.replace(root / key, stale)
                atomic.remove(stale)
            tmp = atomic.make_temp_dir(root / key)  # the cache's folders follow the umask, like every output
        except OSError as e:
            warnings.warn(f"data cache {root}: cannot write there ({e.strerror}); building without a cache",
                          stacklevel=2)
            root = None
    if root is None:
        tmp = Path(tempfile.mkdtemp(prefix="phi3-lora-data-"))
    try:
        build_store(sources, tokenizer, max_seq_len, train_on, tmp, keys, max_line_bytes)
        if root is not None:
            try:
                os.replace(tmp, root / key)
            except OSError:  # another run finished the same store first: use theirs
                pass
            store = open_store(root / key, key)
        else:
            store = open_store(tmp, key)
        if store is None:
            raise DataError(f"the tokenized data written to {root or tmp} cannot be read back")
        return store, False
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # mapped files stay readable (POSIX) once unlinked


__all__ = ["DataStats", "TokenStore", "build_store", "open_store", "load_or_build", "store_keys", "cache_root",
           "read_source", "raise_errors", "BadLines",
           "tokenizer_hash"]
