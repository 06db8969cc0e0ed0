"""The programs: `phi3lora train|chat|probe|eval|serve ...` (installed as a console command), `python -m phi3lora
...`, and the repository's train.py, chat.py and probe.py, which call the same main() functions."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": "fine-tune Phi-3 with LoRA on your chats",
    "chat": "talk to a model, with or without an adapter",
    "probe": "pictures of attention, the logit lens and an adapter's footprint for one prompt",
    "eval": "base vs adapter on your chats, and lm-evaluation-harness tasks",
    "serve": "an OpenAI-compatible server (many adapters in one batch) and a chat page",
}


def usage() -> str:
    lines = ["usage: phi3lora COMMAND [options]   (phi3lora COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {name:<7} {what}" for name, what in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{usage()}\n\nerror: unknown command {name!r}", file=sys.stderr)
        return 2
    # imported only when chosen: `phi3lora chat` need not load the training loop
    command = importlib.import_module(f"phi3lora.cli.{name}")
    sys.argv[0] = f"phi3lora {name}"  # argparse's prog, in --help and error lines
    return command.main(rest)
