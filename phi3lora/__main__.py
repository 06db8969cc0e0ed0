"""`python -m phi3lora train|chat|probe|eval ...`: the same as the `phi3lora` command."""
import sys

from phi3lora.cli import main

sys.exit(main())
