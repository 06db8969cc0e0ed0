"""QLoRA linear layer, forward + backward: our fused NF4 GEMM against bitsandbytes' way and our bf16 LoRA GEMM.

    (a) ours-nf4   kernels.nf4_lora.nf4_lora_linear: W decoded from NF4 tile by tile inside the fused LoRA GEMM
    (b) bnb        bitsandbytes.functional.dequantize_4bit(W4) -> bf16 W, then x·Wᵀ + s·(x·Aᵀ)·Bᵀ in torch
                   (what peft + bitsandbytes' MatMul4Bit compute; unsloth's fast_dequantize is the same idea)
    (c) ours-bf16  kernels.lora_linear with a dense bf16 W (the LoRA step QLoRA is compared with; target >= 0.9x)

Shapes are Phi-3-mini's projections (K, N) with M tokens; r = 16. Each row checks (a) and (b) against the dense
dequant(W4) reference (y, dX, dA, dB). (*) bitsandbytes 0.50.2's CPU dequantizer disagrees with its own CUDA/torch
path when a row is not a multiple of 64 elements (tests/test_nf4.py), so the smoke shapes keep K a multiple of 64.
On the CPU it is a smoke run: small M, the interpreter when TRITON_INTERPRET=1, else our torch reference; timings
there are not the kernels'. A table, then one JSON line.

    python bench/qlora_matmul.py                        # CPU smoke (or the GPU grid on a CUDA machine)
    python bench/qlora_matmul.py --tokens 4096 --shapes qkv,gate_up,down,o
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

CUDA = torch.cuda.is_available()
SHAPES = {"qkv": (3072, 9216), "o": (3072, 3072), "gate_up": (3072, 16384), "down": (8192, 3072)}  # (K, N)
SMOKE = {"qkv": (128, 192), "o": (128, 128), "gate_up": (128, 256), "down": (192, 128)}  # K % 64 == 0 (*)


def bench(fn, warmup, rep) -> float:
    """Mean ms per call: triton.testing.do_bench on the GPU, a plain loop on the CPU."""
    if CUDA:
        import triton
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep))
    fn()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - t0) / 3 * 1e3


def paths(w, tensors, dtype, device):
    """{name: fn(x, A, B) -> y} for the three ways."""
    from phi3lora.kernels.lora_matmul import lora_linear
    from phi3lora.kernels.nf4_lora import nf4_lora_linear

    def ours_nf4(x, A, B):
        return nf4_lora_linear(x, tensors, None, A, B, 2.0)

    def ours_bf16(x, A, B):
        return lora_linear(x, w, None, A, B, 2.0)

    out = {"ours-nf4": ours_nf4, "ours-bf16": ours_bf16}
    try:
        import bitsandbytes.functional as bnbF
        packed, state = bnbF.quantize_4bit(w.float().cpu(), blocksize=64, compress_statistics=True, quant_type="nf4")
        packed = packed.to(device)
        state.to(device)  # in place

        def bnb(x, A, B):
            W = bnbF.dequantize_4bit(packed, state).to(dtype)               # (N, K) temporary
            return torch.nn.functional.linear(x, W) + 2.0 * ((x @ A.t().to(dtype)) @ B.t().to(dtype))
        out["bnb"] = bnb
    except Exception as e:  # noqa: BLE001 - bitsandbytes missing or without a kernel for this device
        print(f"bitsandbytes path skipped: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
    return out


def run_case(name, K, N, M, r, dtype, device, warmup, rep) -> dict:
    from phi3lora.kernels.nf4 import quantize_nf4

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(device, dtype)
    tensors = {k: v.to(device) for k, v in quantize_nf4(w).items()}
    x0 = torch.randn(M, K, generator=g).to(device, dtype)
    A0 = (torch.randn(r, K, generator=g) * K ** -0.5).to(device)
    B0 = (torch.randn(N, r, generator=g) * 0.1).to(device)
    dy = torch.randn(M, N, generator=g).to(device, dtype)

    def step(fn):
        x, A, B = (t.detach().clone().requires_grad_() for t in (x0, A0, B0))
        y = fn(x, A, B)
        y.backward(dy)
        return y, x.grad, A.grad, B.grad

    from phi3lora.kernels.nf4_lora import nf4_lora_linear_reference
    ref = step(lambda x, A, B: nf4_lora_linear_reference(x, tensors, None, A, B, 2.0))
    row = {"shape": name, "M": M, "K": K, "N": N, "r": r, "ms": {}, "err": {}}
    for pname, fn in paths(w, tensors, dtype, device).items():
        got = step(fn)
        if pname != "ours-bf16":  # bf16 runs on the dense W, not dequant(W4): no common reference
            row["err"][pname] = max((a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1e-6)
                                    for a, b in zip(got, ref))
        row["ms"][pname] = bench(lambda fn=fn: step(fn), warmup, rep)
    row["nf4_vs_bf16"] = row["ms"]["ours-bf16"] / row["ms"]["ours-nf4"]
    if "bnb" in row["ms"]:
        row["nf4_vs_bnb"] = row["ms"]["bnb"] / row["ms"]["ours-nf4"]
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="qkv,o,gate_up,down")
    ap.add_argument("--tokens", type=int, default=4096 if CUDA else 37)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16" if CUDA else "float32")
    ap.add_argument("--warmup", type=int, default=25)
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    args = ap.parse_args(argv)
    device = "cuda" if CUDA else "cpu"
    dtype = getattr(torch, args.dtype)
    sizes = SHAPES if CUDA else SMOKE
    rows = [run_case(s, *sizes[s], args.tokens, args.rank, dtype, device, args.warmup, args.rep)
            for s in args.shapes.split(",")]
    print(f"{'shape':>8} {'M':>6} {'K':>6} {'N':>6}  " + "".join(f"{p:>11}" for p in ("ours-nf4", "bnb", "ours-bf16"))
          + f" {'bf16/nf4':>9} {'bnb/nf4':>8}  max rel err")
    for r in rows:
        ms = "".join(f"{r['ms'].get(p, float('nan')):10.3f}m" for p in ("ours-nf4", "bnb", "ours-bf16"))
        print(f"{r['shape']:>8} {r['M']:6d} {r['K']:6d} {r['N']:6d}  {ms} {r['nf4_vs_bf16']:9.2f} "
              f"{r.get('nf4_vs_bnb', float('nan')):8.2f}  {max(r['err'].values()):.1e}")
    result = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "dtype": args.dtype, "rows": rows,
              "note": "" if CUDA else "CPU smoke: timings are the interpreter's or torch's, not the kernels'"}
    print(json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
