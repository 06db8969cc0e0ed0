"""`python -m phi3lora.eval ...`: the same as `phi3lora eval ...` (an entry point, like phi3lora/__main__.py: the
command itself is phi3lora/cli/eval.py)."""
import sys

from phi3lora.cli.eval import main

sys.exit(main())
