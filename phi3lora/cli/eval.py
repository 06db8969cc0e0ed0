"""`phi3lora eval` (also `python -m phi3lora.eval`): evaluate a fine-tune, base vs adapter on your own chats, and
lm-evaluation-harness tasks.

    phi3lora eval --model microsoft/Phi-3-mini-4k-instruct --adapter out/my-run/adapter --data held_out.jsonl
    phi3lora eval --model microsoft/Phi-3-mini-4k-instruct --adapter out/my-run/adapter \\
        --tasks hellaswag,arc_easy --num-fewshot 0 --limit 200 --batch-size 8

--data FILE (any form train.py reads): loss and perplexity on the assistant tokens, exact match and token F1 of
greedy answers against each conversation's last reply, base and adapter side by side (phi3lora/eval/compare.py),
with a few conversations where the two answer differently; written to OUT/eval.json (--out, or the run folder of an
adapter at RUN/adapter) and shown as a table.
--tasks a,b: lm-eval's simple_evaluate with the model type "phi3lora" (phi3lora/eval/harness.py) and lm-eval's usual
flags; needs `pip install 'phi3-lora[eval]'`, and the Hub for the standard tasks' data (--include-path DIR for
your own task YAMLs). Both may be given at once.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from phi3lora import console
from phi3lora.atomic import write_file
from phi3lora.console import ArgumentParser
from phi3lora.data import DataError, load_data
from phi3lora.eval import INSTALL_HINT, EvalError, compare, format_table, harness_available, load
from phi3lora.phi3mini import hub

from .options import DEFAULT_MODEL, add_model_flags



def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description="Evaluate a model with or without a LoRA adapter: base vs adapter on a chat file "
                                   "(--data) and lm-evaluation-harness tasks (--tasks).")
    add_model_flags(p, default=DEFAULT_MODEL)
    p.add_argument("--adapter", help="LoRA adapter folder (ours, from train.py, or a PEFT one)")
    p.add_argument("--quantize", choices=hub.QUANTIZE_CHOICES, default="none", type=hub.quantize_name,
                   help="nf4: a 4-bit base, as train.py --quantize (default: none)")
    chats = p.add_argument_group("base vs adapter on a chat file")
    chats.add_argument("--data", help="held-out chats, in any form train.py reads (JSONL, JSON, parquet, a folder)")
    chats.add_argument("--max-new-tokens", type=int, default=64, help="longest greedy answer (default 64)")
    chats.add_argument("--max-examples", type=int, default=200, help="at most this many conversations (0: all; "
                       "default 200)")
    chats.add_argument("--max-seq-len", type=int, default=0,
                       help="longer conversations are cut after their last whole reply that fits, as in training "
                            "(default: the model's context)")
    chats.add_argument("--show", type=int, default=3, help="conversations shown where base and adapter differ")
    chats.add_argument("--out", help="folder for eval.json (default: the run folder of an adapter at RUN/adapter)")
    harness = p.add_argument_group(f"lm-evaluation-harness (needs {INSTALL_HINT})")
    harness.add_argument("--tasks", help="comma-separated lm-eval task names (hellaswag,arc_easy,mmlu,...)")
    harness.add_argument("--model-args", help="lm-eval's model_args for the phi3lora model (default: from --model, "
                         "--adapter, --dtype, --device, --quantize), e.g. pretrained=DIR,adapter=DIR,dtype=bfloat16")
    harness.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt")
    harness.add_argument("--limit", type=float, default=None, help="documents per task (below 1: a fraction)")
    harness.add_argument("--batch-size", default="8", help="requests per batch, or auto (default 8; also --data's)")
    harness.add_argument("--apply-chat-template", action="store_true",
                         help="render the prompts in the checkpoint's chat format")
    harness.add_argument("--fewshot-as-multiturn", action="store_true",
                         help="with --apply-chat-template: few-shot examples as chat turns")
    harness.add_argument("--include-path", help="folder of your own task YAMLs")
    harness.add_argument("--output-path", help="write lm-eval's results (JSON) to this file or folder")
    harness.add_argument("--log-samples", action="store_true", help="with --output-path: every request's response")
    harness.add_argument("--seed", type=int, default=0, help="few-shot sampling and sampled generation")
    args = p.parse_args(argv)
    if not args.data and not args.tasks:
        p.error("nothing to evaluate: give --data FILE (base vs adapter on chats) and/or --tasks a,b (lm-eval)")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    if args.max_examples < 0 or args.max_seq_len < 0 or args.show < 0:
        p.error("--max-examples, --max-seq-len and --show must be >= 0")
    if not args.batch_size.startswith("auto"):
        try:
            if int(args.batch_size) < 1:
                raise ValueError
        except ValueError:
            p.error(f"--batch-size {args.batch_size}: a whole number >= 1, or auto")
    if args.log_samples and not args.output_path:
        p.error("--log-samples needs --output-path")
    return args


def out_folder(args) -> Path | None:
    if args.out:
        return Path(args.out)
    adapter = Path(args.adapter) if args.adapter else None
    if adapter is not None and adapter.name == "adapter" and (adapter.parent / "config.toml").exists():
        return adapter.parent  # a train.py run: out/RUN/adapter -> out/RUN/eval.json
    return None


# ----- base vs adapter on chats ------------------------------------------------------------------------------------
def evaluate_chats(args) -> dict:
    model, tokenizer = load(args.model, args.adapter, args.device, args.dtype, args.quantize)
    max_seq_len = args.max_seq_len or model.config.max_position_embeddings
    try:
        sets = load_data(args.data, tokenizer, max_seq_len, eval_fraction=0.0, max_examples=args.max_examples,
                         cache="off")
    except DataError as e:
        raise EvalError(f"--data {args.data}: {e}") from None
    for line in sets.report:
        console.info(line)
    batch = 8 if args.batch_size.startswith("auto") else int(args.batch_size)
    try:
        result = compare(model, tokenizer, sets.train, args.max_new_tokens, batch, args.show)
    except ValueError as e:
        raise EvalError(f"--data {args.data}: {e}") from None
    return {"model": args.model, "adapter_dir": args.adapter, "data": args.data, **result}


# ----- lm-evaluation-harness -------------------------------------------------------------------------------------
def model_args(args) -> str:
    if args.model_args:
        return args.model_args
    parts = [f"pretrained={args.model}", f"dtype={args.dtype}", f"device={args.device}", f"quantize={args.quantize}"]
    if args.adapter:
        parts.append(f"adapter={args.adapter}")
    return ",".join(parts)


@functools.cache
def task_manager(include_path: str | None):
    """lm-eval's index of its tasks (and yours under include_path): built once per process, it reads thousands of
    YAML files."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def evaluate_tasks(args) -> dict:
    if not harness_available():
        raise EvalError(f"--tasks needs lm-evaluation-harness: {INSTALL_HINT}")
    import lm_eval
    from lm_eval.utils import make_table

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.include_path and not Path(args.include_path).is_dir():
        raise EvalError(f"--include-path {args.include_path}: no such folder")
    manager = task_manager(args.include_path)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise EvalError(f"--tasks: unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                        f"(lm-eval knows {len(manager.all_tasks):,} names: `lm_eval ls tasks` lists them; "
                        "--include-path DIR for your own task YAMLs)")
    results = lm_eval.simple_evaluate(
        model="phi3lora", model_args=model_args(args), tasks=names, num_fewshot=args.num_fewshot, limit=args.limit,
        batch_size=args.batch_size, apply_chat_template=args.apply_chat_template,
        fewshot_as_multiturn=args.fewshot_as_multiturn or None, task_manager=manager, log_samples=args.log_samples,
        random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed, fewshot_random_seed=args.seed)
    print(make_table(results))
    if args.output_path:
        from lm_eval.utils import handle_non_serializable

        path = Path(args.output_path)
        path = path if path.suffix == ".json" else path / "results.json"
        write_file(path, json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
        console.info(f"wrote {path}")
    return {"results": results["results"], "n-shot": results.get("n-shot"), "model_args": model_args(args)}


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        report = {}
        if args.data:
            report = evaluate_chats(args)
            print(format_table(report))
        if args.tasks:
            report["lm_eval"] = evaluate_tasks(args)
        out = out_folder(args)
        if out is None:
            console.info("--out DIR writes these numbers to DIR/eval.json")
        else:
            if out.exists() and not out.is_dir():
                raise EvalError(f"--out {out} is a file, not a folder")
            path = write_file(out / "eval.json", json.dumps(report, indent=2, default=plain) + "\n")
            console.info(f"wrote {path}")
    except EvalError as e:
        console.error(str(e))
        return 2
    except OSError as e:
        console.error(f"cannot write {e.filename or args.out}: {e.strerror or e}")
        return 2
    return 0


def plain(value):
    """json.dumps' fallback for lm-eval's numbers (numpy scalars) and anything else it returns."""
    return value.item() if hasattr(value, "item") else str(value)


if __name__ == "__main__":
    sys.exit(main())
