"""LoRA training-step throughput and memory: phi3-lora against transformers + peft, same shapes, same settings.

Full Phi-3-mini architecture with random weights (speed does not depend on their values, nothing is downloaded),
bf16, LoRA r=16 / alpha 32 / dropout 0.05 on qkv_proj, o_proj, gate_up_proj and down_proj, AdamW over the LoRA
parameters. For each sequence length, first both without activation checkpointing, then both with it, at the
largest batch that fits transformers + peft (so the comparison is at the same batch); then the longest sequence
each fits at batch 1 (with checkpointing).

Reports tokens/s, MFU (model FLOPs per token = 4·N_matmul + attention, see Phi3.flops_per_token, over the dense
bf16 peak), peak memory; a table for people and a JSON line last. Without CUDA it runs a small config on the CPU
(fp32) so CI keeps it alive, and prints our step time as a ratio to theirs.

    PYTHONPATH=. python bench/train_step.py                    # GPU: Phi-3-mini, seq 2048 and 4096
    PYTHONPATH=. python bench/train_step.py --no-kernels       # ours without the Triton kernels
    PYTHONPATH=. python bench/train_step.py --kernels rmsnorm,swiglu   # only some kernels
    python bench/train_step.py                                 # CPU smoke run
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lora  # noqa: E402
from phi3mini import Phi3, Phi3Config  # noqa: E402
from phi3mini.model import KERNEL_NAMES  # noqa: E402

TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def device_peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def small_config() -> Phi3Config:
    # the CPU smoke config: Phi-3's shape ratios, a few layers
    return Phi3Config(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                      vocab_size=4096, max_position_embeddings=4096, original_max_position_embeddings=4096,
                      sliding_window=2047, pad_token_id=0, eos_token_id=2)


def init_random_(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif "lora_B" not in name:
                p.normal_(0, 0.02)


# ----- the two systems ------------------------------------------------------------------------------------------
def build_ours(cfg: Phi3Config, dtype, device, checkpointing: bool, kernels: tuple[str, ...], compile_: bool):
    with torch.device(device):
        model = Phi3(cfg).to(dtype)
    model.rotary.reset_parameters(torch.device(device))
    init_random_(model)
    lora.inject(model, lora.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
    lora.mark_only_lora_as_trainable(model)
    for n, p in model.named_parameters():  # LoRA weights in fp32, as a mixed-precision trainer keeps them
        if p.requires_grad:
            p.data = p.data.float()
    model.set_kernels(False)
    if kernels:
        model.set_kernels(**{k: True for k in kernels})
    model.gradient_checkpointing = checkpointing
    model.train()
    fwd = torch.compile(model) if compile_ else model

    def loss_fn(ids):
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            return fwd(ids, labels=ids)

    return model, loss_fn


def build_theirs(cfg: Phi3Config, dtype, device, checkpointing: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import Phi3Config as HFConfig
    from transformers import Phi3ForCausalLM

    hf_cfg = HFConfig(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type")})
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = Phi3ForCausalLM(hf_cfg).to(dtype)
    init_random_(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=list(TARGETS),
                                             task_type="CAUSAL_LM"))
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    def loss_fn(ids):
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            return model(input_ids=ids, labels=ids).loss

    return model, loss_fn


# ----- measuring ------------------------------------------------------------------------------------------------
def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_steps(model, loss_fn, batch: int, seq: int, vocab: int, device, warmup: int, steps: int) -> dict:
    """Seconds per optimizer step and peak memory for (batch, seq). Raises torch.cuda.OutOfMemoryError."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else None
    return {"step_s": dt, "tokens_per_s": batch * seq / dt, "peak_mem_gb": peak / 1024**3 if peak else None,
            "loss": float(loss)}


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_one(system: str, cfg, dtype, device, ckpt, batch, seq, args) -> dict | None:
    try:
        if system == "ours":
            model, loss_fn = build_ours(cfg, dtype, device, ckpt, args.kernel_list, args.compile)
        else:
            model, loss_fn = build_theirs(cfg, dtype, device, ckpt)
        result = time_steps(model, loss_fn, batch, seq, cfg.vocab_size, device, args.warmup, args.steps)
    except torch.cuda.OutOfMemoryError:
        result = None
    model = loss_fn = None
    free()
    return result


def largest_batch(system, cfg, dtype, device, ckpt, seq, args, start=1, limit=64) -> int:
    """Doubling search for the largest batch (a power of two) that fits; 0 if even batch 1 does not."""
    best, b = 0, start
    while b <= limit:
        probe = argparse.Namespace(**{**vars(args), "warmup": 1, "steps": 1})
        if run_one(system, cfg, dtype, device, ckpt, b, seq, probe) is None:
            break
        best, b = b, b * 2
    return best


def longest_sequence(system, cfg, dtype, device, args, start=2048, limit=131072) -> int:
    best, t = 0, start
    probe = argparse.Namespace(**{**vars(args), "warmup": 1, "steps": 1})
    while t <= min(limit, cfg.max_position_embeddings):
        if run_one(system, cfg, dtype, device, True, 1, t, probe) is None:
            break
        best, t = t, t * 2
    return best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="LoRA training step: phi3-lora vs transformers + peft")
    ap.add_argument("--seq", default=None, help="comma-separated sequence lengths (GPU default 2048,4096)")
    ap.add_argument("--batch", type=int, default=0, help="fixed batch (default: the largest that fits theirs)")
    ap.add_argument("--kernels", default="all", help=f"comma list of {KERNEL_NAMES}, 'all' or 'none'")
    ap.add_argument("--no-kernels", action="store_true", help="same as --kernels none")
    ap.add_argument("--compile", action="store_true", help="torch.compile our model")
    ap.add_argument("--checkpointing", default="both", choices=["off", "on", "both"])
    ap.add_argument("--no-longest", action="store_true", help="skip the longest-sequence search")
    ap.add_argument("--only", choices=["ours", "theirs"], default=None)
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2 on GPU, 1 on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on GPU, 3 on CPU)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = Phi3Config() if cuda else small_config()
    seqs = [int(s) for s in (args.seq or ("2048,4096" if cuda else "128")).split(",")]
    kernels = "none" if args.no_kernels else args.kernels
    args.kernel_list = (() if kernels == "none" or not cuda else
                        KERNEL_NAMES if kernels == "all" else tuple(k for k in kernels.split(",") if k))
    if args.steps is None:
        args.steps = 5 if cuda else 3
    if args.warmup is None:
        args.warmup = 2 if cuda else 1
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    systems = [args.only] if args.only else ["ours", "theirs"]
    peak = device_peak_flops()
    with torch.device("meta"):
        flops_model = Phi3(cfg)

    rows = []
    for seq in seqs:
        fpt = flops_model.flops_per_token(seq, training=True)
        for ckpt in ckpts:
            batch = args.batch or (largest_batch(systems[-1], cfg, dtype, device, ckpt, seq, args) if cuda else 2)
            for system in systems:
                r = run_one(system, cfg, dtype, device, ckpt, batch, seq, args) if batch else None
                row = {"system": system, "seq": seq, "batch": batch, "checkpointing": ckpt,
                       "kernels": ",".join(args.kernel_list) if system == "ours" else "", **(r or {"oom": True})}
                if r and peak:
                    row["mfu"] = r["tokens_per_s"] * fpt / peak
                rows.append(row)
                print(f"  measured {system} seq={seq} batch={batch} ckpt={ckpt}: "
                      f"{(r or {}).get('tokens_per_s', float('nan')):.0f} tok/s", file=sys.stderr)
    longest = {}
    if cuda and not args.no_longest:
        for system in systems:
            longest[system] = longest_sequence(system, cfg, dtype, device, args)

    dev = torch.cuda.get_device_name() if cuda else "CPU (smoke run: small config, fp32; says nothing about GPUs)"
    print(f"\nLoRA training step on {dev}; model {'Phi-3-mini' if cuda else 'small Phi-3'}, r=16 on {','.join(TARGETS)}")
    print(f"{'system':<7} {'seq':>5} {'batch':>5} {'ckpt':>5} {'tok/s':>9} {'step s':>8} {'MFU':>6} {'peak GB':>8}")
    for r in rows:
        if r.get("oom"):
            print(f"{r['system']:<7} {r['seq']:>5} {r['batch']:>5} {str(r['checkpointing']):>5}   out of memory")
            continue
        mfu = f"{100 * r['mfu']:5.1f}%" if "mfu" in r else "     -"
        mem = f"{r['peak_mem_gb']:8.1f}" if r["peak_mem_gb"] is not None else "       -"
        print(f"{r['system']:<7} {r['seq']:>5} {r['batch']:>5} {str(r['checkpointing']):>5} "
              f"{r['tokens_per_s']:9.0f} {r['step_s']:8.3f} {mfu} {mem}")
    ratios = []
    for ours in (r for r in rows if r["system"] == "ours" and not r.get("oom")):
        theirs = next((t for t in rows if t["system"] == "theirs" and not t.get("oom") and
                       (t["seq"], t["batch"], t["checkpointing"]) == (ours["seq"], ours["batch"], ours["checkpointing"])),
                      None)
        if theirs:
            ratio = {"seq": ours["seq"], "batch": ours["batch"], "checkpointing": ours["checkpointing"],
                     "speedup": ours["tokens_per_s"] / theirs["tokens_per_s"],
                     "step_time_ratio": ours["step_s"] / theirs["step_s"]}
            if ours["peak_mem_gb"] and theirs["peak_mem_gb"]:
                ratio["memory_ratio"] = ours["peak_mem_gb"] / theirs["peak_mem_gb"]
            ratios.append(ratio)
            print(f"seq {ratio['seq']} batch {ratio['batch']} ckpt {ratio['checkpointing']}: ours / theirs step "
                  f"time {ratio['step_time_ratio']:.2f}x (speedup {ratio['speedup']:.2f}x)"
                  + (f", peak memory {ratio['memory_ratio']:.2f}x" if "memory_ratio" in ratio else ""))
    if longest:
        print("longest sequence at batch 1 (checkpointing on): " +
              ", ".join(f"{k} {v}" for k, v in longest.items()))
    result = {"device": dev, "rows": rows, "ratios": ratios, "longest_seq_batch1": longest}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
