"""Every @triton.jit kernel of the project, compiled ahead of time for the GPUs users have (sm_90 H100/H200, sm_80
A100) on this CPU: every autotune config, every dtype its launcher accepts, Phi-3-mini's shapes. No GPU needed: the
engine (tests/kernel_aot.py) stands in for the CUDA driver and runs Triton's own compiler and the wheel's ptxas.

Recorded per (kernel, case, config, dtype, target): compiles or the error, dynamic shared memory (limit 232448 B on
sm_90, 166912 B on sm_80), registers per thread, spill bytes, and whether ptxas serializes wgmma. The tests fail
when a compile raises anything but out-of-resources, when some (kernel, case, dtype, target) has no config that
fits without spills, when a config can never launch (over shared memory), and on any spill or serialized wgmma in
the fused LoRA GEMM's sm_90 16-bit configs. `pytest -s` prints the table.

Default run (CI): every kernel x dtype x target, with the fused LoRA GEMM narrowed to its first 16-bit configs (the
cuBLAS-class tiles the autotuner tries first, where spills showed) and first fp32 config, at R 64 and 192.
`-m slow`: everything (test_full_sweep). Results are cached per task under ~/.cache/phi3lora/kernel-aot (keyed by
the sources and the Triton version), so only the first run on a machine pays.

To register a new kernel (e.g. kernels/nf4.py), add one line to CASES:

    Kernel("phi3lora.kernels.nf4", "_nf4_dequant_kernel", nf4_cases),                   # launcher's own num_warps
    Kernel("phi3lora.kernels.nf4", "_nf4_matmul_kernel", nf4_mm_cases, configs=nf4_configs, ci=nf4_ci),  # autotuned

where nf4_cases(dtype, cap) -> {case name: [(args, meta), ...]} gives the arguments the launcher passes to
`kernel[grid](*args, **meta)` at Phi-3-mini's shapes (a torch dtype in place of each tensor, the launcher's real
ints), configs(dtype) -> the Autotuner's config list for that dtype ([None] for a plain launch), and ci(dtype,
cap, case, cfg_index) -> whether the default run compiles it (default: all). test_every_kernel_is_registered fails
until every @triton.jit kernel in kernels/*.py has an entry.
"""
from __future__ import annotations

import ast
import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

import kernel_aot
from kernel_aot import SMEM_LIMIT, SMS

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # what the launchers take
TARGETS = (90, 80)

# Phi-3-mini-4k: hidden 3072, intermediate 8192, vocab 32064, 32 heads = 32 KV heads of 96 dims, all rotary.
HID, INTER, VOCAB, HEADS, KV, HDIM, ROT, SEQ = 3072, 8192, 32064, 32, 32, 96, 96, 2048
TOKENS = (4096, 8192)                                                  # M = B·T with T = SEQ
LINEARS = {"qkv": (3072, 9216), "o": (3072, 3072), "gate_up": (3072, 16384), "down": (8192, 3072)}  # (K, N)
RANKS = (8, 16, 64)                                                     # qkv is a MergedLinear: R = 3r there


def np2(n):
    return 1 << (n - 1).bit_length()


def _module(name):
    return importlib.import_module(name)


# ----------------------------------------------------------------------------------------------------------------
# Launch arguments, as each launcher passes them (a torch dtype stands in for a tensor)
# ----------------------------------------------------------------------------------------------------------------

def lora_cases(dtype, cap):
    """matmul_lowrank as LoRALinearFunction calls it: forward y = x·Wᵀ + s·xa·Bᵀ (a = x, b = W.t(), u = xa,
    v = B.t()) and backward dX = dY·W + s·g·A (a = dY, b = W, u = g, v = A), every projection and rank (qkv is a
    MergedLinear: R = 3r). Phi-3 has no biases. Shapes that specialize alike share a case (one binary): every
    stride and size here is a multiple of 16 except where R is not, and then _pad_rank makes contiguous copies
    of u and v with R rounded up to 16 (R = 8, 24), which changes v's strides in the forward."""
    dt, cases = DTYPES[dtype], {}
    meta = dict(HAS_BIAS=False, HAS_LORA=True, PRECISION="ieee" if dtype == "fp32" else "tf32", DOT_FP32=False)
    for r in RANKS:
        for layer, (K, N) in LINEARS.items():
            R = 3 * r if layer == "qkv" else r
            padded = R % 16 != 0
            R16 = -(-R // 16) * 16
            for M in TOKENS:
                # M, NO, KR, R, M_KEY, strides am ak bk bn um ur vr vn cm cn, scaling; pointers a b u v bias(=c) c
                fwd = (M, N, K, R16, np2(M), K, 1, 1, K, R16, 1) + ((N, 1) if padded else (1, R)) + (N, 1, 2.0)
                bwd = (M, K, N, R16, np2(M), N, 1, K, 1, R16, 1, K, 1, K, 1, 2.0)
                cases.setdefault("fwd R=8,24 padded" if padded else "fwd R=16..192", []).append(
                    ((dt,) * 6 + fwd, meta))
                cases.setdefault("bwd R=8..192", []).append(((dt,) * 6 + bwd, meta))
    if dtype == "bf16":  # the base GEMM alone (HAS_LORA=False), for comparison: what the low-rank term costs
        base = (4096, 9216, HID, 0, np2(4096), HID, 1, 1, HID, 1, 1, 1, 1, 9216, 1, 1.0)
        cases["base GEMM"] = [((dt,) * 6 + base, dict(meta, HAS_LORA=False))]
    return cases


def lora_configs(dtype):
    mod = _module("phi3lora.kernels.lora_matmul")
    return list(mod.CONFIGS_FP32 if dtype == "fp32" else mod.CONFIGS_16BIT)


def lora_ci(dtype, cap, case, cfg):
    """The default run: bf16 on sm_90 with the cuBLAS-class tiles the autotuner tries first (where the first
    design spilled) at every case, one tile for fp16, fp32 and sm_80."""
    if case == "base GEMM":
        return False
    if dtype == "bf16" and cap == 90:
        return cfg in (0, 1, 2)
    return cfg == 0 and case == "fwd R=16..192"


def rms_fwd_cases(dtype, cap):
    dt, mod = DTYPES[dtype], _module("phi3lora.kernels.rmsnorm")
    block = np2(HID)
    return {"H=3072": [((dt, dt, dt, torch.float32, HID, HID, HID, 1e-5),
                        dict(BLOCK_H=block, num_warps=mod._num_warps(block)))]}


def rms_bwd_cases(dtype, cap):  # LoRA freezes the norms: training runs HAS_DW=False
    dt, mod, cases = DTYPES[dtype], _module("phi3lora.kernels.rmsnorm"), {}
    block = np2(HID)
    for dw in (False, True):
        for M in TOKENS:
            rows_per_program = -(-M // min(M, 2 * SMS[cap]))
            args = (dt, dt, dt, torch.float32, dt, torch.float32 if dw else dt, M, HID, HID, HID, HID,
                    rows_per_program)
            cases.setdefault(f"HAS_DW={int(dw)}", []).append(
                (args, dict(HAS_DW=dw, BLOCK_H=block, num_warps=mod._num_warps(block))))
    return cases


def rope_cases(dtype, cap):
    """Forward: q and k are transposed views of qkv's output (heads 96 apart, positions 9216 apart); backward:
    contiguous (B, H, T, D) gradients. cos/sin (B, T, 96)."""
    dt, cases, row = DTYPES[dtype], {}, (HEADS + 2 * KV) * HDIM
    T = SEQ
    fwd = (T * row, HDIM, row) * 2                                        # sqb sqh sqt skb skh skt
    bwd = (HEADS * T * HDIM, T * HDIM, HDIM, KV * T * HDIM, T * HDIM, HDIM)
    for name, strides, back in (("fwd", fwd, False), ("bwd", bwd, True)):
        args = (dt,) * 6 + (T, HEADS, KV, ROT // 2, ROT, HDIM) + strides + (T * ROT, ROT)
        meta = dict(BACKWARD=back, BLOCK_HQ=np2(HEADS), BLOCK_HKV=np2(KV), BLOCK_HALF=np2(ROT // 2),
                    BLOCK_PASS=np2(HDIM - ROT) if HDIM > ROT else 0, num_warps=4)
        cases[name] = [(args, meta)]
    return cases


def swiglu_cases(backward):
    def cases(dtype, cap):
        dt, mod = DTYPES[dtype], _module("phi3lora.kernels.silu_mul")
        args = (dt, dt, dt, INTER, INTER, 2 * INTER, 2 * INTER) if backward else (dt, dt, INTER, 2 * INTER, INTER)
        return {"I=8192": [(args, dict(BLOCK=mod._block(INTER), num_warps=4))]}
    return cases


def ce_cases(dtype, cap):  # one chunk of logits (C, V) in hidden's dtype, int64 labels
    dt, mod = DTYPES[dtype], _module("phi3lora.kernels.cross_entropy")
    args = (dt, torch.int64, torch.float32, VOCAB, VOCAB, -100, 1.0 / 4096)
    return {"V=32064": [(args, dict(BLOCK_V=mod._block_v(VOCAB), num_warps=8))]}


NF4 = dict(BLOCKSIZE=64, DOUBLE_QUANT=True)  # bitsandbytes' defaults, what --quantize nf4 writes


def nf4_mm_cases(dtype, cap):
    """nf4_matmul_lowrank as NF4LoRALinearFunction calls it, r 16, o_proj and gate_up: forward (W' = Wᵀ, virtual
    strides (1, K), TRANSPOSE_W) and backward dX (W' = W, (K, 1)). Pointers: a, packed (uint8), absmax (uint8,
    double quant), code, absmax2, code2 (fp32), u, v, bias(=c), c. ALIGNED as the launcher chooses it
    (`nf4_aligned`: True at Phi-3's shapes, the aligned decode); the "per-element" cases force the fallback decode
    (what shapes with K % blocksize != 0 get) at the same shapes, for comparison. 16-bit only: on a GPU
    nf4_lora_linear sends fp32 x to the torch reference (the fp32 FMA tiles spill on sm_90 and sm_80)."""
    if dtype == "fp32":
        return {}
    mod = _module("phi3lora.kernels.nf4_lora")
    meta_of = _module("phi3lora.kernels.nf4").NF4Meta
    dt, cases, R = DTYPES[dtype], {}, 16
    meta = dict(NF4, HAS_BIAS=False, HAS_LORA=True, PRECISION="ieee" if dtype == "fp32" else "tf32",
                DOT_FP32=False, BLOCK_R=16, **_module("phi3lora.kernels.nf4_dequant").EXACT_DECODE)
    ptrs = (dt, torch.uint8, torch.uint8, torch.float32, torch.float32, torch.float32, dt, dt, dt, dt)
    for K, N in (LINEARS["o"], LINEARS["gate_up"]):
        aligned = mod.nf4_aligned(meta_of(shape=(N, K), blocksize=NF4["BLOCKSIZE"]))
        for M in TOKENS:
            fwd = (M, N, K, R, np2(M), K, 1, 1, K, R, 1, 1, R, N, 1, 0.03, 2.0)
            bwd = (M, K, N, R, np2(M), N, 1, K, 1, R, 1, K, 1, K, 1, 0.03, 2.0)
            for name, args, transpose in (("fwd", fwd, True), ("bwd", bwd, False)):
                cases.setdefault(f"{name} R=16", []).append(
                    (ptrs + args, dict(meta, ALIGNED=aligned, TRANSPOSE_W=transpose)))
                cases.setdefault(f"{name} R=16 per-element", []).append(
                    (ptrs + args, dict(meta, ALIGNED=False, TRANSPOSE_W=transpose)))
    return cases


def nf4_mm_configs(dtype):
    """The aligned autotuner's configs: the per-element one's, then those only the aligned decode can launch."""
    return list(_module("phi3lora.kernels.nf4_lora")._GPU_CONFIGS_ALIGNED)


def _nf4_launchable(case, cfg):
    return "per-element" not in case or cfg < len(_module("phi3lora.kernels.nf4_lora")._GPU_CONFIGS)


def nf4_mm_ci(dtype, cap, case, cfg):
    return cfg == 0 and dtype == "bf16" and case in ("fwd R=16", "bwd R=16")  # the aligned decode, both ways


def nf4_mm_full(dtype, cap, case, cfg):
    return _nf4_launchable(case, cfg)  # every config each decode tunes over, every dtype: 72 compiles


def nf4_dequant_cases(dtype, cap):
    dt = DTYPES[dtype]
    args = (torch.uint8, torch.uint8, torch.float32, torch.float32, torch.float32, dt, 0.03, 9216 * 3072)
    return {"qkv 9216x3072": [(args, dict(NF4, BLOCK=1024, **_module("phi3lora.kernels.nf4_dequant").EXACT_DECODE))]}


GATHER_BATCHES = {"decode N=64 L=16": (64, 16), "prefill N=4096 L=8": (4096, 8)}  # (rows, adapters)


def _gather_launches(dtype, cap):
    """(case name, N, K, M, R, L, launch_meta) as gathered_lora's launcher sees them: decode (BLOCK_M 16, K split)
    and prefill (BLOCK_M 64), each projection, stacked ranks 8 (padded R not a multiple of 16), 16 and 64.
    Outside the interpreter (the compile workers), launch_meta gives the GPU's blocks."""
    mod = _module("phi3lora.kernels.lora_gather")
    for batch, (N, L) in GATHER_BATCHES.items():
        for R in (8, 16, 64):
            for K, M in LINEARS.values():
                yield f"{batch} R={R}", N, K, M, R, L, mod.launch_meta(N, K, R, L, fp32=dtype == "fp32")


def gather_ci(dtype, cap, case, cfg):
    """The default run: bf16 (what serving runs) at every case on both targets; fp16 and fp32 at decode, r 64, sm_90."""
    return dtype == "bf16" or (case == "decode N=64 L=16 R=64" and cap == 90)


def gather_shrink_cases(dtype, cap):
    """_gather_shrink_kernel: x (N, K) and stacked A (L, R, K) contiguous; pointers x, A, ids, perm, tiles
    (int64), partial sums (SPLIT_K, N, R) fp32."""
    dt, cases = DTYPES[dtype], {}
    for case, N, K, M, R, L, m in _gather_launches(dtype, cap):
        args = (dt, dt, torch.int64, torch.int64, torch.int64, torch.float32,
                N, K, R, L, m["K_PER_SPLIT"], K, 1, R * K, K, 1, N * R, R)
        meta = dict(PRECISION="ieee" if dtype == "fp32" else "tf32", DOT_FP32=False, BLOCK_M=m["BLOCK_M"],
                    BLOCK_K=m["BLOCK_K"], BLOCK_R=m["BLOCK_R"], num_warps=m["num_warps"])
        cases.setdefault(case, []).append((args, meta))
    return cases


def gather_expand_cases(dtype, cap):
    """_gather_expand_kernel: xa (N, R) fp32, stacked B (L, M, R) contiguous, scaling (L,) fp32, ids/perm/tiles,
    out (N, M) in x's dtype; 16-bit inputs multiply xa as two 16-bit halves (HI_LO)."""
    dt, cases = DTYPES[dtype], {}
    for case, N, K, M, R, L, m in _gather_launches(dtype, cap):
        args = (torch.float32, dt, torch.float32, torch.int64, torch.int64, torch.int64, dt,
                N, M, R, L, R, M * R, R, 1, M, 1)
        meta = dict(PRECISION="ieee" if dtype == "fp32" else "tf32", HI_LO=dtype != "fp32", BLOCK_M=m["BLOCK_M"],
                    BLOCK_N=m["BLOCK_N"], BLOCK_R=m["BLOCK_R"], num_warps=m["num_warps"])
        cases.setdefault(case, []).append((args, meta))
    return cases


# ----------------------------------------------------------------------------------------------------------------
# The registry: one line per kernel
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Kernel:
    module: str                                   # "phi3lora.kernels.lora_matmul"
    kernel: str                                   # the @triton.jit function's name in it
    cases: Callable                               # (dtype name, capability) -> {case: [(args, meta), ...]}
    configs: Callable = field(default=lambda dtype: [None])  # dtype name -> autotune configs; [None]: plain launch
    ci: Callable = field(default=lambda dtype, cap, case, cfg: True)  # compiled in the default (non-slow) run?
    full: Callable = field(default=lambda dtype, cap, case, cfg: True)  # compiled in the slow sweep?
    known_issue: str = ""  # a known failure: left out of both runs, checked by the xfail test below instead

    @property
    def jit(self):
        return getattr(_module(self.module), self.kernel)


CASES = [
    Kernel("phi3lora.kernels.lora_matmul", "_matmul_lowrank_kernel", lora_cases, configs=lora_configs, ci=lora_ci),
    Kernel("phi3lora.kernels.rmsnorm", "_rms_norm_fwd_kernel", rms_fwd_cases),
    Kernel("phi3lora.kernels.rmsnorm", "_rms_norm_bwd_kernel", rms_bwd_cases),
    Kernel("phi3lora.kernels.rope", "_rope_kernel", rope_cases),
    Kernel("phi3lora.kernels.silu_mul", "_swiglu_fwd_kernel", swiglu_cases(False)),
    Kernel("phi3lora.kernels.silu_mul", "_swiglu_bwd_kernel", swiglu_cases(True)),
    Kernel("phi3lora.kernels.cross_entropy", "_softmax_ce_grad_kernel", ce_cases),
    Kernel("phi3lora.kernels.nf4_dequant", "_dequant_kernel", nf4_dequant_cases),
    Kernel("phi3lora.kernels.nf4_lora", "_nf4_matmul_lowrank_kernel", nf4_mm_cases, configs=nf4_mm_configs,
           ci=nf4_mm_ci, full=nf4_mm_full),
    Kernel("phi3lora.kernels.lora_gather", "_gather_shrink_kernel", gather_shrink_cases, ci=gather_ci),
    Kernel("phi3lora.kernels.lora_gather", "_gather_expand_kernel", gather_expand_cases, ci=gather_ci),
]
MODULES = sorted({k.module for k in CASES})
SPILL_FREE = ["_matmul_lowrank_kernel"]  # kernels whose every sm_90 16-bit config must be spill- and serial-free


# ----------------------------------------------------------------------------------------------------------------
# Running and reporting
# ----------------------------------------------------------------------------------------------------------------

def cfg_label(cfg):
    if cfg is None:
        return "launcher's meta"
    b = cfg.kwargs
    return f"{b['BLOCK_M']}x{b['BLOCK_N']}x{b['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages}"


def _cost(cfg, dtype):
    """Rough compile cost, so the slow tasks start first: fp32 GEMM tiles are ptxas's slowest."""
    if cfg is None:
        return 0
    return cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] * (4 if dtype == "fp32" else 1)


def make_tasks(full, known_issues=False, only=None):
    # the case builders run in the workers (outside the interpreter: swiglu's block width depends on it); here
    # only their names are needed, which do not
    tasks = []
    for entry in [e for e in CASES if bool(e.known_issue) == known_issues and (only is None or e.kernel in only)]:
        for dtype in DTYPES:
            configs = entry.configs(dtype)
            for cap in TARGETS:
                for case in entry.cases(dtype, cap):
                    for ci, cfg in enumerate(configs):
                        if entry.full(dtype, cap, case, ci) if full else entry.ci(dtype, cap, case, ci):
                            tasks.append(dict(registry=__file__, builder=builder_source(entry),
                                              module=entry.module, kernel=entry.kernel, cfg=ci,
                                              cfg_label=cfg_label(cfg), dtype=dtype, cap=cap, case=case,
                                              cost=_cost(cfg, dtype)))
    return tasks


def builder_source(entry):
    """What the cache key needs of the registry: this entry's builders and the shapes they use."""
    import inspect
    constants = (HID, INTER, VOCAB, HEADS, KV, HDIM, ROT, SEQ, TOKENS, LINEARS, RANKS, NF4, SMS, GATHER_BATCHES)
    return inspect.getsource(entry.cases) + inspect.getsource(entry.configs) + repr(constants)


def module_files():
    return {e.kernel: str(ROOT / (e.module.replace(".", "/") + ".py")) for e in CASES}


def cell(r):
    if r["err"]:
        return "OOR" if r["oor"] else "ERR"
    flags = ("s" if r["spill_store"] or r["spill_load"] else "") + ("w" if r["serial"] else "") + \
        ("" if r["fits"] else "!")
    return f"{r['shared'] // 1024}K/{r['regs'] if r['regs'] is not None else '?'}{flags}"


def table(rows):
    """Markdown: one line per (kernel, case, target, dtype), one cell per config."""
    import triton
    lines = [f"triton {triton.__version__}, torch {torch.__version__}; cell = dynamic shared KiB / registers per "
             "thread; s = spills, w = ptxas serializes wgmma, ! = cannot launch, OOR/ERR = out of resources / error",
             ""]
    by_kernel = {}
    for r in rows:
        by_kernel.setdefault(r["kernel"], []).append(r)
    natural = lambda s: re.sub(r"\d+", lambda m: m.group().zfill(6), s)  # noqa: E731 - R=8 before R=16
    for name, krows in by_kernel.items():
        labels = {}
        for r in krows:
            labels.setdefault((r["dtype"] == "fp32", r["cfg"]), r["cfg_label"])
        lines.append(f"**{name}**: " + "; ".join(f"{'fp32 ' if f else ''}c{i} = {lab}"
                                                 for (f, i), lab in sorted(labels.items())))
        lines.append("")
        lines.append("| case | target | dtype | mma | " + " | ".join(f"c{i}" for i in range(
            max(r["cfg"] for r in krows) + 1)) + " |")
        lines.append("|---" * (4 + max(r["cfg"] for r in krows) + 1) + "|")
        groups = {}
        for r in krows:
            groups.setdefault((r["case"], r["cap"], r["dtype"]), {})[r["cfg"]] = r
        for (case, cap, dtype), cfgs in sorted(groups.items(), key=lambda g: (natural(g[0][0]), -g[0][1], g[0][2])):
            n = max(r["cfg"] for r in krows) + 1
            mma = next(iter(cfgs.values()))["mma"]
            lines.append(f"| {case} | sm{cap} | {dtype} | {mma} | "
                         + " | ".join(cell(cfgs[i]) if i in cfgs else "" for i in range(n)) + " |")
        lines.append("")
    return "\n".join(lines)


# kernels that decode NF4 scales: no fused multiply-add may round the scale once (kernels/nf4_dequant.py, EXACT_DECODE)
EXACT_DECODE = ("_dequant_kernel", "_nf4_matmul_lowrank_kernel")


def problems(rows, full):
    """What makes the test fail, as readable lines."""
    out = []
    for r in rows:
        where = f"{r['kernel']} {r['case']} c{r['cfg']} ({r['cfg_label']}) {r['dtype']} sm{r['cap']}"
        if r["err"] and not r["oor"]:
            out.append(f"compile error: {where}: {r['err']}")
        elif not r["err"] and r["shared"] > SMEM_LIMIT[r["cap"]]:
            out.append(f"can never launch (needs {r['shared']} B of shared memory > {SMEM_LIMIT[r['cap']]}): "
                       f"{where}; prune it")
        elif r["kernel"] in EXACT_DECODE and not r["err"] and r.get("fma_f32"):
            out.append(f"{r['fma_f32']} fma.rn.f32 in the PTX (the NF4 scale must round twice, as the reference "
                       f"does: launch with kernels.nf4_dequant.EXACT_DECODE): {where}")
        elif r["kernel"] in SPILL_FREE and r["cap"] == 90 and r["dtype"] != "fp32" and not r["err"] and (
                r["spill_store"] or r["spill_load"] or r["serial"]):
            out.append(f"spills {r['spill_store']}/{r['spill_load']} B or serialized wgmma {r['serial']}: {where}")
    groups = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["case"], r["dtype"], r["cap"]), []).append(r)
    for (k, case, dtype, cap), rs in groups.items():
        if not any(r["fits"] and not (r["spill_store"] or r["spill_load"]) for r in rs):
            out.append(f"no config compiles, fits and runs without spills: {k} {case} {dtype} sm{cap}")
    return out


def run(full, only=None):
    tasks = make_tasks(full, only=only)
    # big batches: each worker pays ~3 CPU-s to import torch and triton, so fewer workers leave more for compiles
    return kernel_aot.run_tasks(tasks, module_files(), workers=2, batch_size=12 if full else 10)


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------

def jit_kernels(path):
    """The @triton.jit functions of a kernels/*.py file that no other one calls (device functions are inlined
    into their callers and compiled with them)."""
    tree = ast.parse(Path(path).read_text())
    jits = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
            and any("jit" in ast.unparse(d) for d in node.decorator_list)}
    called = {c.func.id for node in jits.values() for c in ast.walk(node)
              if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
    # a device function another module imports (nf4_dequant.decode_nf4 in nf4_lora) is not a kernel either
    return [name for name in jits if name not in called and not _imported_elsewhere(name, path)]


def _imported_elsewhere(name, path):
    return any(re.search(rf"import[^\n]*\b{name}\b", p.read_text())
               for p in (ROOT / "phi3lora" / "kernels").glob("*.py") if p != Path(path))


def test_every_kernel_is_registered():
    """Each @triton.jit kernel in kernels/*.py is registered (device functions are compiled with their callers)."""
    pytest.importorskip("triton")
    registered = {(k.module, k.kernel) for k in CASES}
    missing = [f"phi3lora.kernels.{p.stem}.{name}" for p in sorted((ROOT / "phi3lora" / "kernels").glob("*.py"))
               for name in jit_kernels(p) if (f"phi3lora.kernels.{p.stem}", name) not in registered]
    assert not missing, f"register these kernels in CASES (tests/test_kernels_compile.py): {missing}"


def _check(full, capsys=None, only=None):
    pytest.importorskip("triton")
    rows = run(full, only)
    text = table(rows)
    uncached = [r for r in rows if not r.get("cached")]
    summary = (f"{len(rows)} compiles ({len(uncached)} uncached, {sum(r['seconds'] for r in uncached):.0f} s of "
               f"compile time), {sum(bool(r['err']) for r in rows)} failed")
    print("\n" + text + "\n" + summary)
    bad = problems(rows, full)
    assert not bad, "\n".join(bad)
    return rows


def test_kernels_compile_for_sm90_and_sm80():
    _check(full=False)


def test_gathered_lora_compiles():
    """The gathered-LoRA pair alone (`-k gathered` after an edit to it); the test above compiles it too, and the
    per-task cache makes the second run free."""
    _check(full=False, only=("_gather_shrink_kernel", "_gather_expand_kernel"))


@pytest.mark.slow
def test_full_sweep():
    _check(full=True)


@pytest.mark.slow
@pytest.mark.xfail(reason="kernels registered with a known_issue (see CASES); passes once they are fixed",
                   strict=False)
def test_known_issues_are_fixed():
    pytest.importorskip("triton")
    if not any(e.known_issue for e in CASES):
        pytest.skip("no kernel is registered with a known issue")
    rows = kernel_aot.run_tasks(make_tasks(full=False, known_issues=True), module_files(), workers=2)
    print("\n" + table(rows))
    bad = problems(rows, False)
    assert not bad, "\n".join(bad)
