"""LoRA linear layer four ways at Phi-3-mini's projection shapes: time, TFLOP/s, fraction of peak, ratio to base GEMM.

    (a) base    x·Wᵀ alone (cuBLAS): the lower bound; its backward is dX = dY·W only (W is frozen)
    (b) peft    x·Wᵀ + s·(x·Aᵀ)·Bᵀ as three matmuls and an add, autograd backward (peft's LoRA Linear, no dropout)
    (c) addmm   out = x·Wᵀ; out.addmm_(x·Aᵀ, Bᵀ, alpha=s) in place, and the same trick for dX (unsloth's way)
    (d) ours    kernels.lora_linear: the low-rank term in the epilogue of one Triton GEMM, forward and dX

    PYTHONPATH=. python bench/lora_matmul.py                    # H100: 4 shapes x M {4096, 8192, 16384} x r {8, 16, 64}
    PYTHONPATH=. python bench/lora_matmul.py --quick            # M 4096, r 16
    PYTHONPATH=. python bench/lora_matmul.py --shapes qkv,down --tokens 8192 --ranks 16

Without CUDA it is a smoke run: tiny shapes, fp32, Triton's interpreter, time.perf_counter; it keeps the script alive
in CI and its timings mean nothing about GPUs. The last line printed is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels is imported: @triton.jit reads it

from kernels import lora_linear  # noqa: E402

# name: (K in_features, N out_features)
SHAPES = {"qkv": (3072, 9216), "o": (3072, 3072), "gate_up": (3072, 16384), "down": (8192, 3072)}
CPU_SHAPES = {"qkv": (64, 96), "o": (64, 64), "gate_up": (64, 128), "down": (128, 64)}
H100_PEAK_BF16 = 989e12  # dense bf16 FLOP/s, H100 SXM
SCALING = 2.0            # lora_alpha / r with alpha = 2r, a common choice
METHODS = ("base", "peft", "addmm", "ours")


def flop_count(M, K, N, r, pass_, lora=True):
    """Useful FLOPs of one call.

    forward:          2MNK (x·Wᵀ) + 2MKR (xa = x·Aᵀ) + 2MNR (xa·Bᵀ)
    forward+backward: forward + 2MNK (dY·W) + 2MNR (g = dY·B) + 2MKR (g·A) + 2MKR (dA = gᵀ·x) + 2MNR (dB = dYᵀ·xa)
                      = 4MNK + 6MKR + 6MNR
    base (a):         2MNK forward, 4MNK forward+backward (no dW: W is frozen)
    """
    if not lora:
        return 2 * M * N * K * (1 if pass_ == "fwd" else 2)
    if pass_ == "fwd":
        return 2 * M * N * K + 2 * M * K * r + 2 * M * N * r
    return 4 * M * N * K + 6 * M * K * r + 6 * M * N * r


class AddmmLoRA(torch.autograd.Function):
    """(c): cuBLAS base GEMM, then the low-rank term added in place by addmm_ (forward and dX), as unsloth does."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, s):
        xa = x @ lora_A.t()                                # (M, R)
        out = x @ weight.t()                               # (M, N)
        out.addmm_(xa, lora_B.t(), alpha=s)                # out += s·xa·Bᵀ: y read and written a second time
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa)
        ctx.s = s
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, xa = ctx.saved_tensors
        s = ctx.s
        g = dy @ lora_B                                    # (M, R)
        dx = dy @ weight                                   # (M, K)
        dx.addmm_(g, lora_A, alpha=s)                      # dX += s·g·A
        dA = torch.mm(g.t(), x).mul_(s)                    # (R, K)
        dB = torch.mm(dy.t(), xa).mul_(s)                  # (N, R)
        return dx, None, dA, dB, None


def run_method(name, x, weight, lora_A, lora_B):
    if name == "base":
        return x @ weight.t()
    if name == "peft":
        return F.linear(x, weight) + F.linear(F.linear(x, lora_A), lora_B) * SCALING
    if name == "addmm":
        return AddmmLoRA.apply(x, weight, lora_A, lora_B, SCALING)
    return lora_linear(x, weight, None, lora_A, lora_B, SCALING)


def time_ms(fn, grads, warmup, rep):
    """Mean milliseconds per call: do_bench on the GPU (warmup, L2 flushed, CUDA events), a plain loop on the CPU."""
    if CUDA:
        import triton.testing

        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grads))
    fn()  # warm-up (compiles nothing under the interpreter, but pays first-call costs)
    times = []
    for _ in range(2):
        for t in grads:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.mean(times)


def peak_mb(fn, grads):
    """Peak memory one call adds above what is already allocated (GPU only)."""
    if not CUDA:
        return None
    for t in grads:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def bench_case(shape, M, K, N, r, dtype, device, warmup, rep):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype)

    x = rnd(M, K).requires_grad_(True)
    weight = rnd(N, K, scale=K ** -0.5)                      # frozen
    lora_A = rnd(r, K, scale=K ** -0.5).requires_grad_(True)
    lora_B = rnd(N, r, scale=r ** -0.5).requires_grad_(True)  # nonzero, so the check below sees the LoRA term
    dy = rnd(M, N)

    with torch.no_grad():  # ours against peft's formula in the same dtype, relative to the output's scale
        y_ref = run_method("peft", x, weight, lora_A, lora_B).float()
        y_ours = run_method("ours", x, weight, lora_A, lora_B).float()
        max_rel_err = ((y_ours - y_ref).abs().max() / y_ref.abs().max()).item()
        del y_ref, y_ours

    rows = []
    for pass_ in ("fwd", "fwd+bwd"):
        row = dict(shape=shape, M=M, K=K, N=N, r=r, **{"pass": pass_}, ms={}, tflops={}, vs_base={}, peak_mb={},
                   max_rel_err=max_rel_err)
        for name in METHODS:
            grads = [x] if name == "base" else [x, lora_A, lora_B]
            if pass_ == "fwd":
                def fn(name=name):
                    with torch.no_grad():
                        run_method(name, x, weight, lora_A, lora_B)
            else:
                def fn(name=name):
                    run_method(name, x, weight, lora_A, lora_B).backward(dy)
            ms = time_ms(fn, grads, warmup, rep)
            row["ms"][name] = ms
            row["tflops"][name] = flop_count(M, K, N, r, pass_, lora=name != "base") / (ms * 1e-3) / 1e12
            row["peak_mb"][name] = peak_mb(fn, grads)
        for name in METHODS:
            row["vs_base"][name] = row["ms"][name] / row["ms"]["base"]
        row["ours_peak_fraction"] = row["tflops"]["ours"] * 1e12 / H100_PEAK_BF16
        rows.append(row)
        for t in (x, lora_A, lora_B):
            t.grad = None
    return rows


def summarize(rows, gpu):
    out = {}
    for pass_ in ("fwd", "fwd+bwd"):
        sel = [r for r in rows if r["pass"] == pass_]
        if not sel:
            continue
        ours_vs_base = statistics.mean(r["vs_base"]["ours"] for r in sel)
        vs_peft = statistics.mean(r["ms"]["peft"] / r["ms"]["ours"] for r in sel)
        vs_addmm = statistics.mean(r["ms"]["addmm"] / r["ms"]["ours"] for r in sel)
        out[pass_] = dict(ours_over_base=ours_vs_base, speedup_vs_peft=vs_peft, speedup_vs_addmm=vs_addmm,
                          ours_tflops_mean=statistics.mean(r["tflops"]["ours"] for r in sel))
    fb = out.get("fwd+bwd")
    if fb and gpu:  # the targets of project issue 4 (bench/RESULTS.md)
        out["targets_met"] = dict(within_1_10x_of_base=fb["ours_over_base"] <= 1.10,
                                  at_least_1_15x_vs_peft=fb["speedup_vs_peft"] >= 1.15,
                                  faster_than_addmm=fb["speedup_vs_addmm"] > 1.0)
    return out


def print_table(rows, header):
    print(header)
    cols = (f"{'shape':<8}{'M':>6}{'r':>4} {'pass':<8}{'base ms':>9}{'peft':>17}{'addmm':>17}{'ours':>17}"
            f"{'ours TF/s':>11}{'% peak':>8}{'rel err':>9}")
    print(cols)
    print("-" * len(cols))
    for r in rows:
        def cell(name):
            return f"{r['ms'][name]:9.3f} {r['vs_base'][name]:5.2f}x"
        print(f"{r['shape']:<8}{r['M']:>6}{r['r']:>4} {r['pass']:<8}{r['ms']['base']:9.3f}"
              f"{cell('peft'):>17}{cell('addmm'):>17}{cell('ours'):>17}"
              f"{r['tflops']['ours']:11.1f}{100 * r['ours_peak_fraction']:7.1f}%{r['max_rel_err']:9.1e}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shapes = SHAPES if CUDA else CPU_SHAPES
    ap.add_argument("--shapes", default=",".join(shapes), help=f"comma list of {','.join(shapes)}")
    ap.add_argument("--tokens", default="4096,8192,16384" if CUDA else "64", help="comma list of M")
    ap.add_argument("--ranks", default="8,16,64" if CUDA else "8", help="comma list of r")
    ap.add_argument("--dtype", default="bfloat16" if CUDA else "float32")
    ap.add_argument("--quick", action="store_true", help="M 4096 and r 16 only (on the CPU: the smoke defaults)")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    args = ap.parse_args(argv)
    if args.quick and CUDA:
        args.tokens, args.ranks = "4096", "16"
    dtype = getattr(torch, args.dtype)
    device = "cuda" if CUDA else "cpu"

    rows = []
    for shape in args.shapes.split(","):
        K, N = shapes[shape]
        for M in (int(m) for m in args.tokens.split(",")):
            for r in (int(v) for v in args.ranks.split(",")):
                rows.extend(bench_case(shape, M, K, N, r, dtype, device, args.warmup, args.rep))
                if CUDA:
                    torch.cuda.empty_cache()

    name = torch.cuda.get_device_name() if CUDA else "cpu"
    if CUDA:
        header = (f"LoRA linear on {name}, {args.dtype}, s={SCALING}; ms and ratio to base GEMM; "
                  f"% peak of {H100_PEAK_BF16 / 1e12:.0f} TFLOP/s (H100 dense bf16)")
    else:
        header = ("CPU SMOKE RUN (Triton interpreter, fp32, tiny shapes): these numbers mean nothing about GPUs; "
                  "run on a CUDA machine for real figures")
    print_table(rows, header)
    summary = summarize(rows, gpu=CUDA)
    for pass_ in ("fwd", "fwd+bwd"):
        if pass_ in summary:
            s = summary[pass_]
            print(f"{pass_:<8} mean over rows: ours {s['ours_over_base']:.3f}x base, "
                  f"{s['speedup_vs_peft']:.3f}x faster than peft, {s['speedup_vs_addmm']:.3f}x faster than addmm")
    result = dict(bench="lora_matmul", device=name, dtype=args.dtype, cpu_smoke=not CUDA, scaling=SCALING,
                  peak_tflops=H100_PEAK_BF16 / 1e12, rows=rows, summary=summary)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
