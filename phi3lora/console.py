"""How the programs talk to the person running them: notes, warnings and errors, one line each on stderr, and a
progress line that a terminal redraws in place.

A progress line still open on a terminal is ended before any other line is printed, so a warning never lands in
the middle of it. Under torchrun only rank 0 speaks (set_quiet on the others), except for errors, which every
process prints. Imports nothing of phi3lora: every layer may use it.
"""
from __future__ import annotations

import sys

_state = {"quiet": False, "open": None}  # open: the stream whose progress line has no newline yet


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


def _end_progress() -> None:
    stream, _state["open"] = _state["open"], None
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
    _state["open"] = None if last else file
