"""How the programs talk to the person running them: notes, warnings and errors, one line each on stderr, and a
progress line that a terminal redraws in place; and the programs' argument parser, which explains a mistyped flag.

A progress line still open on a terminal is ended before any other line is printed, so a warning never lands in
the middle of it: the console's own lines end it, and so do Python warnings (warnings.showwarning is wrapped while
a line is open). Under torchrun only rank 0 speaks (set_quiet on the others), except for errors, which every
process prints. `Meter` is a small tqdm-style line (count, bar, rate, ETA) for long work. Imports nothing of
phi3lora: every layer may use it.
"""
from __future__ import annotations

import argparse
import difflib
import sys
import time
import warnings

# open: the stream whose progress line has no newline yet; showwarning: what the hook wrapped (while a line is open)
_state = {"quiet": False, "open": None, "showwarning": None}


def set_quiet(on: bool) -> None:
    """Silence info, warn and progress (the ranks other than 0 of a torchrun run: rank 0 speaks for them)."""
    _state["quiet"] = bool(on)


def is_quiet() -> bool:
    return _state["quiet"]


def is_terminal(file=None) -> bool:
    file = file or sys.stderr
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # a closed or minimal stream
        return False


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """warnings.showwarning while a progress line is open: end the line, then print the warning as Python would."""
    shown = _state["showwarning"]
    _end_progress()
    shown(message, category, filename, lineno, file, line)


def _set_open(stream) -> None:
    """Remember the stream whose line is open, and hook Python's warnings to end it before they print."""
    _state["open"] = stream
    if stream is not None and warnings.showwarning is not _show_warning:
        _state["showwarning"], warnings.showwarning = warnings.showwarning, _show_warning
    elif stream is None and warnings.showwarning is _show_warning:  # only ours is taken back (catch_warnings
        warnings.showwarning = _state["showwarning"]  # may have put another in place meanwhile)


def _end_progress() -> None:
    stream = _state["open"]
    _set_open(None)
    if stream is not None:
        try:
            stream.write("\n")
            stream.flush()
        except (OSError, ValueError):
            pass


def _line(text: str, file) -> None:
    _end_progress()
    print(text, file=file or sys.stderr, flush=True)


def info(msg: str, file=None) -> None:
    """A line for the person running the program (stderr unless file says otherwise)."""
    if not _state["quiet"]:
        _line(msg, file)


def warn(msg: str, file=None) -> None:
    """`warning: msg`."""
    if not _state["quiet"]:
        _line(f"warning: {msg}", file)


def error(msg: str, file=None) -> None:
    """`error: msg`, printed by every process (the caller exits 2)."""
    _line(f"error: {msg}", file)


def progress(line: str, last: bool = False, file=None) -> None:
    """The status line: on a terminal redrawn in place (left open until `last`, or until any other line ends it);
    elsewhere (a log file) one line each call."""
    if _state["quiet"]:
        return
    file = file or sys.stderr
    if not is_terminal(file):
        _line(line, file)
        return
    _state["open"] = None  # this line replaces the open one: no newline in between
    print("\r\033[K" + line, end="\n" if last else "", file=file, flush=True)
    _set_open(None if last else file)


# ----- long work: count, bar, rate, ETA -------------------------------------------------------------------------
def duration(seconds: float) -> str:
    """"42s", "3:07", "1:02:03" (h:mm:ss); "?" when unknown."""
    if not 0 <= seconds < float("inf"):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def bar(done: float, total: float, width: int = 20) -> str:
    """`[#######-------------]  35%`: the fraction done of total, clamped to [0, 1]."""
    frac = min(max(done / total, 0.0), 1.0) if total > 0 else 0.0
    filled = int(frac * width)
    return f"[{'#' * filled}{'-' * (width - filled)}] {frac * 100:3.0f}%"


def per_second(rate: float, unit: str) -> str:
    """`0.25 steps/s`, `12.5 steps/s`, `3,912 tok/s`: about three significant digits."""
    return f"{rate:.2f} {unit}/s" if rate < 10 else f"{rate:.1f} {unit}/s" if rate < 100 else f"{rate:,.0f} {unit}/s"


def rate_and_eta(done: float, total: float | None, elapsed: float, unit: str) -> str:
    """`12.3 steps/s | eta 4:05` (no eta without a total; "?" before anything is done)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    text = per_second(rate, unit)
    if total:
        text += f" | eta {duration((total - done) / rate) if rate > 0 else '?'}"
    return text


class Meter:
    """A progress line for long work, tqdm-style: `label 3,200/10,000 ex [######--------------]  32% | 812 ex/s |
    eta 0:08`. Silent until `after` seconds have passed (short work prints nothing); then on a terminal redrawn at
    most every `refresh` seconds, elsewhere (a log file) one line every `every` seconds. total None: a count and a
    rate, no bar. `close()` prints the final line when anything was shown.

        meter = Meter("tokenizing data.jsonl", unit="ex", after=2.0)
        for n, row in enumerate(rows, 1):
            ...
            meter.update(n)
        meter.close()
    """

    def __init__(self, label: str, total: float | None = None, unit: str = "it", after: float = 0.0,
                 every: float = 30.0, refresh: float = 0.2, file=None, clock=time.monotonic):
        self.label, self.total, self.unit, self.after, self.file, self.clock = label, total, unit, after, file, clock
        self.step = refresh if is_terminal(file or sys.stderr) else every
        self.start, self.last_shown, self.done, self.shown = clock(), None, 0.0, False

    def line(self, extra: str = "") -> str:
        count = f"{self.done:,.0f}" + (f"/{self.total:,.0f} {self.unit} {bar(self.done, self.total)}"
                                       if self.total else f" {self.unit}")
        rate = rate_and_eta(self.done, self.total, self.clock() - self.start, self.unit)
        return f"{self.label} {count} | {rate}" + (f" | {extra}" if extra else "")

    def update(self, done: float, extra: str = "") -> None:
        self.done, now = done, self.clock()
        if now - self.start < self.after or (self.last_shown is not None and now - self.last_shown < self.step):
            return
        self.last_shown, self.shown = now, True
        progress(self.line(extra), file=self.file)

    def close(self, extra: str = "") -> None:
        if self.shown:
            progress(self.line(extra) + f" | {duration(self.clock() - self.start)} in all", last=True, file=self.file)
            self.shown = False


# ----- command lines ----------------------------------------------------------------------------------------------
class ArgumentParser(argparse.ArgumentParser):
    """argparse without its prefix guessing (--ep is refused, not taken for --epochs: a flag added later would
    silently change what an abbreviation means), and an unknown flag answered with the nearest known one."""

    def __init__(self, *args, **kw):
        super().__init__(*args, allow_abbrev=False, **kw)

    def parse_known_args(self, args=None, namespace=None):
        # before argparse's own checks, so that a mistyped --out is named as such, not as a missing --out
        args = sys.argv[1:] if args is None else list(args)
        known = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        for word in args:
            if word == "--":  # what follows is not flags
                break
            if word.startswith("--") and " " not in word and word.split("=", 1)[0] not in known:  # argparse
                # takes a word with a space for a value: --prompt "--why not"
                stem = word.split("=", 1)[0]
                # what an abbreviation would have meant first (--ep: --epochs), else the nearest spelling
                close = [k for k in known if k.startswith(stem)][:3] or difflib.get_close_matches(stem, known, n=1)
                self.error(f"unknown flag {word}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
        return super().parse_known_args(args, namespace)
