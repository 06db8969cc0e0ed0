"""Writing files and folders so that a reader sees the old content or the new, never a half-written one.

The one recipe, used for every file and folder the project writes (adapters, checkpoints, merged models,
tokenizer and config files):
    1. write everything under a temporary name in the same folder (a rename is atomic only within a file system);
    2. fsync what was written (the data must be on disk before the rename makes it visible, or a power loss can
       leave the new name pointing at empty blocks);
    3. rename it into place;
    4. fsync the parent folder (the rename itself is only durable once the folder's entry is).
On any error before step 3 the temporary file or folder is removed and the old content is untouched.

A folder cannot replace a non-empty folder in one rename: `replace_dir` moves the old one aside (NAME.old-XXXXXX),
renames the new one in, then deletes the old one; if the second rename fails the old one is put back, and a crash
between the two leaves the old folder complete under NAME.old-XXXXXX.

Modes: created files and folders get the usual 0666 / 0777 minus the umask (tempfile's mkstemp/mkdtemp would give
0600 / 0700, making an adapter unreadable to the rest of a group that shares a run folder).
"""
from __future__ import annotations

import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Callable, Union

Data = Union[bytes, str, Callable[[Path], None]]


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """A name next to path that does not exist yet: NAME.tag-XXXXXX (nothing is created)."""
    while True:
        candidate = path.with_name(f"{path.name}.{tag}-{secrets.token_hex(3)}")
        if not os.path.lexists(candidate):
            return candidate


def fsync_dir(folder: Path) -> None:
    """Make the entries of folder (creations, renames, deletions) durable. Some file systems cannot open a folder
    for fsync (and Windows has no such call): skipped there, as every database does."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under folder, then every folder (deepest first), then folder itself."""
    folders = []
    for p in folder.rglob("*"):
        if p.is_symlink():
            continue
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            folders.append(p)
    for d in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(d)
    fsync_dir(folder)


def remove(path: Path) -> None:
    """Delete a file or folder if it is there; never raises (used while already handling an error)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)
    except OSError:
        pass


# ----- files --------------------------------------------------------------------------------------------------------
def write_file(path, data: Data) -> Path:
    """Replace (or create) the file path with data: bytes, str (written as UTF-8), or a function fill(tmp_path)
    that writes the file at tmp_path itself (e.g. safetensors' save_file). Returns path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        # O_EXCL: never follow a link planted under the temporary name; 0o666 & ~umask, as open() gives
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            if not callable(data):
                f.write(data.encode("utf-8") if isinstance(data, str) else bytes(data))
                f.flush()
                os.fsync(f.fileno())
        if callable(data):
            umask_mode = stat.S_IMODE(os.stat(tmp).st_mode)
            data(tmp)
            if stat.S_IMODE(os.stat(tmp).st_mode) != umask_mode:
                os.chmod(tmp, umask_mode)  # safetensors writes a fresh 0600 file in place of ours
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        remove(tmp)
        raise
    fsync_dir(path.parent)
    return path


# ----- folders ------------------------------------------------------------------------------------------------------
def make_temp_dir(final: Path) -> Path:
    """A new empty folder NAME.tmp-XXXXXX next to final, mode 0777 & ~umask."""
    final.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = temp_sibling(final)
        try:
            os.mkdir(tmp)  # 0o777 & ~umask
            return tmp
        except FileExistsError:
            continue


def replace_dir(tmp, final) -> Path:
    """Put the completely written folder tmp in place of final (which may exist: it is replaced). tmp must be in
    final's folder. On an error final is as it was and tmp is removed. Returns final."""
    tmp, final = Path(tmp), Path(final)
    try:
        fsync_tree(tmp)
    except BaseException:
        remove(tmp)
        raise
    old = None
    if os.path.lexists(final):
        old = temp_sibling(final, "old")
        try:
            os.rename(final, old)
        except BaseException:
            remove(tmp)
            raise
    try:
        os.rename(tmp, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)  # the previous content back under its name
        remove(tmp)
        raise
    fsync_dir(final.parent)
    if old is not None:
        remove(old)
    return final


def write_dir(final, fill: Callable[[Path], None]) -> Path:
    """Call fill(tmp) on a fresh empty sibling folder, then put it in place of final (see replace_dir). An error in
    fill leaves final as it was and removes tmp. Returns final."""
    final = Path(final)
    tmp = make_temp_dir(final)
    try:
        fill(tmp)
    except BaseException:
        remove(tmp)
        raise
    return replace_dir(tmp, final)
