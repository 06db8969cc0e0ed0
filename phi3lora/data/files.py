"""Where records come from: files, folders and globs of shards, and Hugging Face Hub datasets.

A data spec is one or more sources separated by commas, each optionally followed by ":N" (use its first N usable
examples):  "chats.jsonl", "a.jsonl,b.parquet:5000", "shards/*.jsonl.zst", "HuggingFaceH4/ultrachat_200k".

Files: .jsonl (also gzip- or zstd-compressed, recognized by their first bytes whatever their name), .json (a list
of records, or JSON lines), .parquet, .arrow (IPC file or stream, as `datasets` writes it) and .csv. The table
formats need pyarrow (pip install 'phi3-lora[data]'), zstd needs zstandard (the same extra).
Plain text for continued pre-training: .txt and .md files (recognized by that extension), read whole, not as
records; see `iter_text`.
A folder: every data file under it; when its files are named by split the way Hub dataset repos are
(data/train_sft-00000-of-00003.parquet, test.jsonl, train/part-0.parquet), only the requested split's files. Its
.txt/.md files count only in a folder without record files (a folder of shards keeps its README.md out of the
training data).
A Hub dataset id ("owner/name", not an existing path): the split's files are fetched with
huggingface_hub.snapshot_download (its cache and HF_HUB_OFFLINE are honoured).

`iter_records(path)` yields (where, record) with where "file:line" (JSON lines, 1-based) or "file:row N"
(tables, 0-based); a line that cannot be a record yields (where, BadRecord(reason)) so that every bad line of a
file can be listed at once. A JSON line longer than max_line_bytes (the --max-line-mb setting) is such a line:
parsing a line of N MB holds several times N in memory.
"""
from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .formats import DataError

MAX_LINE_MB = 64  # the default of --max-line-mb: a longer JSON line is refused (see max_line_reason)
MAX_LINE_BYTES = MAX_LINE_MB << 20
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".csv", ".jsonl.gz", ".json.gz", ".jsonl.zst",
                   ".json.zst", ".ndjson")
TEXT_SUFFIXES = (".txt", ".md")  # plain text: continued pre-training, loss on every token
DATA_SUFFIXES = RECORD_SUFFIXES + TEXT_SUFFIXES
TEXT_PIECE_BYTES = 1 << 20  # plain text is read and tokenized in pieces of about this size, cut at line ends
# what a data spec may name, in words (train --help): from the suffixes, so the help and the reader never disagree
SPEC_FORMS = (f"chat files ({', '.join(RECORD_SUFFIXES)}; gzip/zstd recognized by content), plain text for "
              f"continued pre-training ({', '.join(TEXT_SUFFIXES)}: loss on every token), folders of them, globs "
              "(shards/*.parquet), Hugging Face Hub dataset ids (owner/name); several joined by commas, each with an "
              "optional :N (its first N examples)")
_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}$")  # train_sft-00000-of-00003
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_GZIP, _ZSTD = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"
EXTRA_HINT = "pip install 'phi3-lora[data]' (or: pip install pyarrow zstandard)"


@dataclass
class BadRecord:
    reason: str


@dataclass
class Source:
    """One item of a data spec: its files (resolved), its name as given, and how many examples to use (0: all)."""
    spec: str
    files: list[Path]
    limit: int = 0
    by_split: bool = False  # the files were chosen by split (a Hub dataset, a folder of split-named files)


# ----- resolving a spec ---------------------------------------------------------------------------------------

def parse_spec(spec: str) -> list[tuple[str, int]]:
    """ "a.jsonl,b.parquet:500" -> [("a.jsonl", 0), ("b.parquet", 500)]."""
    out = []
    for item in (s.strip() for s in str(spec).split(",")):
        if not item:
            continue
        name, sep, n = item.rpartition(":")
        if sep and n.isdigit() and name:
            out.append((name, int(n)))
        else:
            out.append((item, 0))
    if not out:
        raise DataError("no data given: pass --data with a file, folder, glob or Hub dataset id")
    return out


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in sorted(DATA_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def split_of(rel: Path) -> str:
    """The split a file of a Hub-style dataset belongs to: data/train_sft-00000-of-00003.parquet -> train_sft,
    test.jsonl -> test, train/part-0.parquet -> train."""
    stem = rel.name[: len(rel.name) - len(_suffix(rel))]
    m = _SHARD.match(stem)
    if m:
        return m.group("split")
    if len(rel.parts) > 1 and rel.parts[-2] not in ("data", "."):
        return rel.parts[-2]
    return stem


def is_text(path: Path) -> bool:
    """A plain-text file (.txt, .md): read whole for continued pre-training, not as chat records."""
    return _suffix(path) in TEXT_SUFFIXES


def _data_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and _suffix(p) in DATA_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    records = [p for p in files if not is_text(p)]
    return records or files  # text files count only where there are no record files


def files_of_split(folder: Path, split: str, what: str) -> tuple[list[Path], bool]:
    """(the files of `split` under a Hub-style folder, True); a folder with no split names gives (all its data
    files, False)."""
    files = _data_files(folder)
    if not files:
        raise DataError(f"{what}: no data files in it (looked for {', '.join(DATA_SUFFIXES)})")
    splits: dict[str, list[Path]] = {}
    for f in files:
        splits.setdefault(split_of(f.relative_to(folder)), []).append(f)
    named = any(_SHARD.match(f.name[: len(f.name) - len(_suffix(f))]) for f in files) or \
        any(s in splits for s in ("train", "test", "validation", "train_sft", "test_sft"))
    if named and split in splits:
        return splits[split], True
    if named:
        raise DataError(f"{what}: no split {split!r}; splits found: {', '.join(sorted(splits))} "
                        "(choose one with --data-split / --eval-split)")
    return files, False  # a plain folder of shards


def _from_hub(repo_id: str, split: str) -> list[Path]:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as e:  # a runtime dependency: only a broken install gets here
        raise DataError(f"{repo_id}: reading Hub datasets needs huggingface_hub ({e})") from None
    patterns = [f"{split}-*", f"*/{split}-*", f"{split}.*", f"*/{split}.*", f"{split}/*", f"*/{split}/*"]
    try:
        folder = Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise DataError(f"{repo_id}: no such dataset on the Hub (or it is private or gated: log in with "
                        "`hf auth login`), and no such local file or folder") from None
    except LocalEntryNotFoundError:
        raise DataError(f"{repo_id}: no such local file or folder, and not in the Hugging Face cache while the Hub "
                        "cannot be reached (HF_HUB_OFFLINE set, or no network); download it once online, or pass a "
                        "local path") from None
    except Exception as e:  # network errors, HTTP errors, revision errors
        raise DataError(f"{repo_id}: cannot fetch it from the Hub ({type(e).__name__}: {e})") from None
    if not _data_files(folder):
        found = _hub_splits(repo_id)
        hint = f"; splits found: {', '.join(found)}" if found else ""
        raise DataError(f"{repo_id}: no files for split {split!r}{hint} (choose one with --data-split)")
    return files_of_split(folder, split, repo_id)[0]


def _hub_splits(repo_id: str) -> list[str]:
    try:
        from huggingface_hub import HfApi
        files = HfApi().list_repo_files(repo_id, repo_type="dataset")
    except Exception:  # offline: nothing more to say than "not this split"
        return []
    return sorted({split_of(Path(f)) for f in files if _suffix(Path(f)) in RECORD_SUFFIXES})


def resolve(spec: str, split: str = "train") -> list[Source]:
    """A data spec -> its sources, each with its files in a fixed (sorted) order. DataError when a source is
    missing or holds no data file."""
    sources = []
    for name, limit in parse_spec(spec):
        path, by_split = Path(name).expanduser(), False
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files, by_split = files_of_split(path, split, name)
        elif glob.has_magic(name):
            files = sorted(Path(p) for p in glob.glob(os.path.expanduser(name), recursive=True)
                           if Path(p).is_file())
            if not files:
                raise DataError(f"{name}: no file matches this pattern")
        elif _HUB_ID.match(name) and not name.startswith((".", "/", "~")) and _suffix(path) not in DATA_SUFFIXES:
            files, by_split = _from_hub(name, split), True
        else:
            raise DataError(f"{name}: no such file")
        sources.append(Source(name, files, limit, by_split))
    return sources


# ----- reading records ----------------------------------------------------------------------------------------

def open_file(path: Path):
    """The file opened for reading bytes; DataError naming it when that fails."""
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a data file") from None
    except OSError as e:  # permission denied, ...
        raise DataError(f"{path}: cannot read it: {e.strerror}") from None


def _open_binary(path: Path):
    """The file's bytes, decompressed when it starts like gzip or zstd (whatever its name)."""
    raw = open_file(path)
    head = raw.read(4)
    raw.seek(0)
    if head[:2] == _GZIP:
        return gzip.GzipFile(fileobj=raw)
    if head == _ZSTD:
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise DataError(f"{path}: zstd-compressed; reading it needs zstandard: {EXTRA_HINT}") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return raw


def _parse_line(line: bytes, where: str):
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRecord(f"not UTF-8 ({e.reason} at byte {e.start})")
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return BadRecord(f"malformed JSON: {e.msg} (column {e.colno})")
    except RecursionError:
        return BadRecord("JSON nested too deeply to be a chat record")


def _skip_rest_of_line(f) -> None:
    while True:
        chunk = f.readline(1 << 20)
        if not chunk or chunk.endswith(b"\n"):
            return


def max_line_reason(max_line_bytes: int) -> str:
    """Why a line over the limit is refused, naming the setting that raises it."""
    mb = max_line_bytes / (1 << 20)
    size = f"{mb:g} MB" if max_line_bytes % (1 << 20) == 0 else f"{max_line_bytes:,} bytes"
    return f"line longer than {size}: over --max-line-mb {mb:g} (raise it to read this line)"


def iter_json_lines(path: Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[str, object]]:
    """(where, record | BadRecord) for each non-blank line, streamed: the file is never held whole."""
    with _open_binary(path) as f:
        try:
            for lineno in range(1, 1 << 62):
                line = f.readline(max_line_bytes + 1)
                if not line:
                    return
                where = f"{path}:{lineno}"
                if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark: not JSON
                    line = line[3:]
                if len(line) > max_line_bytes and not line.endswith(b"\n"):
                    _skip_rest_of_line(f)
                    yield where, BadRecord(max_line_reason(max_line_bytes))
                    continue
                rec = _parse_line(line, where)
                if rec is not None:
                    yield where, rec
        except (OSError, EOFError) as e:  # a truncated or corrupt gzip/zstd stream
            raise DataError(f"{path}: cannot decompress it ({e})") from None


def _iter_json_file(path: Path, max_line_bytes: int) -> Iterator[tuple[str, object]]:
    """A .json file: a list of records; a file that is JSON lines after all is read as such."""
    with _open_binary(path) as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"["):
        yield from iter_json_lines(path, max_line_bytes)
        return
    with _open_binary(path) as f:
        raw = f.read()
    rec = _parse_line(raw, str(path))
    if isinstance(rec, BadRecord):
        raise DataError(f"{path}: {rec.reason}")
    for i, item in enumerate(rec or []):
        yield f"{path}:record {i}", item


def _pyarrow(path: Path, what: str):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise DataError(f"{path}: reading {what} files needs pyarrow: {EXTRA_HINT}") from None
    import pyarrow as pa
    return pa


def _iter_batches(path: Path, suffix: str):
    pa = _pyarrow(path, suffix)
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        yield from pq.ParquetFile(path).iter_batches(batch_size=1024)
    elif suffix == ".csv":
        import pyarrow.csv as pcsv
        yield from pcsv.read_csv(path).to_batches(1024)
    else:  # .arrow: the IPC file format, or the stream format `datasets` writes
        with pa.memory_map(str(path)) as source:
            try:
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:
                source.seek(0)
                batches = pa.ipc.open_stream(source)
            yield from batches


def iter_table_rows(path: Path, suffix: str) -> Iterator[tuple[str, object]]:
    row = 0
    try:
        for batch in _iter_batches(path, suffix):
            for rec in batch.to_pylist():
                yield f"{path}:row {row}", rec
                row += 1
    except DataError:
        raise
    except Exception as e:  # pyarrow's ArrowInvalid / OSError for a file that is not what its name says
        raise DataError(f"{path}: not a readable {suffix} file ({type(e).__name__}: {e})") from None


def iter_text(path: Path, piece_bytes: int = TEXT_PIECE_BYTES) -> Iterator[tuple[str, str | BadRecord]]:
    """(where, text) pieces of a plain-text file (gzip or zstd too), about piece_bytes each and cut at line ends (in
    the middle of a longer line only); where is "file:line" of the piece's first line. Text that is not UTF-8 gives
    (where of its line, BadRecord) and ends the file."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with _open_binary(path) as f:
        try:
            head = True
            while True:
                raw = f.read(piece_bytes)
                if raw and not raw.endswith(b"\n"):
                    raw += f.readline(piece_bytes)  # on to the end of the line
                if head and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark: not text
                    raw = raw[3:]
                head = False
                try:
                    text = decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as e:
                    at = line + raw[:max(e.start, 0)].count(b"\n")
                    yield f"{path}:{at}", BadRecord(f"not UTF-8 ({e.reason}); plain-text data must be UTF-8")
                    return
                if not raw:
                    return
                if text:
                    yield f"{path}:{line}", text
                line += raw.count(b"\n")
        except (OSError, EOFError) as e:  # a truncated or corrupt gzip/zstd stream
            raise DataError(f"{path}: cannot decompress it ({e})") from None


def iter_records(path: Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[str, object]]:
    """(where, record | BadRecord) for every record of one file."""
    suffix = _suffix(path)
    if suffix in (".parquet", ".arrow", ".csv"):
        return iter_table_rows(path, suffix)
    if suffix in (".json", ".json.gz", ".json.zst"):
        return _iter_json_file(path, max_line_bytes)
    return iter_json_lines(path, max_line_bytes)


__all__ = ["BadRecord", "Source", "MAX_LINE_BYTES", "MAX_LINE_MB", "open_file", "parse_spec", "resolve", "split_of",
           "files_of_split", "iter_records", "iter_json_lines", "iter_text", "is_text"]
