"""Many LoRA adapters in one batch: one projection layer (y = x·Wᵀ + s_i·(x·A_iᵀ)·B_iᵀ per row) four ways.

    per_request   each request alone (N = 1 per call): what a server without batching does
    per_adapter   one batch per adapter present: the rows of each adapter, base GEMM and LoRA pair each time
                  (a server that batches but cannot mix adapters in a batch: W is read once per adapter)
    gathered      one base GEMM over all rows + kernels.gathered_lora_reference (one LoRA GEMM pair per adapter
                  present, plain torch)
    triton        one base GEMM + kernels.gathered_lora (CUDA only: the sorted-tile shrink/expand Triton pair)

    PYTHONPATH=. python bench/gathered_lora.py                   # CPU: qkv scaled down (K 1024, M 3072), fp32
    PYTHONPATH=. python bench/gathered_lora.py --rows 16 --adapters 4 --rep 3
    PYTHONPATH=. python bench/gathered_lora.py --k 3072 --m 9216  # GPU default: Phi-3-mini's qkv, bf16

Rows are assigned to adapters round robin (then shuffled), so each adapter present has rows/adapters requests.
Every method is checked against an fp32 evaluation of the same formula (`err`, relative to the largest output).
The CPU figures time torch on the CPU (no Triton: the interpreter's timings mean nothing); on CUDA
triton.testing.do_bench. The last line printed is JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
CUDA = torch.cuda.is_available()

from phi3lora.kernels import gathered_lora, gathered_lora_reference  # noqa: E402

METHODS = ("per_request", "per_adapter", "gathered", "triton")


def per_request(x, W, A, B, ids, s):
    out = torch.empty(x.shape[0], W.shape[0], dtype=x.dtype, device=x.device)
    for n in range(x.shape[0]):  # one call per request, (1, K) each
        xn, i = x[n:n + 1], int(ids[n])
        out[n:n + 1] = xn @ W.t() + (xn @ A[i].t()) @ B[i].t() * s[i] if i >= 0 else xn @ W.t()
    return out


def per_adapter(x, W, A, B, ids, s):
    out = torch.empty(x.shape[0], W.shape[0], dtype=x.dtype, device=x.device)
    for i in ids.unique().tolist():  # one batch per adapter: the base GEMM runs once per group
        rows = (ids == i).nonzero().squeeze(-1)
        xr = x[rows]
        out[rows] = xr @ W.t() + (xr @ A[i].t()) @ B[i].t() * s[i] if i >= 0 else xr @ W.t()
    return out


def gathered(x, W, A, B, ids, s):
    return x @ W.t() + gathered_lora_reference(x, A, B, ids, s)


def triton_gathered(x, W, A, B, ids, s):
    return x @ W.t() + gathered_lora(x, A, B, ids, s)


RUN = dict(per_request=per_request, per_adapter=per_adapter, gathered=gathered, triton=triton_gathered)


def time_ms(fns, warmup, rep):
    """Milliseconds per call of each fn: do_bench on CUDA; on the CPU the methods take turns, rep rounds, and the
    best round counts (the machine is shared: turns spread a busy spell over all methods, the minimum is the
    least disturbed call)."""
    if CUDA:
        import triton.testing
        torch.cuda.synchronize()
        return {k: float(triton.testing.do_bench(fn, warmup=warmup, rep=rep)) for k, fn in fns.items()}
    times = {k: [] for k in fns}
    for i in range(warmup + rep):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: min(v) for k, v in times.items()}


def case(n_rows, n_adapters, k, m, r, dtype, device, warmup, rep, methods):
    g = torch.Generator().manual_seed(n_rows * 100 + n_adapters)
    x = torch.randn(n_rows, k, generator=g)
    W = torch.randn(m, k, generator=g) * k ** -0.5
    A = torch.randn(n_adapters, r, k, generator=g) * k ** -0.5
    B = torch.randn(n_adapters, m, r, generator=g) * r ** -0.5
    s = torch.full((n_adapters,), 2.0)
    ids = (torch.arange(n_rows) % n_adapters)[torch.randperm(n_rows, generator=g)]
    want = x @ W.t() + gathered_lora_reference(x, A, B, ids, s)                 # fp32 on the CPU
    x, W, A, B = (t.to(device, dtype) for t in (x, W, A, B))
    ids, s = ids.to(device), s.to(device)
    row = dict(rows=n_rows, adapters=n_adapters, K=k, M=m, R=r, dtype=str(dtype).split(".")[-1], ms={}, err={})
    for name in methods:
        got = RUN[name](x, W, A, B, ids, s)
        row["err"][name] = float((got.float().cpu() - want).abs().max() / want.abs().max())
    row["ms"] = time_ms({name: (lambda fn=RUN[name]: fn(x, W, A, B, ids, s)) for name in methods}, warmup, rep)
    base = row["ms"]["per_adapter"] if "per_adapter" in row["ms"] else None
    row["speedup_vs_per_adapter"] = {k: base / v for k, v in row["ms"].items()} if base else {}
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="16,64", help="requests in the batch (decode: one row each)")
    ap.add_argument("--adapters", default="1,4,16", help="adapters present in the batch")
    ap.add_argument("--k", type=int, default=3072 if CUDA else 1024, help="in features (Phi-3-mini: 3072)")
    ap.add_argument("--m", type=int, default=9216 if CUDA else 3072, help="out features (qkv: 9216)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=25 if CUDA else 1)
    ap.add_argument("--rep", type=int, default=100 if CUDA else 15, help="ms for do_bench on CUDA, rounds on CPU")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch (1: steadier on a shared CPU)")
    ap.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    args = ap.parse_args(argv)
    if not CUDA:
        torch.set_num_threads(args.threads)
    device = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32
    methods = METHODS if CUDA else METHODS[:3]
    torch.manual_seed(0)
    rows = [case(n, a, args.k, args.m, args.rank, dtype, device, args.warmup, args.rep, methods)
            for n in (int(v) for v in args.rows.split(",")) for a in (int(v) for v in args.adapters.split(","))
            if a <= n]
    device_name = torch.cuda.get_device_name() if CUDA else "CPU"
    print(f"gathered LoRA layer, {device_name}, {rows[0]['dtype']}, K {args.k}, M {args.m}, r {args.rank}; "
          f"ms per call (speedup vs per_adapter)")
    print("| rows | adapters | " + " | ".join(methods) + " | max err |")
    print("|---|---|" + "---|" * len(methods) + "---|")
    for r in rows:
        cells = [f"{r['ms'][m]:.3f} ({r['speedup_vs_per_adapter'][m]:.2f}x)" for m in methods]
        print(f"| {r['rows']} | {r['adapters']} | " + " | ".join(cells) + f" | {max(r['err'].values()):.1e} |")
    result = dict(device=device_name, torch=torch.__version__, threads=torch.get_num_threads(), rows=rows,
                  checks_ok=all(max(r["err"].values()) < (1e-5 if dtype == torch.float32 else 2e-2) for r in rows))
    line = json.dumps(result)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(line + "\n")
    print(line)
    return result


if __name__ == "__main__":
    main()
