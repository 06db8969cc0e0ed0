"""Checkpoints: out/checkpoints/step-NNNNNNN/ with adapter/ (safetensors), optimizer.pt, rng.safetensors and
trainer_state.json (written last); assembled in step-N.tmp and renamed into place, the newest keep_last kept."""
from __future__ import annotations

import json
import random
import re
import shutil
import sys
from pathlib import Path

import torch

import lora
from phi3mini import atomic

STEP_DIR = re.compile(r"step-(\d+)")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed from .tmp, holding trainer_state.json), oldest first."""
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = STEP_DIR.fullmatch(p.name)
            if m and p.is_dir() and (p / "trainer_state.json").exists():
                found.append((int(m.group(1)), p))
    return sorted(found)


def clean_partial(root: Path) -> None:
    """Remove folders left by a crash in the middle of writing a checkpoint."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.endswith(".tmp") and STEP_DIR.fullmatch(p.name[:-4]):
                log(f"removing incomplete checkpoint {p}")
                shutil.rmtree(p)


def rng_state() -> dict:
    """The torch, CUDA and Python RNG states, as a checkpoint stores them."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def save_checkpoint(root: Path, step: int, model, optimizer, lora_config, trainer_state: dict, rng: dict,
                    keep_last: int) -> Path:
    """checkpoints/step-N: adapter/ (safetensors), optimizer.pt, rng.safetensors and trainer_state.json (written
    last), assembled in step-N.tmp and renamed; then only the newest keep_last are kept. rng: the RNG states as
    they were when update N finished (see rng_state)."""
    from safetensors.torch import save_file

    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lora.save_adapter(model, tmp / "adapter", lora_config)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    save_file({k: v.contiguous() for k, v in rng.items() if k != "python"}, str(tmp / "rng.safetensors"))
    state = dict(trainer_state, python_random=rng["python"])
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    atomic.replace_dir(tmp, final)
    for _, old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old)
    return final


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
