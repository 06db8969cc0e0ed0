#!/usr/bin/env python3
"""Talk to Phi-3 (or the built-in tiny demo model), with or without a LoRA adapter.

The program is phi3lora/cli/chat.py; after `pip install` it is also the `phi3lora chat` command.
`python chat.py --help` lists its options.
"""
import sys

from phi3lora.cli.chat import main

if __name__ == "__main__":
    sys.exit(main())
