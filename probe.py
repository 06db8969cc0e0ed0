#!/usr/bin/env python3
"""Pictures of what Phi-3 does with one prompt, and of what a LoRA adapter changed.

The program is phi3lora/cli/probe.py; after `pip install` it is also the `phi3lora probe` command.
`python probe.py --help` lists its options.
"""
import sys

from phi3lora.cli.probe import main

if __name__ == "__main__":
    sys.exit(main())
