"""Serve a model and its LoRA adapters behind an OpenAI-compatible API, with a chat page at /.

    phi3lora serve --model tiny --adapter mine=out/my-run/adapter --port 8000
    curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "mine", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}'

The request's `model` picks the base model (its --model name, or --name) or an adapter (NAME of --adapter
NAME=DIR). Requests for different adapters share one batch (phi3lora/serve/). Needs the [serve] extra.
"""
from __future__ import annotations

import argparse
import sys

from phi3lora import console
from phi3lora.cli.chat import ChatError, load_adapter
from phi3lora.cli.options import add_model_flags
from phi3lora.console import ArgumentParser
from phi3lora.phi3mini import hub


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description="An OpenAI-compatible server for Phi-3 and its LoRA adapters, with a chat page.")
    add_model_flags(p)
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve the adapter in DIR (ours or PEFT's) as model NAME; repeat for more")
    p.add_argument("--name", help="the base model's name in requests (default: the --model value)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests allowed to wait for a batch row; more get 429 (default 64)")
    args = p.parse_args(argv)
    if args.max_batch < 1 or args.max_queue < 1:
        p.error("--max-batch and --max-queue must be at least 1")
    args.adapters = []
    for item in args.adapter:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            p.error(f"--adapter takes NAME=DIR, not {item!r}")
        args.adapters.append((name, folder))
    names = [n for n, _ in args.adapters] + [args.name or args.model]
    if len(set(names)) != len(names):
        p.error(f"model names must differ: {names}")
    return args


def build(args):
    """(engine, app) for the parsed arguments; ChatError for what the user can fix."""
    try:
        from phi3lora.serve.app import create_app
    except ImportError as e:
        raise ChatError(f"phi3lora serve needs FastAPI and uvicorn: pip install 'phi3-lora[serve]' ({e})") from None
    from phi3lora.serve import multi_lora
    from phi3lora.serve.engine import Engine

    try:
        model, tokenizer = hub.load(args.model, args.device, args.dtype)
    except hub.LoadError as e:
        raise ChatError(str(e)) from None
    factors = []
    for name, folder in args.adapters:
        why = multi_lora.unservable(folder)
        if why:
            raise ChatError(f"--adapter {name}={folder}: cannot be served: {why}")
        try:
            factors.append(multi_lora.adapter_factors(model, lambda m: load_adapter(m, folder, merge=False)))
        except ValueError as e:  # a layer kind the server cannot batch
            raise ChatError(f"--adapter {name}={folder}: {e}") from None
        console.info(f"adapter {name}: {folder} ({len(factors[-1])} layers)")
    rows = multi_lora.install(model, factors)
    engine = Engine(model, tokenizer, rows, max_batch=args.max_batch, max_queue=args.max_queue)
    app = create_app(engine, args.name or args.model, [n for n, _ in args.adapters])
    return engine, app


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        engine, app = build(args)
        import uvicorn
    except (ChatError, ImportError) as e:
        console.error(str(e))
        return 2
    engine.start()
    console.info(f"serving {args.name or args.model} and {len(args.adapters)} adapters on "
                 f"http://{args.host}:{args.port}/ (chat page there, API under /v1)")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
