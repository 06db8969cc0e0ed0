#!/usr/bin/env python3
"""Fine-tune Phi-3 with LoRA on your chats.

The program is phi3lora/cli/train.py; after `pip install` it is also the `phi3lora train` command.
`python train.py --help` lists its options.
"""
import sys

from phi3lora.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
