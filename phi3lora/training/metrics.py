"""What a run records itself: the progress line, metrics.jsonl (one JSON object per step) and loss.svg."""
from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path

import torch

from phi3lora import atomic, console


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except ImportError:
        return float("nan")


class Progress:
    """One status line on stderr (phi3lora.console): redrawn in place on a terminal, else printed every `every`
    steps. tqdm-style: step count and bar, loss, lr, the rate (steps/s and tokens/s, over the steps this process
    ran) and the time left at that rate.

        step 40/100 [########------------]  40% | loss 2.1034 | lr 4.00e-03 | 2.5 steps/s | 3912 tok/s |
        mem 0.51 GB | eta 24s
    """

    def __init__(self, total: int, every: int, clock=time.perf_counter):
        self.total, self.every, self.clock = total, max(1, every), clock
        self.tty = console.is_terminal()
        self.start = clock()

    def line(self, step: int, rec: dict, steps_done: int) -> str:
        elapsed = self.clock() - self.start
        rate = steps_done / elapsed if elapsed > 0 else 0.0
        eta = console.duration((self.total - step) / rate) if rate > 0 else "?"
        line = (f"step {step}/{self.total} {console.bar(step, self.total)} | loss {rec['loss']:.4f} | "
                f"lr {rec['lr']:.2e} | {console.per_second(rate, 'steps')} | {rec['tokens_per_s']:.0f} tok/s | "
                f"mem {rec['mem_gb']:.2f} GB | eta {eta}")
        if "rewards/accuracies" in rec:  # --objective dpo / orpo: the step's pairs
            line += f" | acc {rec['rewards/accuracies']:.2f} | margin {rec['rewards/margins']:.3f}"
        if "eval_loss" in rec:
            line += f" | eval {rec['eval_loss']:.4f}"
        return line

    def update(self, step: int, rec: dict, steps_done: int) -> None:
        last = step == self.total or "eval_loss" in rec  # kept on screen: the last step and each evaluation
        if self.tty or last or step % self.every == 0:
            console.progress(self.line(step, rec, steps_done), last=last)


class MetricsLog:
    """metrics.jsonl: the records kept from before a resume, then one line per step as it happens (flushed, so a
    crash loses nothing logged). `records` holds them all for loss.svg."""

    def __init__(self, path: Path, records: list[dict]):
        self.path, self.records = path, list(records)
        self.file = open(path, "w")
        self._write("".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, rec: dict) -> None:
        self.records.append(rec)
        self._write(json.dumps(rec) + "\n")

    def _write(self, text: str) -> None:
        try:
            self.file.write(text)
            self.file.flush()
        except OSError as e:  # name the file: a full disk shows up here first
            raise OSError(e.errno, e.strerror, str(self.path)) from None

    def close(self) -> None:
        self.file.close()


def read_metrics(path: Path, up_to_step: int) -> list[dict]:
    """The records of metrics.jsonl up to a step (those after it run again on resume)."""
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            rec = json.loads(line)
        except ValueError:  # e.g. the half-written last line of a killed run
            if line.strip():
                console.info(f"note: {path}:{n} is not a JSON record; dropped")
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= up_to_step:
            records.append(rec)
    return records


def write_loss_svg(records: list[dict], path: Path, title: str = "Loss per step") -> None:
    """Training loss per step and eval loss as a self-contained SVG line chart: title, axis labels, grid, and the
    legend to the right of the plot area, where no curve can run under it. Written by hand (no plotting library at
    run time); written whole, then renamed."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    margins = [(r["step"], r["rewards/margins"]) for r in records if "rewards/margins" in r]  # dpo / orpo
    points = [(s, v) for s, v in train + evals + margins if math.isfinite(v)]
    if not points:
        return
    # size and margins: room for the title, the axis labels and (right) the legend
    W, H, L, R, T, B = 860, 420, 70, LEGEND_WIDTH + 28, 50, 55
    x0, x1 = min(s for s, _ in points), max(s for s, _ in points)
    y0, y1 = min(0.0, min(v for _, v in points)), max(v for _, v in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1.0)
    y1 = max(y1, nice_ticks(y0, y1)[-1])  # the top grid line at a round value
    sx = lambda s: L + (s - x0) / (x1 - x0) * (W - L - R)  # noqa: E731
    sy = lambda v: H - B - (v - y0) / (y1 - y0) * (H - T - B)  # noqa: E731
    poly = lambda pts: " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in pts if math.isfinite(v))  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="16" font-weight="bold">'
             f'{html.escape(title)}</text>']
    for v in nice_ticks(y0, y1):  # y grid and ticks
        parts.append(f'<line x1="{L}" y1="{sy(v):.1f}" x2="{W - R}" y2="{sy(v):.1f}" stroke="#e5e5e5"/>'
                     f'<text x="{L - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    for s in nice_ticks(x0, x1):  # x ticks
        parts.append(f'<line x1="{sx(s):.1f}" y1="{H - B}" x2="{sx(s):.1f}" y2="{H - B + 4}" stroke="black"/>'
                     f'<text x="{sx(s):.1f}" y="{H - B + 17}" text-anchor="middle">{s:.0f}</text>')
    parts += [f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
              f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
              f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">optimizer step</text>',
              f'<text x="18" y="{(T + H - B) / 2}" text-anchor="middle" '
              f'transform="rotate(-90 18 {(T + H - B) / 2})">loss (nats per target token)</text>']
    legend = []
    if train:
        parts.append(f'<polyline fill="none" stroke="{TRAIN_COLOR}" stroke-width="1.5" points="{poly(train)}"/>')
        legend.append(("train loss", TRAIN_COLOR, False))
    if evals:
        parts.append(f'<polyline fill="none" stroke="{EVAL_COLOR}" stroke-width="2" points="{poly(evals)}"/>')
        parts += [f'<circle cx="{sx(s):.1f}" cy="{sy(v):.1f}" r="3.5" fill="{EVAL_COLOR}"/>'
                  for s, v in evals if math.isfinite(v)]
        legend.append(("eval loss", EVAL_COLOR, True))
    if margins:
        parts.append(f'<polyline fill="none" stroke="{MARGIN_COLOR}" stroke-width="1.5" points="{poly(margins)}"/>')
        legend.append(("reward margin", MARGIN_COLOR, False))
    parts += _legend(legend, W - R + 14, T)
    parts.append("</svg>\n")
    atomic.write_file(path, "\n".join(parts))


TRAIN_COLOR, EVAL_COLOR, MARGIN_COLOR = "#1f77b4", "#ff7f0e", "#2ca02c"
LEGEND_WIDTH = 122


def nice_ticks(lo: float, hi: float, about: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) from lo up to the first at or above hi."""
    raw = (hi - lo) / about
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    n = math.ceil((hi - first) / step - 1e-9)
    return [round(first + i * step, 12) for i in range(n + 1)]


def _legend(entries: list[tuple[str, str, bool]], x: float, y: float) -> list[str]:
    """A framed legend at (x, y): a line sample (with a marker for point series) and the label per entry."""
    if not entries:
        return []
    parts = [f'<rect class="legend" x="{x}" y="{y}" width="{LEGEND_WIDTH}" height="{8 + 18 * len(entries)}" '
             f'fill="white" stroke="#999"/>']
    for i, (label, color, marker) in enumerate(entries):
        cy = y + 13 + 18 * i
        parts.append(f'<line x1="{x + 8}" y1="{cy}" x2="{x + 34}" y2="{cy}" stroke="{color}" stroke-width="2"/>')
        if marker:
            parts.append(f'<circle cx="{x + 21}" cy="{cy}" r="3.5" fill="{color}"/>')
        parts.append(f'<text x="{x + 42}" y="{cy + 4}">{label}</text>')
    return parts
