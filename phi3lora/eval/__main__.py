"""`python -m phi3lora.eval ...`: the same as `phi3lora eval ...`."""
import sys

from .command import main

sys.exit(main())
