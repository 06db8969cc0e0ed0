"""The flags chat and probe share, with the same choices and help (train's come from TrainingConfig's fields,
which take their choices and help from the same place, phi3mini.hub)."""
from __future__ import annotations

import argparse
import difflib
import sys

from phi3lora.phi3mini import hub

MODEL_HELP = "Hub id, local checkpoint folder, or 'tiny' (built-in random demo model)"


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


def add_model_flags(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """--model (required when there is no default), --device and --dtype, resolved by phi3mini.hub.load."""
    if default is None:
        p.add_argument("--model", required=True, help=MODEL_HELP)
    else:
        p.add_argument("--model", default=default, help=f"{MODEL_HELP} (default: {default})")
    p.add_argument("--device", default="auto", metavar=hub.DEVICE_METAVAR, help=f"{hub.DEVICE_HELP} (default: auto)")
    p.add_argument("--dtype", default="auto", type=hub.dtype_name, choices=hub.DTYPE_CHOICES,
                   help=f"{hub.DTYPE_HELP} (default: auto)")
