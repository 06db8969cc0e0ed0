"""What a run reports: the progress line, metrics.jsonl (one JSON object per step) and loss.svg."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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


class MetricsLog:
    """metrics.jsonl: the records kept from before a resume, then one line per step as it happens (flushed, so a
    crash loses nothing logged). `records` holds them all for loss.svg."""

    def __init__(self, path: Path, records: list[dict]):
        self.records = list(records)
        self.file = open(path, "w")
        for r in self.records:
            self.file.write(json.dumps(r) + "\n")
        self.file.flush()

    def write(self, rec: dict) -> None:
        self.records.append(rec)
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_metrics(path: Path, up_to_step: int) -> list[dict]:
    """The records of metrics.jsonl up to a step (those after it run again on resume)."""
    if not path.exists():
        return []
    records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in records if r["step"] <= up_to_step]


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
