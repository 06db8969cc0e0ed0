"""Fine-tune Phi-3 with LoRA on a chat dataset.

    python train.py --config configs/tiny.toml                       # the CPU demo: tiny model, sample data
    python train.py --config configs/phi3-mini-lora.toml --data chats.jsonl --out out/mine
    python train.py --config configs/phi3-mini-lora.toml --data chats.jsonl --out out/mine --resume

Reads top to bottom: defaults, argument parsing, setup, data, schedule, loop, save. Every key of the [training]
and [lora] sections of a TOML config is also a command-line flag (--max-steps, --lora-r, ...; booleans take
--flag / --no-flag); the command line wins over the file, the file over DEFAULTS below. DEFAULTS follow the
official Phi-3 sample fine-tune (r 16, alpha 32, dropout 0.05, every linear projection, bf16 on GPU, cosine
schedule, warmup ratio 0.2, batch 4, max length 2048, packing, gradient checkpointing) with a LoRA learning rate.

The loss of an optimizer step is the summed cross-entropy of all its micro-batches divided by the number of target
tokens of the whole accumulated batch, so batch 8 x accumulation 1 and batch 1 x accumulation 8 give the same
gradients. Warmup: warmup_steps if > 0, else ceil(warmup_ratio x total steps); the lr rises linearly to lr over the
warmup steps, then decays (cosine or linear) towards min_lr.

Output folder: config.toml (the resolved configuration), metrics.jsonl (one line per step), loss.svg,
checkpoints/step-NNNNNNN/ (adapter, optimizer, RNG and data position; written to a .tmp folder and renamed, the
last keep_last kept), adapter/ (the final adapter, lora.save_adapter format), adapter-peft/ (--export-peft),
merged/ (--merge: base + adapter in the Hugging Face layout, tokenizer beside it).

Exit codes: 0 done; 2 a problem with the input or configuration, or a NaN/inf loss, printed as "error: ..."
(a NaN stops before the bad update, so the last checkpoint is the last good state); 130 interrupted by Ctrl-C:
the first Ctrl-C finishes the current step, saves a checkpoint and exits (continue with --resume), a second one
stops at once (still saving the last completed step when that is safe).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import tomllib
from pathlib import Path

import torch

import lora
from phi3mini import Phi3, Tokenizer, atomic, hub
from phi3mini.data import DataError, collate, epoch_plan, fingerprint, load_dataset, split_eval

# ----- defaults ---------------------------------------------------------------------------------------------------
DEFAULTS = {
    "training": {
        "model": "microsoft/Phi-3-mini-4k-instruct", "data": "data/sample_chat.jsonl", "eval_data": "",
        "eval_fraction": 0.0, "out": "out/phi3-lora",
        "epochs": 1, "max_steps": 0, "batch_size": 4, "grad_accum": 1, "max_seq_len": 2048,
        "train_on": "assistant", "packing": True,
        "lr": 2e-4, "min_lr": 0.0, "schedule": "cosine", "warmup_ratio": 0.2, "warmup_steps": 0,
        "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8, "max_grad_norm": 1.0,
        "dtype": "auto", "device": "auto", "kernels": "auto", "grad_checkpointing": True, "compile": False,
        "seed": 0, "log_every": 10, "eval_every": 100, "save_every": 100, "keep_last": 2,
        "resume": False, "overwrite": False, "export_peft": False, "merge": False,
    },
    "lora": {
        "r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
        "target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        "enable_lora": [True, True, True], "bias": "none", "use_rslora": False,
    },
}
HELP = {
    "model": "Hub id, local folder in the Hugging Face layout, or 'tiny' (built-in random model)",
    "data": "training JSONL: messages, text (Phi-3 format) or prompt/completion per line",
    "eval_data": "evaluation JSONL; when empty, eval_fraction of data is held out",
    "eval_fraction": "fraction of data held out for evaluation when eval_data is empty",
    "out": "output folder",
    "epochs": "passes over the data (when max_steps is 0)",
    "max_steps": "optimizer steps; > 0 overrides epochs",
    "batch_size": "sequences per micro-batch (packed rows with packing)",
    "grad_accum": "micro-batches per optimizer step",
    "max_seq_len": "longer examples are cut after their last whole reply that fits, or skipped",
    "train_on": "assistant: loss on the replies and their <|end|>; all: on every token",
    "packing": "pack several examples in a row (attention stays inside each)",
    "lr": "peak learning rate", "min_lr": "learning rate at the end of the decay",
    "schedule": "decay after warmup", "warmup_ratio": "warmup steps as a fraction of all steps",
    "warmup_steps": "warmup steps; > 0 overrides warmup_ratio",
    "weight_decay": "AdamW weight decay", "adam_beta1": "AdamW beta1", "adam_beta2": "AdamW beta2",
    "adam_eps": "AdamW eps", "max_grad_norm": "gradient clipping; 0 turns it off",
    "dtype": "base weights and autocast: auto = bf16 on CUDA, fp32 on CPU (LoRA weights are fp32 always)",
    "device": "auto, cpu, cuda or cuda:N", "kernels": "Triton kernels: auto = on for CUDA",
    "grad_checkpointing": "non-reentrant activation checkpointing", "compile": "torch.compile each block",
    "seed": "adapter init, data order, dropout", "log_every": "progress line every N steps (not on a terminal)",
    "eval_every": "evaluate every N steps (and at the end); 0: only at the end",
    "save_every": "checkpoint every N steps (and at the end); 0: only at the end",
    "keep_last": "checkpoints kept", "resume": "continue from the newest complete checkpoint in out",
    "overwrite": "start afresh in an out folder that holds checkpoints",
    "export_peft": "also write the adapter in PEFT's format (out/adapter-peft)",
    "merge": "also write base + adapter merged, Hugging Face layout (out/merged)",
    "r": "LoRA rank", "lora_alpha": "LoRA scaling numerator (scale alpha/r)", "lora_dropout": "dropout on LoRA input",
    "target_modules": "layers that get LoRA", "enable_lora": "LoRA on the q, k, v slices of qkv_proj",
    "bias": "biases to train (Phi-3 has none)", "use_rslora": "scale alpha/sqrt(r)",
}
CHOICES = {"train_on": ("assistant", "all"), "schedule": ("cosine", "linear", "constant"),
           "dtype": ("auto", "bf16", "fp32"), "kernels": ("auto", "on", "off"), "bias": ("none", "all", "lora_only")}
POSITIVE = ("batch_size", "grad_accum", "max_seq_len", "keep_last", "epochs", "r")
NON_NEGATIVE = ("max_steps", "warmup_steps", "eval_every", "save_every", "lr", "min_lr", "weight_decay",
                "max_grad_norm", "warmup_ratio", "lora_dropout", "log_every")
# changing these between a run and its --resume would change the data order or the adapter
RESUME_FIXED = ("model", "seed", "batch_size", "grad_accum", "packing", "max_seq_len", "train_on")


class TrainError(Exception):
    """A problem the user can fix; main() prints it as "error: ..." and exits with status 2."""


# ----- argument parsing -------------------------------------------------------------------------------------------
def flag_for(section: str, key: str) -> str:
    if section == "lora":
        return "--lora-" + key.removeprefix("lora_").replace("_", "-")
    return "--" + key.replace("_", "-")


def _list_arg(default: list):
    def parse(text: str):
        items = [s.strip() for s in text.split(",") if s.strip()]
        if default and isinstance(default[0], bool):
            bools = {"true": True, "1": True, "false": False, "0": False}
            if any(s.lower() not in bools for s in items):
                raise argparse.ArgumentTypeError(f"expected a comma-separated list of true/false, got {text!r}")
            return [bools[s.lower()] for s in items]
        return items
    return parse


def coerce(section: str, key: str, value, where: str):
    """A config value checked against the type of its default (ints are accepted for floats)."""
    default = DEFAULTS[section][key]
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, type(default[0])) for v in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise TrainError(f"{where}: [{section}] {key} must be {type(default).__name__}, got {value!r}")
    return value


def parse_config(argv=None) -> dict:
    """DEFAULTS, then the --config TOML file, then command-line flags -> {"training": {...}, "lora": {...}}."""
    p = argparse.ArgumentParser(description="Fine-tune Phi-3 with LoRA on a chat dataset (JSONL).")
    p.add_argument("--config", metavar="FILE", help="TOML file with [training] and [lora] sections")
    for section, keys in DEFAULTS.items():
        group = p.add_argument_group(f"[{section}]")
        for key, default in keys.items():
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            kw = dict(dest=f"{section}.{key}", default=None, help=f"{HELP[key]} (default: {shown})".replace("%", "%%"))
            if isinstance(default, bool):
                kw["action"] = argparse.BooleanOptionalAction
            elif isinstance(default, list):
                kw.update(type=_list_arg(default), metavar="A,B,...")
            else:
                kw["type"] = type(default)
                if key in CHOICES:
                    kw["choices"] = CHOICES[key]
                else:
                    kw["metavar"] = type(default).__name__.upper()
            group.add_argument(flag_for(section, key), **kw)
    args = vars(p.parse_args(argv))

    cfg = copy.deepcopy(DEFAULTS)
    if args["config"]:
        path = Path(args["config"])
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise TrainError(f"{path}: no such config file") from None
        except (OSError, UnicodeDecodeError) as e:  # a folder, no permission, not text
            raise TrainError(f"{path}: cannot read the config file ({e})") from None
        except tomllib.TOMLDecodeError as e:
            raise TrainError(f"{path}: not valid TOML ({e})") from None
        for section, values in data.items():
            if section not in DEFAULTS or not isinstance(values, dict):
                raise TrainError(f"{path}: unknown section [{section}] (expected [training] and [lora])")
            for key, value in values.items():
                if key not in DEFAULTS[section]:
                    raise TrainError(f"{path}: unknown key {key!r} in [{section}]; "
                                     f"known: {', '.join(DEFAULTS[section])}")
                cfg[section][key] = coerce(section, key, value, str(path))
    for dest, value in args.items():
        if dest != "config" and value is not None:
            section, key = dest.split(".")
            cfg[section][key] = value
    check_config(cfg)
    return cfg


def check_config(cfg: dict) -> None:
    for section, values in cfg.items():
        for key, value in values.items():
            where = f"[{section}] {key} ({flag_for(section, key)})"
            if key in CHOICES and value not in CHOICES[key]:
                raise TrainError(f"{where} must be one of {', '.join(CHOICES[key])}, got {value!r}")
            if key in POSITIVE and value <= 0:
                raise TrainError(f"{where} must be > 0, got {value}")
            if key in NON_NEGATIVE and value < 0:
                raise TrainError(f"{where} must be >= 0, got {value}")
    t = cfg["training"]
    if not 0.0 <= t["eval_fraction"] < 1.0:
        raise TrainError(f"[training] eval_fraction must be in [0, 1), got {t['eval_fraction']}")
    if t["warmup_ratio"] >= 1.0:
        raise TrainError(f"[training] warmup_ratio must be < 1, got {t['warmup_ratio']}")
    if len(cfg["lora"]["enable_lora"]) != 3:
        raise TrainError("[lora] enable_lora needs three booleans (q, k, v)")


def to_toml(cfg: dict) -> str:
    """The resolved configuration as TOML that --config reads back."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a valid TOML basic string
        return repr(v)
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {val(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


# ----- setup --------------------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resolve_device_dtype(t: dict) -> tuple[torch.device, torch.dtype]:
    name = t["device"]
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainError(f"--device {name}: not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: CUDA is not available on this machine")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(t["dtype"])
    if dtype is None:  # auto
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def keep_freed_cpu_memory() -> None:
    """Let glibc keep large freed blocks for reuse instead of handing them back to the kernel.

    By default every block above the mmap threshold (a few MB, 32 MB at most) is a fresh mapping, returned on
    free: each step's large tensors (the logits alone are batch x length x 32064 floats) then come back as new
    pages the kernel has to fault in and zero again. On the 2-core CPU that was 60% of the tiny demo's time
    (32 s -> 13 s with this). The process keeps its peak footprint instead, which a training run reaches every
    step anyway. glibc only; elsewhere nothing changes."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def load_tokenizer(name: str) -> Tokenizer:
    try:
        return hub.load_tokenizer(name)
    except hub.ERRORS as e:
        raise TrainError(f"--model {name}: cannot load its tokenizer: {e}") from None


def load_base(name: str, dtype: torch.dtype, device: torch.device) -> Phi3:
    """The frozen base model: "tiny", a local folder in the Hugging Face layout, or a Hub id (phi3mini.hub)."""
    try:
        return hub.load_model(name, dtype=dtype, device=device)
    except hub.ERRORS as e:
        raise TrainError(f"--model {name}: {e}") from None


def build_model(t: dict, lc: dict, device: torch.device, dtype: torch.dtype):
    """Base model + LoRA on the target modules, only LoRA trainable (in fp32) -> model, LoraConfig, trainable
    parameters. The adapter's random A comes from torch's global RNG: seed it first."""
    model = load_base(t["model"], dtype, device)
    lora_config = lora.LoraConfig(r=lc["r"], lora_alpha=lc["lora_alpha"], lora_dropout=lc["lora_dropout"],
                                  target_modules=tuple(lc["target_modules"]), enable_lora=tuple(lc["enable_lora"]),
                                  bias=lc["bias"], use_rslora=lc["use_rslora"])
    lora.inject(model, lora_config)
    lora.mark_only_lora_as_trainable(model, lora_config.bias)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainError(f"[lora] target_modules {lc['target_modules']} matched no layer of the model")
    for p in params:  # the trained weights (and so the optimizer state) in fp32, whatever the base dtype
        p.data = p.data.float()
    model.gradient_checkpointing = t["grad_checkpointing"]
    if t["kernels"] == "on" or (t["kernels"] == "auto" and device.type == "cuda"):
        # the fused loss multiplies by lm_head.weight itself: it would skip (and never train) an lm_head adapter
        model.set_kernels(True, fused_ce=not isinstance(model.lm_head, lora.LoRALayer))
    if t["compile"]:
        for block in model.model.layers:
            block.compile()
    return model.train(), lora_config, params


def autocast(device: torch.device, dtype: torch.dtype):
    # bf16 autocast: matmuls in bf16, the fp32 LoRA weights stay fp32 for the optimizer
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ----- schedule ----------------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float, schedule: str) -> float:
    """Learning rate of update number `step` (0-based): linear warmup to lr, then decay towards min_lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, total - warmup)  # 0 at the first decayed step, < 1 at the last
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr + (lr - min_lr) * (1.0 - progress)


# ----- one step -----------------------------------------------------------------------------------------------------
def micro_step(model, batch, n_target_total: int, amp) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns its summed loss. Dividing by the target tokens of the whole
    accumulated batch (not this micro-batch's) weights every target token equally, whatever the lengths."""
    with amp:
        loss_sum = model(**batch.model_kwargs(), loss_reduction="sum")
    (loss_sum / n_target_total).backward()
    return loss_sum.detach().float()


@torch.no_grad()
def evaluate(model, examples, batch_size: int, pad_id: int, device, amp) -> float:
    """Mean loss per target token over the eval set, always unpacked."""
    was_training = model.training
    model.eval()
    total, n = torch.zeros((), device=device), 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples, [[j] for j in range(i, min(i + batch_size, len(examples)))], pad_id).to(device)
        with amp:
            total += model(**batch.model_kwargs(), loss_reduction="sum").float()
        n += batch.n_target
    model.train(was_training)
    return float(total) / n


# ----- checkpoints --------------------------------------------------------------------------------------------------
CKPT = re.compile(r"step-(\d+)")


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed from .tmp, holding trainer_state.json), oldest first."""
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = CKPT.fullmatch(p.name)
            if m and p.is_dir() and (p / "trainer_state.json").exists():
                found.append((int(m.group(1)), p))
    return sorted(found)


def clean_partial(root: Path) -> None:
    """Remove folders left by a crash in the middle of writing a checkpoint."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.endswith(".tmp") and CKPT.fullmatch(p.name[:-4]):
                log(f"removing incomplete checkpoint {p}")
                shutil.rmtree(p)


def rng_state() -> dict:
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

    final = root / f"step-{step:07d}"
    tmp = root / f"step-{step:07d}.tmp"
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
    state = json.loads((path / "trainer_state.json").read_text())
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return state


# ----- reporting ----------------------------------------------------------------------------------------------------
def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except ImportError:
        return float("nan")


class Progress:
    """One status line on stderr: redrawn in place on a terminal, else printed every `every` steps."""

    def __init__(self, total: int, every: int):
        self.total, self.every = total, max(1, every)
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()

    def update(self, step: int, rec: dict, steps_done: int) -> None:
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(1, steps_done) * (self.total - step)
        line = (f"step {step}/{self.total} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
                f"{rec['tokens_per_s']:.0f} tok/s | mem {rec['mem_gb']:.2f} GB | eta {eta:.0f}s")
        if "eval_loss" in rec:
            line += f" | eval {rec['eval_loss']:.4f}"
        if self.tty:
            end = "\n" if step == self.total or "eval_loss" in rec else ""
            print("\r\033[K" + line, end=end, file=sys.stderr, flush=True)
        elif step % self.every == 0 or step == self.total or "eval_loss" in rec:
            print(line, file=sys.stderr, flush=True)


def write_loss_svg(records: list[dict], path: Path) -> None:
    """Training loss per step (and eval loss) as a small self-contained SVG line chart."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    points = train + evals
    if not points:
        return
    W, H, L, R, T, B = 640, 360, 60, 20, 30, 40  # size and margins
    x0, x1 = min(s for s, _ in points), max(s for s, _ in points)
    y0, y1 = min(v for _, v in points), max(v for _, v in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-3)
    sx = lambda s: L + (s - x0) / (x1 - x0) * (W - L - R)  # noqa: E731
    sy = lambda v: H - B - (v - y0) / (y1 - y0) * (H - T - B)  # noqa: E731
    poly = lambda pts: " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in pts)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
             f'font-size="12"><rect width="{W}" height="{H}" fill="white"/>',
             f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
             f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>']
    for i in range(5):  # y ticks
        v = y0 + (y1 - y0) * i / 4
        parts.append(f'<text x="{L - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>'
                     f'<line x1="{L}" y1="{sy(v):.1f}" x2="{W - R}" y2="{sy(v):.1f}" stroke="#ddd"/>')
    for i in range(5):  # x ticks
        s = x0 + (x1 - x0) * i / 4
        parts.append(f'<text x="{sx(s):.1f}" y="{H - B + 16}" text-anchor="middle">{s:.0f}</text>')
    parts.append(f'<text x="{(L + W - R) / 2}" y="{H - 6}" text-anchor="middle">step</text>')
    if train:
        parts.append(f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{poly(train)}"/>')
    if evals:
        parts.append(f'<polyline fill="none" stroke="#ff7f0e" stroke-width="1.5" points="{poly(evals)}"/>')
        parts += [f'<circle cx="{sx(s):.1f}" cy="{sy(v):.1f}" r="3" fill="#ff7f0e"/>' for s, v in evals]
    parts.append(f'<text x="{L}" y="{T - 10}" fill="#1f77b4">train loss</text>')
    if evals:
        parts.append(f'<text x="{L + 90}" y="{T - 10}" fill="#ff7f0e">eval loss</text>')
    parts.append("</svg>\n")
    path.write_text("\n".join(parts))


# ----- the run ------------------------------------------------------------------------------------------------------
def train(cfg: dict) -> int:
    t, lc = cfg["training"], cfg["lora"]
    out = Path(t["out"])
    ckpt_root = out / "checkpoints"

    # --- setup
    device, dtype = resolve_device_dtype(t)
    if device.type == "cpu" and sys.platform == "linux":
        keep_freed_cpu_memory()
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a folder")
    clean_partial(ckpt_root)
    checkpoints = list_checkpoints(ckpt_root)
    if t["resume"] and not checkpoints:
        raise TrainError(f"--resume: no checkpoint in {ckpt_root} to resume from")
    if not t["resume"] and checkpoints and not t["overwrite"]:
        raise TrainError(f"{out} already holds checkpoints (newest {checkpoints[-1][1].name}); pass --resume to "
                         "continue that run, --overwrite to start afresh, or choose another --out")
    try:  # now, not after minutes of loading: everything the run writes goes here
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise TrainError(f"--out {out}: the folder is not writable")
    tokenizer = load_tokenizer(t["model"])

    # --- data
    try:
        train_set, stats = load_dataset(t["data"], tokenizer, t["max_seq_len"], t["train_on"])
        log(stats.summary())
        for line in stats.examples[:3]:
            log(f"  skipped {line}")
        if t["eval_data"]:
            eval_set, eval_stats = load_dataset(t["eval_data"], tokenizer, t["max_seq_len"], t["train_on"])
            log(eval_stats.summary())
        else:
            train_set, eval_set = split_eval(train_set, t["eval_fraction"], t["seed"])
            if eval_set:
                log(f"holding out {len(eval_set)} of {len(train_set) + len(eval_set)} examples for evaluation")
    except DataError as e:
        raise TrainError(str(e)) from None
    data_hash = fingerprint(train_set)

    # --- model: the base, frozen, with LoRA adapters on the target modules
    torch.manual_seed(t["seed"])
    random.seed(t["seed"])
    model, lora_config, params = build_model(t, lc, device, dtype)
    n_train, n_all = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    log(f"model {t['model']} on {device} ({str(dtype).removeprefix('torch.')}): trainable {n_train:,} of "
        f"{n_all:,} parameters ({100 * n_train / n_all:.3f}%)")
    amp = lambda: autocast(device, dtype)  # noqa: E731
    optimizer = torch.optim.AdamW(params, lr=t["lr"], betas=(t["adam_beta1"], t["adam_beta2"]), eps=t["adam_eps"],
                                  weight_decay=t["weight_decay"], fused=device.type == "cuda")
    plans: dict[int, list] = {}

    def plan(epoch: int) -> list:  # micro-batches of an epoch, a pure function of (seed, epoch)
        if epoch not in plans:
            plans[epoch] = epoch_plan(train_set, t["batch_size"], t["seed"], epoch, t["packing"], t["max_seq_len"])
        return plans[epoch]

    # --- schedule
    if t["max_steps"] > 0:
        total_steps = t["max_steps"]
    else:
        total_steps = sum(math.ceil(len(plan(e)) / t["grad_accum"]) for e in range(t["epochs"]))
    warmup = t["warmup_steps"] if t["warmup_steps"] > 0 else math.ceil(t["warmup_ratio"] * total_steps)
    log(f"{len(train_set)} training examples, {len(plan(0))} micro-batches per epoch, {total_steps} steps "
        f"(batch {t['batch_size']} x accumulation {t['grad_accum']}{', packed' if t['packing'] else ''}), "
        f"warmup {warmup}, {t['schedule']} to {t['min_lr']:g}")
    if t["grad_accum"] > len(plan(0)):  # a step never spans two epochs
        log(f"note: --grad-accum {t['grad_accum']} is more than the {len(plan(0))} micro-batches of an epoch: "
            f"each step accumulates one epoch at most")

    # --- resume
    step, epoch, index = 0, 0, 0  # updates done; data position: epoch and next micro-batch within it
    metrics_path = out / "metrics.jsonl"
    records: list[dict] = []
    if t["resume"]:
        ckpt_step, path = checkpoints[-1]
        state = json.loads((path / "trainer_state.json").read_text())
        changed = [f"{k} (checkpoint {state['config']['training'][k]!r}, now {t[k]!r})" for k in RESUME_FIXED
                   if state["config"]["training"][k] != t[k]]
        changed += [f"[lora] {k}" for k in lc if state["config"]["lora"][k] != lc[k]]
        if state["data_fingerprint"] != data_hash:
            changed.append("the training data")
        if changed:
            raise TrainError(f"cannot resume from {path}: changed since: {'; '.join(changed)}")
        state = load_checkpoint(path, model, optimizer, device)
        for group in optimizer.param_groups:  # load_state_dict brought back the old run's; the config wins, as for lr
            group.update(betas=(t["adam_beta1"], t["adam_beta2"]), eps=t["adam_eps"], weight_decay=t["weight_decay"])
        step, epoch, index = state["step"], state["epoch"], state["batch_index"]
        if state["scheduler"]["total_steps"] != total_steps:
            log(f"note: the schedule now spans {total_steps} steps (the checkpoint's run planned "
                f"{state['scheduler']['total_steps']})")
        if metrics_path.exists():  # drop lines logged after the checkpoint: those steps run again
            records = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
            records = [r for r in records if r["step"] <= step]
        log(f"resumed from {path} at step {step} (epoch {epoch}, micro-batch {index})")
    elif t["overwrite"]:  # only now that data and model loaded: a typo in a flag does not cost the old run
        for _, p in checkpoints:
            shutil.rmtree(p)
    # resume/overwrite describe this invocation, not the run: the file, reused with --config, starts a new run
    (out / "config.toml").write_text(to_toml({**cfg, "training": {**t, "resume": False, "overwrite": False}}))
    metrics_file = open(metrics_path, "w")
    for r in records:
        metrics_file.write(json.dumps(r) + "\n")
    metrics_file.flush()

    def log_metrics(rec: dict) -> None:
        records.append(rec)
        metrics_file.write(json.dumps(rec) + "\n")
        metrics_file.flush()

    def checkpoint(rng: dict) -> Path:
        state = {"step": step, "epoch": epoch, "batch_index": index, "seed": t["seed"],
                 "data_fingerprint": data_hash, "n_train_examples": len(train_set),
                 "scheduler": {"schedule": t["schedule"], "total_steps": total_steps, "warmup_steps": warmup,
                               "lr": t["lr"], "min_lr": t["min_lr"], "last_lr": optimizer.param_groups[0]["lr"]},
                 "config": cfg}
        path = save_checkpoint(ckpt_root, step, model, optimizer, lora_config, state, rng, t["keep_last"])
        log(f"saved checkpoint {path}")
        return path

    # --- loop
    stop = {"requested": False}

    def on_sigint(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        log("\ninterrupt: finishing this step, then saving a checkpoint (Ctrl-C again to stop at once)")

    in_main_thread = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGINT, on_sigint) if in_main_thread else None
    progress = Progress(total_steps, t["log_every"])
    last_saved = checkpoints[-1][1] if t["resume"] else None
    # RNG states as the last update left them: what a checkpoint of that update must hold, even when the
    # interruption comes in the middle of the next step (LoRA dropout has drawn from them by then)
    start_step, updating, step_rng = step, False, rng_state()
    try:
        if eval_set and step == 0:
            loss = evaluate(model, eval_set, t["batch_size"], tokenizer.pad_id, device, amp())
            log_metrics({"step": 0, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))})
            log(f"eval loss before training {loss:.4f}")
        while step < total_steps:
            if stop["requested"]:
                raise KeyboardInterrupt
            t0 = time.perf_counter()
            if index >= len(plan(epoch)):
                epoch, index = epoch + 1, 0
                plans.pop(epoch - 2, None)
            micro = plan(epoch)[index:index + t["grad_accum"]]
            batches = [collate(train_set, rows, tokenizer.pad_id, t["packing"]) for rows in micro]
            n_target = sum(b.n_target for b in batches)
            lr = lr_at(step, total_steps, warmup, t["lr"], t["min_lr"], t["schedule"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = sum(micro_step(model, b.to(device), n_target, amp()) for b in batches)
            loss = float(loss_sum) / n_target
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t["max_grad_norm"] or math.inf))  # 0: no clip
            if not math.isfinite(loss) or not math.isfinite(grad_norm):
                what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm} (loss {loss:.4f})"
                raise TrainError(f"{what} at step {step + 1}: stopped before updating the adapter. Last good "
                                 f"checkpoint: {last_saved or 'none yet'}. Try a lower --lr, --dtype fp32, or "
                                 f"check the data.")
            updating = True
            optimizer.step()
            rng = rng_state()
            # one assignment, so a second Ctrl-C cannot land between the counters and the RNG state they go with
            step, index, step_rng, updating = step + 1, index + len(micro), rng, False
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            n_tokens = sum(b.n_tokens for b in batches)
            rec = {"step": step, "epoch": round(epoch + index / len(plan(epoch)), 4), "loss": loss, "lr": lr,
                   "grad_norm": grad_norm, "tokens": n_tokens, "target_tokens": n_target,
                   "tokens_per_s": n_tokens / dt, "mem_gb": round(memory_gb(device), 3)}
            if eval_set and ((t["eval_every"] and step % t["eval_every"] == 0) or step == total_steps):
                rec["eval_loss"] = evaluate(model, eval_set, t["batch_size"], tokenizer.pad_id, device, amp())
                rec["eval_ppl"] = math.exp(min(rec["eval_loss"], 50.0))
            log_metrics(rec)
            progress.update(step, rec, step - start_step)
            if (t["save_every"] and step % t["save_every"] == 0) or step == total_steps:
                last_saved = checkpoint(step_rng)
    except KeyboardInterrupt:
        optimizer.zero_grad(set_to_none=True)
        if updating:  # stopped inside optimizer.step(): the adapter may be half updated
            log(f"\ninterrupted during an update: not saving; the last checkpoint is {last_saved or 'none'}")
        elif step > start_step or last_saved is None:
            last_saved = checkpoint(step_rng)
        log(f"interrupted at step {step}; continue with --resume (checkpoint {last_saved})")
        write_loss_svg(records, out / "loss.svg")
        return 130
    finally:
        metrics_file.close()
        if in_main_thread:
            signal.signal(signal.SIGINT, old_handler)

    # --- save
    write_loss_svg(records, out / "loss.svg")
    tmp = out / "adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    lora.save_adapter(model, tmp, lora_config)
    atomic.replace_dir(tmp, out / "adapter")
    log(f"adapter written to {out / 'adapter'}")
    if t["export_peft"]:
        tmp = out / "adapter-peft.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        lora.export_peft(model, tmp, lora_config, base_model_name_or_path=t["model"])
        atomic.replace_dir(tmp, out / "adapter-peft")
        log(f"PEFT adapter written to {out / 'adapter-peft'}")
    if t["merge"]:
        save_merged(model, tokenizer, out / "merged")
        log(f"merged model written to {out / 'merged'}")
    return 0


def save_merged(model, tokenizer, final: Path) -> None:
    """Base + adapter folded into the weights (lora.merge), saved in the Hugging Face layout with the tokenizer."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    lora.merge(model)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    atomic.replace_dir(tmp, final)


def main(argv=None) -> int:
    try:
        return train(parse_config(argv))
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the loop: while loading (nothing to save yet) or while writing the final
        # adapter (the last step's checkpoint is complete: --resume writes the adapter again)
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
