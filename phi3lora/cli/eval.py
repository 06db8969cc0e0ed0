"""`phi3lora eval`: base vs adapter on a chat file, and lm-evaluation-harness tasks. The program lives in
phi3lora/eval/command.py, so that `python -m phi3lora.eval` runs it without importing the other commands."""
import sys

from phi3lora.eval.command import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
