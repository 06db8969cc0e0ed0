"""LoRA linear layer four ways at Phi-3-mini's projection shapes: time, TFLOP/s, fraction of peak, ratio to base GEMM.

    (a) base    x·Wᵀ alone (cuBLAS): the lower bound; its backward is dX = dY·W only (W is frozen)
    (b) peft    x·Wᵀ + s·(x·Aᵀ)·Bᵀ as three matmuls and an add, autograd backward (peft's LoRA Linear, no dropout)
    (c) addmm   out = x·Wᵀ; out.addmm_(x·Aᵀ, Bᵀ, alpha=s) in place, and the same trick for dX (unsloth's way)
    (d) ours    kernels.lora_linear: the low-rank term in the epilogue of one Triton GEMM, forward and dX

    PYTHONPATH=. python bench/lora_matmul.py                    # H100: 4 shapes x M {4096, 8192, 16384} x r {8, 16, 64}
    PYTHONPATH=. python bench/lora_matmul.py --quick            # M 4096, r 16
    PYTHONPATH=. python bench/lora_matmul.py --shapes qkv,down --tokens 8192 --ranks 16
    PYTHONPATH=. python bench/lora_matmul.py --shapes qkv --json-out out/lm_qkv.json     # one chunk of the grid
    PYTHONPATH=. python bench/lora_matmul.py --merge out/lm_*.json   # chunks -> one table, summary and targets

Before timing, every case checks (b), (c) and (d) against an fp32 reference of the same formula: output and the
gradients of x, A and B (the `check` columns); a bad value is flagged in the table and in `summary.checks_ok`.
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

from phi3lora.kernels import lora_linear  # noqa: E402

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


# max relative error (to the reference's largest magnitude) a system may show before it is flagged: bf16 rounds
# the output and the thin factors (xa, g) once each, so ~1e-2 is already a generous bound; fp32 matches to ~1e-6.
CHECK_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}


def check_case(x, weight, lora_A, lora_B, dy):
    """Max relative error of (b), (c), (d) against an fp32 autograd reference: y and the grads of x, A, B.

    Relative to the reference's largest magnitude, per tensor; the worst of the four per system. (a) is the base
    GEMM alone (no LoRA term), so it is not compared. Also warms every path up (Triton autotuning included)."""
    leaves = [t.detach().float().requires_grad_(t.requires_grad) for t in (x, weight, lora_A, lora_B)]
    y_ref = run_method("peft", *leaves)
    y_ref.backward(dy.float())
    ref = [y_ref.detach()] + [t.grad for t in (leaves[0], leaves[2], leaves[3])]
    del y_ref, leaves
    errs = {}
    for name in METHODS[1:]:
        for t in (x, lora_A, lora_B):
            t.grad = None
        y = run_method(name, x, weight, lora_A, lora_B)
        y.backward(dy)
        got = [y.detach(), x.grad, lora_A.grad, lora_B.grad]
        errs[name] = max(((g.float() - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
                         for g, e in zip(got, ref))
        del y, got
    for t in (x, lora_A, lora_B):
        t.grad = None
    return errs


def bench_case(shape, M, K, N, r, dtype, device, warmup, rep):
    # generated on the device: on the CPU, randn for the full grid (~4e9 values) would take tens of seconds
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*size, scale=1.0):
        return (torch.randn(*size, generator=g, device=device) * scale).to(dtype)

    x = rnd(M, K).requires_grad_(True)
    weight = rnd(N, K, scale=K ** -0.5)                      # frozen
    lora_A = rnd(r, K, scale=K ** -0.5).requires_grad_(True)
    lora_B = rnd(N, r, scale=r ** -0.5).requires_grad_(True)  # nonzero, so the check below sees the LoRA term
    dy = rnd(M, N)

    check = check_case(x, weight, lora_A, lora_B, dy)
    check_ok = all(e <= CHECK_TOL[dtype] for e in check.values())
    if not check_ok:
        print(f"WARNING {shape} M={M} r={r}: a system disagrees with the fp32 reference: {check}", file=sys.stderr)

    rows = []
    for pass_ in ("fwd", "fwd+bwd"):
        row = dict(shape=shape, M=M, K=K, N=N, r=r, **{"pass": pass_}, ms={}, tflops={}, vs_base={}, peak_mb={},
                   max_rel_err=check["ours"], check=check, check_ok=check_ok)
        for name in METHODS:
            grads = [x] if name == "base" else [x, lora_A, lora_B]
            if pass_ == "fwd":
                def fn(name=name):
                    with torch.no_grad():
                        run_method(name, x, weight, lora_A, lora_B)
            else:  # same work for every system: y, then dX (+ dA, dB for the LoRA systems); W is frozen
                def fn(name=name):
                    run_method(name, x, weight, lora_A, lora_B).backward(dy)
            # autotuning is out of the timing: check_case ran every path once, and do_bench's first call is
            # untimed too (its estimate and warm-up loops follow it)
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


def grid_complete(rows) -> bool:
    """Whether the rows cover issue 4's full grid (the targets are averages over it)."""
    have = {(r["shape"], r["M"], r["r"], r["pass"]) for r in rows}
    return all((s, m, r, p) in have for s in SHAPES for m in (4096, 8192, 16384) for r in (8, 16, 64)
               for p in ("fwd", "fwd+bwd"))


def summarize(rows, gpu):
    out = {"checks_ok": all(r.get("check_ok", True) for r in rows), "rows": len(rows),
           "grid_complete": grid_complete(rows)}
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
    if fb and gpu:  # the targets of project issue 4 (bench/RESULTS.md): averages over the full grid only
        if not out["grid_complete"]:
            out["targets_note"] = "partial grid: run the rest and combine the chunks with --merge"
        out["targets_met"] = dict(within_1_10x_of_base=fb["ours_over_base"] <= 1.10,
                                  at_least_1_15x_vs_peft=fb["speedup_vs_peft"] >= 1.15,
                                  faster_than_addmm=fb["speedup_vs_addmm"] > 1.0)
    return out


def print_table(rows, header):
    print(header)
    cols = (f"{'shape':<8}{'M':>6}{'r':>4} {'pass':<8}{'base ms':>9}{'peft':>17}{'addmm':>17}{'ours':>17}"
            f"{'ours TF/s':>11}{'% peak':>8}{'rel err':>9} check")
    print(cols)
    print("-" * len(cols))
    for r in rows:
        def cell(name):
            return f"{r['ms'][name]:9.3f} {r['vs_base'][name]:5.2f}x"
        print(f"{r['shape']:<8}{r['M']:>6}{r['r']:>4} {r['pass']:<8}{r['ms']['base']:9.3f}"
              f"{cell('peft'):>17}{cell('addmm'):>17}{cell('ours'):>17}"
              f"{r['tflops']['ours']:11.1f}{100 * r['ours_peak_fraction']:7.1f}%{r['max_rel_err']:9.1e} "
              f"{'ok' if r.get('check_ok', True) else 'FAILED ' + str(r.get('check'))}")


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
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="start no new case after this many seconds (the rest is listed as skipped), so a run "
                         "under a 10-minute limit still prints its table and JSON; 0 = no limit")
    ap.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="measure nothing: combine the JSON results of earlier runs (chunks of the grid, written "
                         "with --json-out or the last line of their output) into one table and summary")
    args = ap.parse_args(argv)
    if args.merge:
        return merge_results(args.merge, args.json_out)
    if args.quick and CUDA:
        args.tokens, args.ranks = "4096", "16"
    dtype = getattr(torch, args.dtype)
    device = "cuda" if CUDA else "cpu"

    rows, skipped = [], []
    t_start = time.perf_counter()
    for shape in args.shapes.split(","):
        K, N = shapes[shape]
        for M in (int(m) for m in args.tokens.split(",")):
            for r in (int(v) for v in args.ranks.split(",")):
                elapsed = time.perf_counter() - t_start
                if args.budget_s and elapsed > args.budget_s:
                    skipped.append(dict(shape=shape, M=M, r=r))
                    continue
                rows.extend(bench_case(shape, M, K, N, r, dtype, device, args.warmup, args.rep))
                # progress on stderr: if the run is killed, what was measured is still on screen
                print(f"  [{time.perf_counter() - t_start:6.1f} s] {shape} M={M} r={r}: " + ", ".join(
                    f"{row['pass']} ours {row['vs_base']['ours']:.3f}x base" for row in rows[-2:]), file=sys.stderr)
                if CUDA:
                    torch.cuda.empty_cache()
    if skipped:
        print(f"WARNING: time budget ({args.budget_s:.0f} s) spent; skipped {len(skipped)} cases: "
              + " ".join(f"{c['shape']}/M{c['M']}/r{c['r']}" for c in skipped), file=sys.stderr)

    name = torch.cuda.get_device_name() if CUDA else "cpu"
    if CUDA:
        header = (f"LoRA linear on {name}, {args.dtype}, s={SCALING}; ms and ratio to base GEMM; "
                  f"% peak of {H100_PEAK_BF16 / 1e12:.0f} TFLOP/s (H100 dense bf16)")
    else:
        header = ("CPU SMOKE RUN (Triton interpreter, fp32, tiny shapes): these numbers mean nothing about GPUs; "
                  "run on a CUDA machine for real figures")
    result = dict(bench="lora_matmul", device=name, dtype=args.dtype, cpu_smoke=not CUDA, scaling=SCALING,
                  peak_tflops=H100_PEAK_BF16 / 1e12, torch=torch.__version__, triton=_triton_version(),
                  seconds=round(time.perf_counter() - t_start, 1), skipped=skipped, rows=rows)
    return report(result, header, args.json_out)


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def report(result, header, json_out=None) -> dict:
    """Table, summary lines and the JSON last line (also written to json_out)."""
    rows = result["rows"]
    print_table(rows, header)
    summary = summarize(rows, gpu=not result["cpu_smoke"])
    for pass_ in ("fwd", "fwd+bwd"):
        if pass_ in summary:
            s = summary[pass_]
            print(f"{pass_:<8} mean over {summary['rows'] // 2} cases: ours {s['ours_over_base']:.3f}x base, "
                  f"{s['speedup_vs_peft']:.3f}x faster than peft, {s['speedup_vs_addmm']:.3f}x faster than addmm")
    if not summary["grid_complete"]:
        print("note: not the full grid (4 shapes x M 4096,8192,16384 x r 8,16,64); the targets are averages over "
              "all of it")
    if not summary["checks_ok"]:
        print("WARNING: some system disagreed with the fp32 reference (rows marked FAILED): do not trust the timings")
    result = {**result, "summary": summary}
    line = json.dumps(result)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(line + "\n")
    print(line)
    return result


def merge_results(paths, json_out=None) -> dict:
    """Combine the JSON results of several runs (chunks of the grid) into one; later rows replace earlier ones
    for the same (shape, M, r, pass)."""
    results = []
    for p in paths:
        lines = [ln for ln in Path(p).read_text().splitlines() if ln.startswith("{")]
        if not lines:
            raise SystemExit(f"{p}: no JSON line")
        results.append(json.loads(lines[-1]))
    devices = {r["device"] for r in results}
    dtypes = {r["dtype"] for r in results}
    if len(devices) > 1 or len(dtypes) > 1:
        raise SystemExit(f"refusing to merge runs from different devices or dtypes: {devices}, {dtypes}")
    by_key = {}
    for res in results:
        for row in res["rows"]:
            by_key[(row["shape"], row["M"], row["r"], row["pass"])] = row
    order = {name: i for i, name in enumerate(SHAPES)}
    rows = sorted(by_key.values(), key=lambda r: (order.get(r["shape"], 99), r["shape"], r["M"], r["r"],
                                                  r["pass"] != "fwd"))
    first = results[0]
    measured = {(r["shape"], r["M"], r["r"]) for r in rows}
    skipped = [c for res in results for c in res.get("skipped", []) if (c["shape"], c["M"], c["r"]) not in measured]
    merged = {**{k: v for k, v in first.items() if k not in ("rows", "summary", "skipped", "seconds")},
              "merged_from": [str(p) for p in paths], "seconds": sum(r.get("seconds", 0) for r in results),
              "skipped": skipped, "rows": rows}
    header = (f"LoRA linear on {first['device']}, {first['dtype']}, s={first['scaling']} (merged from {len(paths)} "
              f"runs); ms and ratio to base GEMM; % peak of {first['peak_tflops']:.0f} TFLOP/s")
    return report(merged, header, json_out)


if __name__ == "__main__":
    main()
