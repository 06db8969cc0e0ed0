"""The flags chat and probe share, with the same choices and help (train's come from TrainingConfig's fields,
which take their choices and help from the same place, phi3mini.hub)."""
from __future__ import annotations

import argparse

from phi3lora.phi3mini import hub

DEFAULT_MODEL = "microsoft/Phi-3-mini-4k-instruct"  # chat's and eval's --model default
MODEL_HELP = "Hub id, local checkpoint folder, or 'tiny' (built-in random demo model)"


def add_model_flags(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """--model (required when there is no default), --device and --dtype, resolved by phi3mini.hub.load."""
    if default is None:
        p.add_argument("--model", required=True, help=MODEL_HELP)
    else:
        p.add_argument("--model", default=default, help=f"{MODEL_HELP} (default: {default})")
    p.add_argument("--device", default="auto", metavar=hub.DEVICE_METAVAR, help=f"{hub.DEVICE_HELP} (default: auto)")
    p.add_argument("--dtype", default="auto", type=hub.dtype_name, choices=hub.DTYPE_CHOICES,
                   help=f"{hub.DTYPE_HELP} (default: auto)")
