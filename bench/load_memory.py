"""How much memory loading a checkpoint adds, as a multiple of the weights' size.

Writes a random Phi-3-shaped checkpoint (default about 1.2 GB in fp32, sharded like the Hub's), then loads it in a
fresh process with `Phi3.from_pretrained` and reports the peak resident memory the load added (VmHWM after
minus resident memory before). Target: at most 1.3x the weights' size. With --quantize nf4 the projections are
quantized tensor by tensor while loading (QLoRA): the peak should stay near the 4-bit model plus one dense tensor,
far below the dense checkpoint.

    python bench/load_memory.py                 # ~1.2 GB fp32 checkpoint in a temporary folder
    python bench/load_memory.py --layers 40 --store-dtype bfloat16   # ~1.2 GB bf16 checkpoint, as on the Hub
    python bench/load_memory.py --hidden 256 --layers 2   # a quick smoke run
    python bench/load_memory.py --layers 40 --store-dtype bfloat16 --quantize nf4   # peak of a 4-bit load
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    # VmHWM belongs to this process image; ru_maxrss would also count the parent's peak, inherited at fork
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(folder: str, dtype: str, quantize: str = "") -> dict:
    """Runs in the child process: load and report."""
    import torch

    from phi3lora.phi3mini import Phi3
    from phi3lora.phi3mini.quant import base_weight_bytes  # imports the kernels (Triton) before the baseline is taken

    before = rss_bytes()
    model = Phi3.from_pretrained(folder, dtype=getattr(torch, dtype) if dtype else None, quantize=quantize)
    peak = peak_rss_bytes()
    # 4-bit: the packed codes plus their scales and tables (buffers); dense: the parameters
    weights = base_weight_bytes(model) if quantize else sum(p.numel() * p.element_size() for p in model.parameters())
    checkpoint = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
    return {"weights_bytes": weights, "checkpoint_bytes": checkpoint, "quantize": quantize, "rss_before": before,
            "peak_rss": peak, "added_bytes": peak - before, "ratio": (peak - before) / weights}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=32064)
    ap.add_argument("--shard-mb", type=int, default=400)
    ap.add_argument("--store-dtype", default="float32", help="dtype of the checkpoint written")
    ap.add_argument("--dtype", default="", help="load as this dtype (default: as stored)")
    ap.add_argument("--quantize", default="", choices=["", "nf4"],
                    help="nf4: quantize the projections while loading; the ratio is then to the 4-bit weights, "
                         "and dense_bytes says what the checkpoint holds")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.dtype, args.quantize)))
        return {}

    import torch

    from phi3lora.phi3mini import Phi3

    with tempfile.TemporaryDirectory() as tmp:
        model = Phi3.from_name("tiny", hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                               num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                               num_key_value_heads=args.hidden // 64, vocab_size=args.vocab,
                               dtype=getattr(torch, args.store_dtype))
        model.save_pretrained(tmp, max_shard_bytes=args.shard_mb * 1024**2)
        del model
        out = subprocess.run([sys.executable, __file__, "--child", tmp, "--dtype", args.dtype,
                              "--quantize", args.quantize],
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    gb = 1024**3
    print(f"{'weights':>10} {'added by load':>14} {'ratio':>7}")
    print(f"{result['weights_bytes'] / gb:9.2f}G {result['added_bytes'] / gb:13.2f}G {result['ratio']:7.2f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
