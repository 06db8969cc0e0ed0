"""Continuous batching, measured: the same requests served one after another vs 4 and 16 at a time.

    PYTHONPATH=. python bench/serve.py                        # CPU: the tiny preset, 16 requests x 64 tokens
    PYTHONPATH=. python bench/serve.py --threads 1            # CPU shared with other jobs: one torch thread
    PYTHONPATH=. python bench/serve.py --device cuda --model microsoft/Phi-3-mini-4k-instruct --dtype bfloat16

Requests go straight to the engine (phi3lora/serve/engine.py; no HTTP), so the figures are the batching and the
gathered multi-adapter LoRA, not the web server. The requests alternate between the base model and two random
rank-16 adapters on every projection, so every batch mixes adapters. Each request generates exactly --tokens
tokens (ignore_eos). Concurrency c means at most c requests in flight; c = 1 is sequential serving.
Columns: tokens/s over the whole set, speed-up over c = 1, time to first token (mean and worst), decode steps.
The last line printed is JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi3lora import lora  # noqa: E402
from phi3lora.phi3mini import hub  # noqa: E402
from phi3lora.serve import multi_lora  # noqa: E402
from phi3lora.serve.engine import Engine, Request, Sampling  # noqa: E402

TARGET = 4.0  # 16 streams should serve at least 4x the tokens/s of sequential serving


def random_adapter(model, seed: int, r: int):
    def load(m):
        lora.inject(m, lora.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["qkv_proj", "o_proj", "gate_up_proj",
                                                                              "down_proj"]))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen).to(p) * 0.01)
    return multi_lora.adapter_factors(model, load)


def serve_all(engine: Engine, tok, prompts, tokens: int, concurrency: int) -> dict:
    """Serve every prompt with at most `concurrency` in flight; tokens/s, time to first token, decode steps."""
    slots = threading.Semaphore(concurrency)
    ttft, ends, threads = [], [], []
    steps0 = engine.steps
    start = time.perf_counter()

    def one(i, ids):
        with slots:
            sent, first, done = time.perf_counter(), [], threading.Event()

            def emit(event):
                if not first:
                    first.append(time.perf_counter())  # the first token's event (text, or done)
                if event[0] != "text":
                    done.set()
            engine.submit(Request(ids, i % 3 - 1, Sampling(max_tokens=tokens, ignore_eos=True), emit, tok,
                                  engine.device))
            done.wait()
            ttft.append(first[0] - sent)
            ends.append(time.perf_counter())

    for i, ids in enumerate(prompts):
        threads.append(threading.Thread(target=one, args=(i, ids)))
        threads[-1].start()
    for t in threads:
        t.join()
    wall = max(ends) - start
    return {"concurrency": concurrency, "requests": len(prompts), "tokens": tokens * len(prompts), "wall_s": wall,
            "tokens_per_s": tokens * len(prompts) / wall, "ttft_mean_ms": statistics.mean(ttft) * 1000,
            "ttft_max_ms": max(ttft) * 1000, "decode_steps": engine.steps - steps0}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # on a shared machine, spinning OpenMP threads cost more than they give

    model, tok = hub.load(args.model, args.device, args.dtype)
    rows = multi_lora.install(model, [random_adapter(model, s, args.rank) for s in (1, 2)])
    engine = Engine(model, tok, rows, max_batch=max(int(c) for c in args.concurrency.split(",")),
                    max_queue=args.requests).start()
    prompts = [tok.encode_chat([{"role": "user", "content": f"Question {i}: " + "tell me about LoRA. " * (1 + i % 4)}],
                               add_generation_prompt=True) for i in range(args.requests)]
    try:
        serve_all(engine, tok, prompts[:2], 4, 2)  # warm-up
        rows_out = [serve_all(engine, tok, prompts, args.tokens, int(c)) for c in args.concurrency.split(",")]
    finally:
        engine.close()
    base = rows_out[0]["tokens_per_s"]
    dtype = str(engine.dtype).replace("torch.", "")
    print(f"{args.model} on {engine.device} ({dtype}), {args.requests} requests x {args.tokens} tokens, "
          f"base + 2 adapters (r={args.rank}) mixed")
    print(f"{'streams':>8} {'tokens/s':>9} {'vs 1':>6} {'TTFT mean':>10} {'TTFT max':>9} {'steps':>6}")
    for r in rows_out:
        r["speedup"] = r["tokens_per_s"] / base
        print(f"{r['concurrency']:>8} {r['tokens_per_s']:>9.1f} {r['speedup']:>5.2f}x {r['ttft_mean_ms']:>8.0f}ms "
              f"{r['ttft_max_ms']:>7.0f}ms {r['decode_steps']:>6}")
    top = rows_out[-1]
    result = {"model": args.model, "device": str(engine.device), "dtype": dtype,
              "requests": args.requests, "tokens": args.tokens, "rank": args.rank,
              "threads": torch.get_num_threads(), "rows": rows_out,
              "target_speedup": TARGET, "target_met": top["concurrency"] >= 16 and top["speedup"] >= TARGET}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
