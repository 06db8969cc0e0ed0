"""Evaluation: lm-evaluation-harness's model type "phi3lora" (harness.py), and base vs adapter on a chat file
(compare.py).

Importing this package registers "phi3lora" with lm-eval when lm-eval is installed (`pip install
'phi3-lora[eval]'`); without it the chat-file comparison still works and `harness_available()` says False. Nothing
on the training path imports this package unless asked (train.py --eval-at-end)."""
from __future__ import annotations

import importlib.util

from .compare import compare, format_table
from .models import EvalError, load

INSTALL_HINT = "pip install 'phi3-lora[eval]'"


def harness_available() -> bool:
    try:
        return importlib.util.find_spec("lm_eval") is not None
    except ValueError:  # an lm_eval module without a spec (set to None in sys.modules: blocked)
        return False


if harness_available():
    from . import harness  # noqa: F401  (registers the model type "phi3lora")

__all__ = ["compare", "format_table", "load", "EvalError", "harness_available", "INSTALL_HINT"]
