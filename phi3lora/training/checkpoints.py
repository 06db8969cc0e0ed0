"""Checkpoints: out/checkpoints/step-NNNNNNN/ with adapter/ (safetensors), optimizer.pt, rng.safetensors,
trainer_state.json and, written last, manifest.json (every other file with its size and SHA-256).

A checkpoint counts as complete only when its manifest is there and every file it lists has the listed size
(resume also compares the hashes): a crash, a full disk or a half-finished deletion can leave a step-N folder
behind, and it is then skipped, with the reason said, never loaded. The folder is assembled as step-N.tmp and
renamed into place; an old checkpoint is deleted by renaming it to .deleting-step-N first, so a half-deleted one is
never listed. Leftovers (.tmp, .deleting-, .old-, empty step-N folders) go at the next run's start.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path

import torch

from phi3lora import lora
from phi3lora import atomic, console

STEP_DIR = re.compile(r"step-(\d+)")
LEFTOVER = re.compile(r"(step-\d+\.(tmp|old-\w+|tmp-\w+))|(\.deleting-step-\d+)")
MANIFEST = "manifest.json"
NEEDED = ("adapter/", "optimizer.pt", "rng.safetensors", "trainer_state.json")  # files, or a folder with files


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


# ----- what is there ------------------------------------------------------------------------------------------------
def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Every step-N folder, complete or not, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def problem(path: Path, hashes: bool = False) -> str | None:
    """Why the checkpoint at path is not complete, or None when it is. hashes: also compare every file's SHA-256
    (reads everything; sizes alone catch missing and truncated files)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the checkpoint was never finished, or predates manifests)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for need in NEEDED:
        if not any(name == need or name.startswith(need) for name in files):
            return f"its manifest lists no {need.rstrip('/')}"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size} bytes, its manifest says {want['bytes']} (truncated?)"
        if hashes and sha256(f) != want["sha256"]:
            return f"{name} does not match its manifest's SHA-256 (damaged)"
    return None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (see problem), oldest first."""
    return [(step, p) for step, p in step_dirs(root) if problem(p) is None]


def newest_complete(root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that is whole, hashes included, and a line for each newer one skipped and why."""
    skipped = []
    for _, path in reversed(step_dirs(root)):
        why = problem(path, hashes=True)
        if why is None:
            return path, skipped
        skipped.append(f"{path.name}: {why}")
    return None, skipped


def clean_leftovers(root: Path) -> None:
    """Remove what an interrupted run left: half-written (.tmp) and half-deleted (.deleting-) checkpoints, folders
    moved aside while replacing one (.old-), and empty step-N folders."""
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        empty_step = STEP_DIR.fullmatch(p.name) and p.is_dir() and not any(p.iterdir())
        if LEFTOVER.fullmatch(p.name) or empty_step:
            console.info(f"removing incomplete checkpoint folder {p}")
            atomic.remove(p)


def delete_checkpoint(path: Path) -> None:
    """Rename away first (a crash mid-deletion leaves .deleting-step-N, never a listed, half-deleted step-N)."""
    doomed = path.with_name(".deleting-" + path.name)
    atomic.remove(doomed)
    path.rename(doomed)
    shutil.rmtree(doomed)


def delete_old(root: Path, keep_last: int, newest_step: int) -> None:
    """Keep the newest keep_last complete checkpoints; delete every other folder up to newest_step (incomplete ones
    after it are left: the run will write those steps again)."""
    keep = {p for _, p in list_checkpoints(root)[-keep_last:]}
    for step, path in step_dirs(root):
        if path not in keep and step <= newest_step:
            delete_checkpoint(path)


# ----- writing and reading ------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def rng_state() -> dict:
    """The torch, CUDA and Python RNG states, as a checkpoint stores them."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def save_checkpoint(root: Path, step: int, model, optimizer, lora_config, trainer_state: dict, rng: dict,
                    keep_last: int, fingerprint: dict | None = None) -> Path:
    """checkpoints/step-N: adapter/, optimizer.pt, rng.safetensors, trainer_state.json, then manifest.json,
    assembled in step-N.tmp and renamed; then only the newest keep_last are kept. rng: the RNG states as they
    were when update N finished (see rng_state). A write error (disk full) in any file removes step-N.tmp and
    raises CheckpointWriteError naming the file; older checkpoints are left as they are.
    fingerprint: the base's, as lora.save_adapter takes it."""
    from safetensors.torch import save_file

    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    atomic.remove(tmp)
    tmp.mkdir(parents=True)
    tensors = {k: v.contiguous() for k, v in rng.items() if k != "python"}
    state = dict(trainer_state, python_random=rng["python"])
    writes = [  # (the file, how it is written), in order; the manifest last, over what the others wrote
        ("adapter/", lambda: lora.save_adapter(model, tmp / "adapter", lora_config, fingerprint)),
        ("optimizer.pt", lambda: torch.save(optimizer.state_dict(), tmp / "optimizer.pt")),
        ("rng.safetensors",  # atomic.write_file: the umask's mode, not safetensors' 0600
         lambda: atomic.write_file(tmp / "rng.safetensors", lambda p: save_file(tensors, str(p)))),
        ("trainer_state.json", lambda: (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))),
        (MANIFEST, lambda: write_manifest(tmp)),
    ]
    for name, write in writes:
        try:
            write()
        except Exception as e:
            if not is_write_error(e):  # a crash, as a kill would be: the .tmp folder goes at the next start
                raise
            atomic.remove(tmp)  # free the space now; the older checkpoints stay as they are
            raise CheckpointWriteError(name.rstrip("/"), e) from e
    try:
        atomic.replace_dir(tmp, final)
    except OSError as e:
        atomic.remove(tmp)
        raise CheckpointWriteError(final.name, e) from e
    delete_old(root, keep_last, step)
    return final


class CheckpointWriteError(Exception):
    """One file of a checkpoint could not be written (disk full, quota, read-only, an I/O error); the partial
    folder is gone. file: its name inside the checkpoint; reason: the system's words."""

    def __init__(self, file: str, cause: BaseException):
        self.file, self.cause = file, cause
        if isinstance(cause, OSError) and cause.strerror:
            self.reason = cause.strerror
        else:
            self.reason = (str(cause).strip().splitlines() or [type(cause).__name__])[-1][:200]
        super().__init__(f"{file}: {self.reason}")


def is_write_error(e: BaseException) -> bool:
    """A failure to write a file (disk full, quota, read-only...), whichever library raised it."""
    if isinstance(e, OSError):
        return True
    if type(e).__name__ == "SafetensorError":  # safetensors wraps the OS error
        return True
    text = str(e).lower()
    # torch.save's zip writer: "file write failed", or on a full disk "[enforce fail at inline_container.cc] ...
    # unexpected pos N vs M" (the bytes it could write fell short)
    return isinstance(e, RuntimeError) and (("write" in text and "fail" in text) or "inline_container" in text)


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / "trainer_state.json").read_text())


def load_checkpoint(path: Path, model, optimizer, device) -> dict:
    """Restore the adapter, optimizer and RNG states from a checkpoint; returns its trainer_state.json."""
    from safetensors.torch import load_file

    lora.load_adapter(model, path / "adapter")
    # only a file this program wrote itself, and still without pickle's arbitrary code
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    cuda = [rng[f"cuda_{i}"] for i in range(len(rng) - 1) if f"cuda_{i}" in rng]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    state = read_trainer_state(path)
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return state
