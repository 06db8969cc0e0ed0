"""Packed-row attention: the dense (B, 1, T, T) mask against structured attention (phi3mini/attention.py).

One LoRA training step (forward + backward, r 16 on qkv/o/gate_up/down, labels on every token) over a packed row
of width T filled with documents whose lengths follow the sample data (data/sample_chat.jsonl tokenized with the
tiny tokenizer, cycled in a seeded order; the last document is cut to fit).

CPU (default): a small Phi-3-shaped model (2 layers, 8 heads of 32, window 2047, fp32) at T = 1k, 2k, 4k, 8k; each
(T, path) runs in its own process, and peak memory is the growth of the process's peak RSS over the step (model and
inputs excluded); "largest tensor" is the biggest single tensor any op allocated in one step (recorded with a
TorchDispatchMode: exact, independent of the allocator). Paths: dense (the mask) and segments (per document).

GPU (--gpu): Phi-3-mini's shapes (--layers of them, bf16) at T = 2k, 4k, 8k; paths dense (mask), flex (FlexAttention
block mask) and padded (the same documents unpacked, one per row, right-padded to the longest): tokens/s counts
real tokens only; peak memory is torch.cuda.max_memory_allocated over the timed steps.

Both report the fraction of 128×128 attention tiles a block mask skips for that length mix: of the full T×T square,
and of the causal triangle that plain causal attention would compute.

    PYTHONPATH=. python bench/packed_attention.py                       # CPU table + JSON line
    PYTHONPATH=. python bench/packed_attention.py --gpu --layers 8      # GPU (what bench/gpu_check.py runs)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phi3lora import lora  # noqa: E402
from phi3lora.phi3mini import Phi3, Phi3Config  # noqa: E402
from phi3lora.phi3mini.attention import build_attention_mask  # noqa: E402

CPU_MODEL = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=8, pad_token_id=0, sliding_window=2047)
FALLBACK_LENGTHS = [19, 148, 57, 40, 72, 33, 91, 45, 60, 28]  # if the sample data cannot be read


def sample_lengths() -> list[int]:
    """Token lengths of data/sample_chat.jsonl's examples with the tiny tokenizer (the realistic mix)."""
    try:
        from phi3lora.data import load_data
        from phi3lora.phi3mini import Tokenizer
        train = load_data(str(ROOT / "data" / "sample_chat.jsonl"), Tokenizer.tiny(), 4096, cache="off").train
        return [len(e) for e in train] if isinstance(train, list) else train.lengths.tolist()
    except Exception as e:  # noqa: BLE001 - the bench still runs, and says so
        print(f"note: sample data not read ({type(e).__name__}: {e}); using a fixed length mix", file=sys.stderr)
        return FALLBACK_LENGTHS


def pack(lengths: list[int], T: int, seed: int = 0) -> list[int]:
    """Document lengths filling one row of exactly T tokens, drawn from `lengths` in a seeded cycle."""
    rng = random.Random(seed)
    out = []
    while sum(out) < T:
        pool = list(lengths)
        rng.shuffle(pool)
        for n in pool:
            out.append(min(n, T - sum(out)))
            if sum(out) == T:
                break
    return out


def packed_inputs(docs: list[int], vocab: int, device):
    g = torch.Generator().manual_seed(0)
    T = sum(docs)
    ids = torch.randint(3, vocab, (1, T), generator=g)
    pos = torch.cat([torch.arange(n) for n in docs])[None]
    doc = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(docs)])[None]
    return {"input_ids": ids.to(device), "labels": ids.to(device), "position_ids": pos.to(device),
            "document_ids": doc.to(device)}


def padded_inputs(docs: list[int], vocab: int, device):
    # the unpacked baseline: one document per row, right-padded to the longest (pads get label -100)
    g = torch.Generator().manual_seed(0)
    width = max(docs)
    ids = torch.randint(3, vocab, (len(docs), width), generator=g)
    real = torch.arange(width)[None] < torch.tensor(docs)[:, None]
    labels = ids.masked_fill(~real, -100)
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def tiles_skipped(docs: list[int], window: int | None, block: int = 128) -> dict:
    """Fraction of block×block tiles with no allowed (query, key) pair, from the dense mask (built here only)."""
    T = sum(docs)
    n = -(-T // block)
    doc = torch.cat([torch.full((d,), i + 1) for i, d in enumerate(docs)])[None]
    mask = build_attention_mask(T, T, 0, window, None, doc, "cpu")[0, 0]  # (T, T)
    mask = torch.nn.functional.pad(mask, (0, n * block - T, 0, n * block - T))
    computed = int(mask.view(n, block, n, block).any(dim=3).any(dim=1).sum())
    return {"of_square": round(1 - computed / (n * n), 4), "of_causal": round(1 - computed / (n * (n + 1) / 2), 4)}


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bytes, self.shape = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.bytes:
                self.bytes, self.shape = t.numel() * t.element_size(), tuple(t.shape)
        return out


def build(config: dict, device, dtype) -> Phi3:
    model = Phi3(Phi3Config(**config))
    model.init_weights(0)
    model = model.to(device=device, dtype=dtype)
    lora.inject(model, lora.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0))
    return model.to(device=device, dtype=dtype).train()


def step(model, inputs):
    model.zero_grad(set_to_none=True)
    model(**inputs).backward()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_case(T: int, path: str, steps: int, lengths: list[int]) -> dict:
    """One (T, path) in this process: run it in a fresh process so the peak RSS belongs to it alone."""
    torch.manual_seed(0)
    model = build(CPU_MODEL, "cpu", torch.float32)
    model.attention_backend = "dense" if path == "dense" else "segments"
    docs = pack(lengths, T)
    inputs = packed_inputs(docs, CPU_MODEL["vocab_size"], "cpu")
    base = rss_mb()
    times = []
    for _ in range(steps + 1):  # the first is the warm-up
        t0 = time.perf_counter()
        step(model, inputs)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    with LargestTensor() as rec:
        step(model, inputs)
    return {"T": T, "path": path, "docs": len(docs), "step_s": round(statistics.median(times[1:]), 4),
            "tokens_per_s": round(T / statistics.median(times[1:]), 1), "peak_mb": round(peak - base, 1),
            "largest_tensor_mb": round(rec.bytes / 2**20, 2), "largest_tensor_shape": list(rec.shape)}


def run_cpu(args, lengths) -> list[dict]:
    rows = []
    start = time.monotonic()
    for T in args.seq:
        for path in ("dense", "segments"):
            if time.monotonic() - start > args.budget_s:
                rows.append({"T": T, "path": path, "skipped": "budget"})
                continue
            cmd = [sys.executable, __file__, "--case", f"{T},{path}", "--steps", str(args.steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                rows.append({"T": T, "path": path, "error": proc.stderr.strip().splitlines()[-1:]})
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  T={T} {path}: done", file=sys.stderr, flush=True)
    return rows


def run_gpu(args, lengths) -> list[dict]:
    from phi3lora.phi3mini.attention import attention_backend
    dev = torch.device("cuda")
    config = dict(Phi3Config().__dict__)  # Phi-3-mini-4k's shapes
    config = {k: v for k, v in config.items() if k not in ("rotary_dim", "rope_scale", "rope_attention_factor")}
    config["num_hidden_layers"] = args.layers
    config["max_position_embeddings"] = max(config["max_position_embeddings"], max(args.seq))
    model = build(config, dev, torch.bfloat16)
    model.gradient_checkpointing = args.checkpointing
    chosen = attention_backend(dev, torch.bfloat16, model.config.num_attention_heads,
                               model.config.num_key_value_heads, model.config.head_dim)
    rows, start = [], time.monotonic()
    for T in args.seq:
        docs = pack(lengths, T)
        for path in ("dense", "flex", "padded"):
            if time.monotonic() - start > args.budget_s:
                rows.append({"T": T, "path": path, "skipped": "budget"})
                continue
            if path == "flex" and chosen != "flex":
                rows.append({"T": T, "path": path, "skipped": f"FlexAttention unavailable (auto chose {chosen})"})
                continue
            model.attention_backend = "dense" if path == "dense" else "flex"
            inputs = (padded_inputs if path == "padded" else packed_inputs)(docs, config["vocab_size"], dev)
            try:
                for _ in range(2):  # warm-up (and FlexAttention's compile for this length bucket)
                    step(model, inputs)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step(model, inputs)
                torch.cuda.synchronize()
                dt = (time.perf_counter() - t0) / args.steps
                rows.append({"T": T, "path": path, "docs": len(docs), "rows": inputs["input_ids"].shape[0],
                             "step_s": round(dt, 4), "tokens_per_s": round(T / dt, 1),
                             "peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)})
            except torch.cuda.OutOfMemoryError:
                rows.append({"T": T, "path": path, "error": "out of memory"})
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    return rows


def table(rows: list[dict], gpu: bool) -> str:
    head = "| T | path | docs | step s | tokens/s | peak MiB |" + ("" if gpu else " largest tensor MiB (shape) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "step_s" not in r:
            lines.append(f"| {r['T']} | {r['path']} | {r.get('skipped') or r.get('error')} |")
            continue
        line = f"| {r['T']} | {r['path']} | {r['docs']} | {r['step_s']} | {r['tokens_per_s']} | {r['peak_mb']} |"
        if not gpu:
            line += f" {r['largest_tensor_mb']} ({'×'.join(map(str, r['largest_tensor_shape']))}) |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="the GPU version (dense / flex / padded)")
    ap.add_argument("--seq", default=None, help="row widths (CPU 1024,2048,4096,8192; GPU 2048,4096,8192)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per case (after one or two warm-ups)")
    ap.add_argument("--layers", type=int, default=32, help="GPU: decoder layers of Phi-3-mini's shape")
    ap.add_argument("--checkpointing", action="store_true", help="GPU: activation checkpointing")
    ap.add_argument("--budget-s", type=float, default=900.0, help="start no new case after this many seconds")
    ap.add_argument("--json-out", default=None, help="also write the result JSON here")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: one CPU case, JSON on stdout
    args = ap.parse_args(argv)
    lengths = sample_lengths()
    if args.case:
        T, path = args.case.split(",")
        print(json.dumps(cpu_case(int(T), path, args.steps, lengths)))
        return
    if args.gpu and not torch.cuda.is_available():
        ap.error("--gpu needs CUDA")
    args.seq = [int(s) for s in (args.seq or ("2048,4096,8192" if args.gpu else "1024,2048,4096,8192")).split(",")]
    rows = run_gpu(args, lengths) if args.gpu else run_cpu(args, lengths)
    window = 2047
    skipped = {T: tiles_skipped(pack(lengths, T), window) for T in args.seq}
    print(table(rows, args.gpu))
    print("\ntiles (128×128) a block mask skips, sample-data length mix "
          f"(mean {statistics.mean(lengths):.0f} tokens, window {window}):")
    for T, s in skipped.items():
        print(f"  T={T}: {s['of_square']:.1%} of the T×T square, {s['of_causal']:.1%} of the causal triangle")
    result = {"bench": "packed_attention", "device": torch.cuda.get_device_name() if args.gpu else "cpu",
              "torch": torch.__version__, "model": "phi3-mini shapes" if args.gpu else CPU_MODEL,
              "layers": args.layers if args.gpu else CPU_MODEL["num_hidden_layers"],
              "mean_doc_len": round(statistics.mean(lengths), 1), "rows": rows,
              "tiles_skipped": {str(T): s for T, s in skipped.items()}}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
