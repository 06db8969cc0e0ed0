"""LoRA training-step throughput and memory: phi3-lora against transformers + peft, same shapes, same settings.

Full Phi-3-mini architecture with random weights (speed does not depend on their values, nothing is downloaded),
bf16 (base weights bf16, LoRA weights fp32, bf16 autocast), LoRA alpha 32 / dropout 0.05 on qkv_proj, o_proj,
gate_up_proj and down_proj, AdamW over the LoRA parameters, `use_cache=False` for transformers. Without
checkpointing first, then with it (non-reentrant for both), at each sequence length, at the largest batch (a power of
two) that fits transformers + peft, so the comparison is at the same batch; then the longest sequence (a power of
two) each fits at batch 1 with checkpointing.

One difference in the LoRA itself, by design: our qkv_proj is loralib's MergedLinear, one r=16 adapter per q / k / v
slice (rank 48 over the fused projection), peft puts a single r=16 adapter on the whole qkv_proj. Ours does more
LoRA work and has more trainable parameters (each row records `trainable_params`).

The longest-sequence search uses the 128k preset (Phi3Config.from_name("phi3-mini-128k"): the same weights'
shapes, LongRoPE, no sliding window) for both systems: the 4k config's max_position_embeddings is 4096.

Each system's model is built once and reused for its batch search and all its measurements (rebuilding a 3.8B model
per probe costs more than the probes); after an out-of-memory probe the activations, gradients and the allocator
cache are released, and every row records the memory allocated before its steps so a leak would show.

Reports tokens/s, MFU (model FLOPs per token = 4·N_matmul + attention, Phi3.flops_per_token, over the GPU's dense
bf16 peak; checkpointing's recomputation is not counted, as MFU's definition wants), peak memory (allocated, reset
after the warm-up steps); a table for people and a JSON line last. Without CUDA it runs a small config on the CPU
(fp32) so CI keeps it alive, and prints our step time as a ratio to theirs.

    PYTHONPATH=. python bench/train_step.py --checkpointing off --no-longest   # GPU: seq 2048 and 4096, no ckpt
    PYTHONPATH=. python bench/train_step.py --checkpointing on --no-longest    # the same with checkpointing
    PYTHONPATH=. python bench/train_step.py --longest-only                     # longest sequence at batch 1
    PYTHONPATH=. python bench/train_step.py --only ours --batch 4 --seq 2048 --checkpointing off --no-longest \\
        --kernels none                                                          # what the kernels buy
    python bench/train_step.py --variants plain,dora,loraplus,neftune          # ours: each variant vs plain

--variants measures only our model, one row per variant at the first --seq and the given --batch (GPU default 4,
CPU 2): plain LoRA; DoRA (use_dora, its own model); LoRA+ (peft's four optimizer groups, ratio 16); NEFTune (alpha
5, the trainer's hook on the embeddings). On the CPU, where there is no allocator peak, each row has the process's
peak RSS instead (max_rss_gb, which only grows: run one variant per process to compare memory, e.g. --variants dora).
    python bench/train_step.py                                                 # CPU smoke run
    PYTHONPATH=. python bench/train_step.py --seq 2048 --checkpointing on --no-longest --dora
                                                                               # GPU: LoRA and DoRA, both systems

--dora builds every system once more with DoRA, labelled "ours+dora" / "theirs+dora" (peft's use_dora). DoRA's layers
run plain torch (the row norm of W + s·B·A needs the whole weight, see lora/layers.py), the other kernels stay on.

A whole default GPU run (both checkpointing settings and the longest search) takes longer than 10 minutes; the
--budget-s guard (default 480 s) stops starting new measurements in time to print what was measured.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi3lora import lora  # noqa: E402
import phi3lora.lora.layers as lora_layers  # noqa: E402
from phi3lora.phi3mini import Phi3, Phi3Config  # noqa: E402
from phi3lora.phi3mini.model import KERNEL_NAMES  # noqa: E402

TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05)
# our switches: the model's kernels, the fused LoRA linear included (Phi3.set_kernels)
BENCH_KERNELS = tuple(KERNEL_NAMES)
# dense bf16 peak FLOP/s, most specific name first (a PCIe or NVL H100 is not an SXM one)
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def device_peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16 if k in name), None)


def small_config(long: bool = False) -> Phi3Config:
    # the CPU smoke config: Phi-3's shape ratios, a few layers; long=True mirrors the 128k preset (LongRoPE, no
    # sliding window) so the longest-sequence code path runs on the CPU too
    kw = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
              vocab_size=4096, max_position_embeddings=4096, original_max_position_embeddings=4096,
              sliding_window=2047, pad_token_id=0, eos_token_id=2)
    if long:
        half = 256 // 4 // 2
        kw.update(max_position_embeddings=131072, sliding_window=262144,
                  rope_scaling={"type": "longrope", "short_factor": [1.0] * half, "long_factor": [1.0] * half})
    return Phi3Config(**kw)


def init_random_(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif "lora_B" not in name:
                p.normal_(0, 0.02)


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----- the two systems ------------------------------------------------------------------------------------------
class System:
    """A built model, its loss function and its checkpointing switch."""

    def __init__(self, name, model, loss_fn, set_checkpointing, info):
        self.name, self.model, self.loss_fn, self.set_checkpointing, self.info = (
            name, model, loss_fn, set_checkpointing, info)
        self.path_counts = None  # ours: LoRA layer calls by path, {"triton": n, "torch": m}


def build_ours(cfg: Phi3Config, dtype, device, kernels: tuple[str, ...], compile_: bool, dora: bool = False) -> System:
    with torch.device(device):
        model = Phi3(cfg).to(dtype)
    model.rotary.reset_parameters(torch.device(device))  # .to(dtype) rounded the fp32 inv_freq buffers
    init_random_(model)
    lora.inject(model, lora.LoraConfig(target_modules=TARGETS, use_dora=dora, **LORA))
    lora.mark_only_lora_as_trainable(model)
    for p in model.parameters():  # LoRA weights in fp32, as a mixed-precision trainer keeps them
        if p.requires_grad:
            p.data = p.data.float()
    # every switch set explicitly (the LoRA layers' is on by default), so --kernels none really is plain torch.
    # The fused LoRA linear applies on CUDA when x, the weight and autocast are all bf16 (they are here: bf16
    # weights, bf16 activations, bf16 autocast), see lora.layers._use_triton.
    model.set_kernels(**{k: k in kernels for k in KERNEL_NAMES})
    # count which path each LoRA layer call takes (the same test the layers make), so a silent fallback to plain
    # torch (an fp32 activation, an autocast mismatch) shows in the row as lora_calls_torch > 0
    path_counts = {"triton": 0, "torch": 0}

    def count_path(module, args):
        fused = (module.use_kernel and not module.use_dora
                 and lora_layers._use_triton(args[0], module._T(module.weight)))
        path_counts["triton" if fused else "torch"] += 1

    for m in model.modules():
        if isinstance(m, (lora.Linear, lora.MergedLinear)):
            m.register_forward_pre_hook(count_path)
    model.train()
    fwd = torch.compile(model) if compile_ else model
    autocast = dict(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)

    def loss_fn(ids):
        with torch.autocast(**autocast):
            return fwd(ids, labels=ids)

    def set_checkpointing(on: bool):
        model.gradient_checkpointing = on  # torch.utils.checkpoint per block, use_reentrant=False

    info = {"kernels": ",".join(kernels), "compile": compile_, "variant": "dora" if dora else "lora",
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    system = System("ours", model, loss_fn, set_checkpointing, info)
    system.path_counts = path_counts
    return system


def build_theirs(cfg: Phi3Config, dtype, device, dora: bool = False) -> System:
    from peft import LoraConfig, get_peft_model
    from transformers import Phi3Config as HFConfig
    from transformers import Phi3ForCausalLM

    hf_cfg = HFConfig(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type")})
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = Phi3ForCausalLM(hf_cfg).to(dtype)
    init_random_(model)
    model = get_peft_model(model, LoraConfig(target_modules=list(TARGETS), task_type="CAUSAL_LM", use_dora=dora,
                                             **LORA))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    attn = model.get_base_model().config._attn_implementation
    if attn != "sdpa":
        raise RuntimeError(f"transformers chose attention {attn!r}, not sdpa: the comparison would be unfair")
    autocast = dict(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)

    def loss_fn(ids):
        with torch.autocast(**autocast):
            # use_cache=False, as trl's SFTTrainer sets it: a training step has no use for a KV cache
            return model(input_ids=ids, labels=ids, use_cache=False).loss

    def set_checkpointing(on: bool):
        if on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()

    info = {"kernels": "", "attn_implementation": attn, "variant": "dora" if dora else "lora",
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    return System("theirs", model, loss_fn, set_checkpointing, info)


def build(label, cfg, dtype, device, args) -> System:
    """label: "ours" or "theirs", with "+dora" for the DoRA variant."""
    name, _, variant = label.partition("+")
    if name == "ours":
        return build_ours(cfg, dtype, device, args.kernel_list, args.compile, dora=variant == "dora")
    return build_theirs(cfg, dtype, device, dora=variant == "dora")


# ----- measuring ------------------------------------------------------------------------------------------------
def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_steps(system: System, batch: int, seq: int, vocab: int, device, warmup: int, steps: int,
               make_opt=None) -> dict:
    """Seconds per optimizer step and peak memory for (batch, seq). Raises torch.cuda.OutOfMemoryError.
    make_opt(params) -> the optimizer (default AdamW, lr 1e-4)."""
    cuda = torch.device(device).type == "cuda"
    params = [p for p in system.model.parameters() if p.requires_grad]
    opt = make_opt(params) if make_opt else torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    mem_before = torch.cuda.memory_allocated() if cuda else None
    if system.path_counts is not None:
        system.path_counts.update(triton=0, torch=0)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            if cuda:
                # after the warm-up: Triton's autotuning (do_bench's 256 MB L2-flush buffer) and first-call
                # allocations are not a training step's memory; the steady state peaks again in each timed step
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
        loss = system.loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    gb = 1024**3
    paths = ({"lora_calls_triton": system.path_counts["triton"], "lora_calls_torch": system.path_counts["torch"]}
             if system.path_counts is not None else {})
    return {**paths, "step_s": dt, "tokens_per_s": batch * seq / dt, "loss": float(loss.detach()),
            "peak_mem_gb": torch.cuda.max_memory_allocated() / gb if cuda else None,
            "peak_reserved_gb": torch.cuda.max_memory_reserved() / gb if cuda else None,
            "mem_before_gb": mem_before / gb if cuda else None,
            # CPU: the process's resident high-water mark (Linux reports KiB), a stand-in for peak memory
            "peak_rss_gb": None if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gb}


def try_steps(system: System, batch, seq, vocab, device, warmup, steps, make_opt=None) -> dict | None:
    """time_steps, or None when it runs out of memory; either way the memory it used is released."""
    try:
        return time_steps(system, batch, seq, vocab, device, warmup, steps, make_opt)
    except torch.cuda.OutOfMemoryError:
        pass  # leave the except block first: the traceback's frames hold the activations until it is cleared
    except RuntimeError as e:  # cuBLAS / Triton report a failed allocation as a plain RuntimeError
        if not any(m in str(e) for m in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED")):
            raise
    for p in system.model.parameters():  # a backward cut short leaves partial LoRA gradients behind
        p.grad = None
    free()
    return None


def largest_batch(system: System, seq, vocab, device, budget, limit=64) -> int:
    """Doubling search for the largest batch (a power of two) that fits one step; 0 if even batch 1 does not."""
    best, b = 0, 1
    while b <= limit and not budget.spent():
        if try_steps(system, b, seq, vocab, device, warmup=0, steps=1) is None:
            break
        free()
        best, b = b, b * 2
    return best


def longest_sequence(system: System, vocab, device, budget, start, limit) -> dict:
    """Doubling search for the longest sequence (a power of two) that fits one step at batch 1."""
    best, t, oom = 0, start, False
    while t <= limit and not budget.spent():
        if try_steps(system, 1, t, vocab, device, warmup=0, steps=1) is None:
            oom = True
            break
        free()
        best, t = t, t * 2
    # capped: it fit the largest length tried, so the true limit may be higher; incomplete: the budget ran out
    return {"longest": best, "capped": best >= limit, "incomplete": not oom and best < limit}


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.t0 = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def spent(self) -> bool:
        return bool(self.seconds) and self.elapsed() > self.seconds


# ----- variants: DoRA, LoRA+ and NEFTune against plain LoRA, ours only -------------------------------------------
VARIANTS = ("plain", "dora", "loraplus", "neftune")


def variant_rows(args, cfg, dtype, device, seq: int, batch: int, ckpt: bool) -> list[dict]:
    """One row per variant in args.variants: the training step as train.py runs it (training/setup.py's LoRA+
    groups and set_lr, its NEFTune hook), on one model built once (DoRA, whose layers differ, on a second one)."""
    import resource

    from phi3lora.training.config import TrainingConfig
    from phi3lora.training.setup import activate_neftune, deactivate_neftune, make_optimizer

    plain_system, dora_system = None, None
    rows = []
    for variant in args.variants:
        if variant == "dora":
            dora_system = dora_system or build_ours(cfg, dtype, device, args.kernel_list, args.compile, dora=True)
            system = dora_system
        else:
            plain_system = plain_system or build_ours(cfg, dtype, device, args.kernel_list, args.compile)
            system = plain_system
        system.set_checkpointing(ckpt)
        t = TrainingConfig(lr=1e-4, loraplus_lr_ratio=16.0 if variant == "loraplus" else 0.0)
        hook = activate_neftune(system.model, 5.0) if variant == "neftune" else None
        r = try_steps(system, batch, seq, cfg.vocab_size, device, args.warmup, args.steps,
                      make_opt=lambda params: make_optimizer(t, params, torch.device(device), system.model))
        if hook is not None:
            deactivate_neftune(system.model, hook)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
        rows.append({"system": "ours", **system.info, "variant": variant, "seq": seq, "batch": batch,
                     "checkpointing": ckpt, **(r or {"oom": True}), "max_rss_gb": rss})
        free()
    return rows


def print_variants(rows: list[dict], dev: str) -> None:
    print(f"\nLoRA variants, ours, on {dev}")
    print(f"{'variant':<9} {'seq':>5} {'batch':>5} {'ckpt':>5} {'step s':>8} {'x plain':>8} {'peak GB':>8} "
          f"{'RSS GB':>7}")
    plain = next((r["step_s"] for r in rows if r["variant"] == "plain" and "step_s" in r), None)
    for r in rows:
        lead = f"{r['variant']:<9} {r['seq']:>5} {r['batch']:>5} {str(r['checkpointing']):>5}"
        if r.get("oom"):
            print(f"{lead}   out of memory")
            continue
        ratio = f"{r['step_s'] / plain:8.2f}" if plain else "       -"
        mem = f"{r['peak_mem_gb']:8.2f}" if r["peak_mem_gb"] is not None else "       -"
        print(f"{lead} {r['step_s']:8.3f} {ratio} {mem} {r['max_rss_gb']:7.2f}")


# ----- main -----------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="LoRA training step: phi3-lora vs transformers + peft")
    ap.add_argument("--seq", default=None, help="comma-separated sequence lengths (GPU default 2048,4096)")
    ap.add_argument("--batch", type=int, default=0, help="fixed batch (default: the largest that fits theirs)")
    ap.add_argument("--kernels", default="all", help=f"comma list of {','.join(BENCH_KERNELS)}, 'all' or 'none'")
    ap.add_argument("--no-kernels", action="store_true", help="same as --kernels none")
    ap.add_argument("--compile", action="store_true", help="torch.compile our model")
    ap.add_argument("--checkpointing", default="both", choices=["off", "on", "both"])
    ap.add_argument("--no-longest", action="store_true", help="skip the longest-sequence search")
    ap.add_argument("--longest-only", action="store_true", help="only the longest-sequence search (128k preset)")
    ap.add_argument("--longest-start", type=int, default=None, help="first length tried (GPU 2048, CPU 64)")
    ap.add_argument("--longest-max", type=int, default=None, help="last length tried (GPU 131072, CPU 256)")
    ap.add_argument("--only", choices=["ours", "theirs"], default=None)
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2 on GPU, 1 on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on GPU, 3 on CPU)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new build, probe or measurement after this many seconds, so a run under a "
                         "10-minute limit still prints its table (GPU default 480: what is under way then, up to "
                         "~1 min for a 131072-token probe, must still end before 600 s; 0 = no limit)")
    ap.add_argument("--dora", action="store_true", help="each system once more with DoRA (peft's use_dora)")
    ap.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    ap.add_argument("--variants", default="", help=f"only our model, one row per variant: comma list of "
                    f"{','.join(VARIANTS)} (see the module docstring)")
    args = ap.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    if set(args.variants) - set(VARIANTS):
        ap.error(f"unknown variants {sorted(set(args.variants) - set(VARIANTS))}; choose from {','.join(VARIANTS)}")

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = Phi3Config() if cuda else small_config()
    long_cfg = Phi3Config.from_name("phi3-mini-128k") if cuda else small_config(long=True)
    seqs = [int(s) for s in (args.seq or ("2048,4096" if cuda else "128")).split(",")]
    kernels = "none" if args.no_kernels else args.kernels
    if kernels == "none" or not cuda:  # the Triton kernels are CUDA-only: on the CPU both run plain torch
        args.kernel_list = ()
    elif kernels == "all":
        args.kernel_list = BENCH_KERNELS
    else:
        args.kernel_list = tuple(k for k in kernels.split(",") if k)
        unknown = set(args.kernel_list) - set(BENCH_KERNELS)
        if unknown:
            ap.error(f"unknown kernels {sorted(unknown)}; choose from {','.join(BENCH_KERNELS)}")
    if args.steps is None:
        args.steps = 5 if cuda else 3
    if args.warmup is None:
        args.warmup = 2 if cuda else 1
    if args.warmup < 1 and cuda:
        print("note: --warmup 0 times Triton's autotuning and compilation too", file=sys.stderr)
    budget = Budget(args.budget_s if args.budget_s is not None else (480.0 if cuda else 0.0))
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    variants = ["lora", "dora"] if args.dora else ["lora"]
    systems = [name + ("" if v == "lora" else "+" + v)
               for v in variants for name in ([args.only] if args.only else ["ours", "theirs"])]
    peak = device_peak_flops()
    with torch.device("meta"):
        flops_model = Phi3(cfg)
    if args.variants:
        dev = torch.cuda.get_device_name() if cuda else "CPU (small config, fp32)"
        rows = variant_rows(args, cfg, dtype, device, seqs[0], args.batch or (4 if cuda else 2), ckpts[-1])
        print_variants(rows, dev)
        result = {"device": dev, "torch": torch.__version__, "variants": rows}
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(json.dumps(result) + "\n")
        print(json.dumps(result))
        return result

    def progress(msg):
        print(f"  [{budget.elapsed():6.1f} s] {msg}", file=sys.stderr, flush=True)

    # measurements: the batch search runs on the last system (theirs, when both run), so it goes first; each
    # system's model is built once for all its (seq, checkpointing) cells
    grid = [(seq, ckpt) for ckpt in ckpts for seq in seqs]
    batches, results, infos = {}, {}, {}
    searcher = systems[-1]
    for name in ([searcher] + [s for s in systems if s != searcher]) if not args.longest_only else []:
        if budget.spent():
            break
        system = build(name, cfg, dtype, device, args)
        infos[name] = system.info
        progress(f"built {name} ({system.info['trainable_params']:,} trainable parameters)")
        for seq, ckpt in grid:
            system.set_checkpointing(ckpt)
            if (seq, ckpt) not in batches and not budget.spent():
                batches[(seq, ckpt)] = args.batch or (largest_batch(system, seq, cfg.vocab_size, device, budget)
                                                      if cuda else 2)
                progress(f"batch for seq={seq} ckpt={ckpt}: {batches[(seq, ckpt)]} (searched on {name})")
            batch = batches.get((seq, ckpt))
            if batch is None or budget.spent():
                results[(name, seq, ckpt)] = {"skipped": "time budget"}
                continue
            r = try_steps(system, batch, seq, cfg.vocab_size, device, args.warmup, args.steps) if batch else None
            results[(name, seq, ckpt)] = r if r is not None else {"oom": True}
            if r and "lora_linear" in system.info.get("kernels", "") and r.get("lora_calls_torch"):
                print(f"WARNING: {r['lora_calls_torch']} LoRA layer calls took the plain torch path although the "
                      "fused kernel is on (see lora.layers._use_triton)", file=sys.stderr)
            free()
            progress(f"{name} seq={seq} batch={batch} ckpt={ckpt}: " + json.dumps(results[(name, seq, ckpt)]))
        system = None
        if args.compile:
            torch._dynamo.reset()  # compiled graphs hold the model: drop them before the next one is built
        free()

    rows = []
    for seq, ckpt in grid:
        fpt = flops_model.flops_per_token(seq, training=True)
        for name in systems:
            if (name, seq, ckpt) not in results:
                continue
            r = results[(name, seq, ckpt)]
            row = {"system": name, "seq": seq, "batch": batches.get((seq, ckpt)), "checkpointing": ckpt,
                   **infos.get(name, {}), **r}
            if "tokens_per_s" in r and peak:
                row["mfu"] = r["tokens_per_s"] * fpt / peak
            rows.append(row)

    longest = {}
    # on the CPU only when asked for (--longest-only or --longest-max): the CI smoke test runs it on small lengths
    if args.longest_only or (not args.no_longest and (cuda or args.longest_max)):
        start = args.longest_start or (2048 if cuda else 64)
        limit = min(args.longest_max or (131072 if cuda else 256), long_cfg.max_position_embeddings)
        for name in systems:
            if budget.spent():
                longest[name] = {"skipped": "time budget"}
                continue
            system = build(name, long_cfg, dtype, device, args)
            system.set_checkpointing(True)
            longest[name] = longest_sequence(system, long_cfg.vocab_size, device, budget, start, limit)
            system = None
            free()
            progress(f"longest sequence at batch 1, {name}: {longest[name]}")

    dev = torch.cuda.get_device_name() if cuda else "CPU (smoke run: small config, fp32; says nothing about GPUs)"
    print(f"\nLoRA training step on {dev}; model {'Phi-3-mini' if cuda else 'small Phi-3'}, r=16 on {','.join(TARGETS)}"
          f"{'; peak ' + format(peak / 1e12, '.0f') + ' TFLOP/s' if peak else ''}")
    print(f"{'system':<11} {'seq':>5} {'batch':>5} {'ckpt':>5} {'tok/s':>9} {'step s':>8} {'MFU':>6} {'peak GB':>8}")
    for r in rows:
        lead = f"{r['system']:<11} {r['seq']:>5} {str(r['batch']):>5} {str(r['checkpointing']):>5}"
        if r.get("oom") or r.get("skipped"):
            print(f"{lead}   {'out of memory' if r.get('oom') else 'skipped: ' + r['skipped']}")
            continue
        mfu = f"{100 * r['mfu']:5.1f}%" if "mfu" in r else "     -"
        mem = (f"{r['peak_mem_gb']:8.1f}" if r["peak_mem_gb"] is not None else
               f"{r['peak_rss_gb']:7.2f}*" if r.get("peak_rss_gb") is not None else "       -")
        print(f"{lead} {r['tokens_per_s']:9.0f} {r['step_s']:8.3f} {mfu} {mem}")
    ratios = []
    for ours in (r for r in rows if r["system"].startswith("ours") and "tokens_per_s" in r):
        twin = ours["system"].replace("ours", "theirs")
        theirs = next((t for t in rows if t["system"] == twin and "tokens_per_s" in t and
                       (t["seq"], t["batch"], t["checkpointing"])
                       == (ours["seq"], ours["batch"], ours["checkpointing"])),
                      None)
        if theirs:
            ratio = {"system": ours["system"], "seq": ours["seq"], "batch": ours["batch"],
                     "checkpointing": ours["checkpointing"],
                     "speedup": ours["tokens_per_s"] / theirs["tokens_per_s"],
                     "step_time_ratio": ours["step_s"] / theirs["step_s"]}
            if ours["peak_mem_gb"] and theirs["peak_mem_gb"]:
                ratio["memory_ratio"] = ours["peak_mem_gb"] / theirs["peak_mem_gb"]
            ratios.append(ratio)
            print(f"{ours['system']} seq {ratio['seq']} batch {ratio['batch']} ckpt {ratio['checkpointing']}: "
                  f"{ours['system']} / {twin} step "
                  f"time {ratio['step_time_ratio']:.2f}x (speedup {ratio['speedup']:.2f}x)"
                  + (f", peak memory {ratio['memory_ratio']:.2f}x" if "memory_ratio" in ratio else ""))
    # DoRA against plain LoRA, the same system at the same shape (GPU peak memory; CPU: see the docstring)
    for dora in (r for r in rows if r["system"].endswith("+dora") and "tokens_per_s" in r):
        plain = next((t for t in rows if t["system"] == dora["system"].split("+")[0] and "tokens_per_s" in t
                      and (t["seq"], t["batch"], t["checkpointing"])
                      == (dora["seq"], dora["batch"], dora["checkpointing"])), None)
        if plain:
            mem = "peak_mem_gb" if dora["peak_mem_gb"] else "peak_rss_gb"
            ratio = {"system": dora["system"], "vs": plain["system"], "seq": dora["seq"], "batch": dora["batch"],
                     "checkpointing": dora["checkpointing"], "step_time_ratio": dora["step_s"] / plain["step_s"],
                     "memory_ratio": dora[mem] / plain[mem] if dora.get(mem) and plain.get(mem) else None}
            ratios.append(ratio)
            print(f"{dora['system']} / {plain['system']} seq {dora['seq']} batch {dora['batch']} ckpt "
                  f"{dora['checkpointing']}: step time {ratio['step_time_ratio']:.2f}x"
                  + (f", {mem} {ratio['memory_ratio']:.2f}x" if ratio["memory_ratio"] else ""))
    if longest:
        print("longest sequence at batch 1 (checkpointing on, 128k config; powers of two): " + ", ".join(
            f"{k} {v.get('longest', v.get('skipped'))}{' (the cap: may fit more)' if v.get('capped') else ''}"
            f"{' (budget ran out)' if v.get('incomplete') else ''}" for k, v in longest.items()))
    result = {"device": dev, "torch": torch.__version__, "peak_tflops": peak / 1e12 if peak else None,
              "seconds": round(budget.elapsed(), 1), "rows": rows, "ratios": ratios, "longest_seq_batch1": longest}
    line = json.dumps(result)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(line + "\n")
    print(line)
    return result


if __name__ == "__main__":
    main()
