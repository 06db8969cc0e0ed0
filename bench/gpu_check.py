"""Everything a lent H100/H200 should measure, in one command that stays inside its budget.

    PYTHONPATH=. python bench/gpu_check.py                      # GPU: writes under $OUT (or --out), <= 480 s
    PYTHONPATH=. python bench/gpu_check.py --cpu --out /tmp/gc  # CPU smoke (tiny shapes, Triton's interpreter)

Parts, in order (each a subprocess with PHI3LORA_STRICT_KERNELS=1, so a kernel failure is an error, not a silent
torch fallback):
  1. tests     the gpu-marked tests (pytest -m gpu): the kernels against their references at Phi-3-mini's sizes
  2. matmul    bench/lora_matmul.py: the four projections (qkv, o, gate_up, down) at M 4096 and 8192, r 16, forward
               and forward+backward, all four systems (base cuBLAS, peft's three matmuls, addmm, ours)
  3. qlora     bench/qlora_matmul.py: the QLoRA layer (issue 16), forward + backward at M 4096 on the four
               projections, r 16: our fused NF4 GEMM vs bitsandbytes' dequantize + matmul vs our bf16 LoRA GEMM
               (target: NF4 >= 0.9x bf16)
  4. train     bench/train_step.py: one training step, ours vs transformers + peft, seq 2048, the largest batch
               theirs fits, activation checkpointing off and on
  5. packed    bench/packed_attention.py --gpu: a LoRA step over packed rows of T 2k, 4k, 8k (sample-data lengths),
               8 layers of Phi-3-mini's shape: dense (B, 1, T, T) mask vs FlexAttention block mask vs unpacked and
               padded; tokens/s, peak memory, and the fraction of attention tiles the block mask skips
  6. gathered  bench/gathered_lora.py: one qkv layer (K 3072, M 9216, r 16, bf16) with 16/64/256 requests over
               1/4/16 adapters: each request alone, one batch per adapter, one batch with the torch gathered path,
               and with the Triton gathered-LoRA kernels
  7. variants  bench/train_step.py --variants: our step with DoRA, LoRA+ and NEFTune against plain LoRA (seq 2048,
               batch 4, checkpointing on): step time and peak memory
  8. serve     bench/serve.py --device cuda: the serving engine on the tiny preset in bf16, 16 requests x 128 tokens
               (base + 2 adapters mixed) one after another vs 4 and 16 at a time; tokens/s and time to first token
A part starts only if the time left covers its planned share; what does not fit is listed as skipped, with the
reason. The planned shares are estimates (no GPU run has timed them yet) and are labelled so in the output.
Writes gpu_check.json (the parts' own JSON results included) and gpu_check.md (their tables) to the output folder.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

START = time.monotonic()  # the budget counts from here: imports and the environment probe are part of it
ROOT = Path(__file__).resolve().parents[1]

# planned share of the budget per part, in seconds: ESTIMATES, not measurements (nothing here has run on a GPU)
PLAN_GPU = {"tests": 120, "matmul": 130, "qlora": 60, "train": 170, "packed": 90, "gathered": 40, "variants": 70,
            "serve": 40}
PLAN_CPU = {"tests": 10, "matmul": 10, "qlora": 10, "train": 20, "packed": 20, "gathered": 10, "variants": 20,
            "serve": 15}


def commands(cpu: bool, out: Path, budget: dict) -> dict:
    """Each part's command line; the benches get a --budget-s a little under the part's share, so they stop
    starting new cases in time and still write their JSON."""
    py = sys.executable
    if cpu:  # tiny shapes; without CUDA the gpu tests would skip, so only their selection is collected
        return {
            "tests": [py, "-m", "pytest", "-q", "--collect-only", "-m", "gpu", "-p", "no:cacheprovider",
                      "tests/test_kernels_fused.py"],
            "matmul": [py, "bench/lora_matmul.py", "--shapes", "qkv", "--tokens", "37", "--ranks", "8",
                       "--warmup", "1", "--rep", "2", "--json-out", str(out / "matmul.json")],
            "qlora": [py, "bench/qlora_matmul.py", "--shapes", "o", "--tokens", "17", "--warmup", "1", "--rep", "2",
                      "--json-out", str(out / "qlora.json")],
            "train": [py, "bench/train_step.py", "--seq", "32", "--steps", "1", "--warmup", "1", "--batch", "1",
                      "--checkpointing", "on", "--no-longest", "--json-out", str(out / "train.json")],
            "packed": [py, "bench/packed_attention.py", "--seq", "256", "--steps", "1",
                       "--json-out", str(out / "packed.json")],
            "gathered": [py, "bench/gathered_lora.py", "--rows", "8", "--adapters", "1,4", "--k", "64", "--m", "96",
                         "--rep", "2", "--json-out", str(out / "gathered.json")],
            "variants": [py, "bench/train_step.py", "--variants", "plain,dora,loraplus,neftune", "--seq", "32",
                         "--steps", "1", "--warmup", "1", "--batch", "1", "--json-out", str(out / "variants.json")],
            "serve": [py, "bench/serve.py", "--requests", "4", "--tokens", "4", "--concurrency", "1,4",
                      "--json-out", str(out / "serve.json")],
        }
    return {
        "tests": [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/"],
        "matmul": [py, "bench/lora_matmul.py", "--shapes", "qkv,o,gate_up,down", "--tokens", "4096,8192",
                   "--ranks", "16", "--budget-s", str(int(budget["matmul"] * 0.8)),
                   "--json-out", str(out / "matmul.json")],
        "qlora": [py, "bench/qlora_matmul.py", "--shapes", "qkv,o,gate_up,down", "--tokens", "4096",
                  "--json-out", str(out / "qlora.json")],
        "train": [py, "bench/train_step.py", "--seq", "2048", "--checkpointing", "both", "--no-longest",
                  "--budget-s", str(int(budget["train"] * 0.7)), "--json-out", str(out / "train.json")],
        "packed": [py, "bench/packed_attention.py", "--gpu", "--layers", "8", "--steps", "3",
                   "--budget-s", str(int(budget["packed"] * 0.6)), "--json-out", str(out / "packed.json")],
        "gathered": [py, "bench/gathered_lora.py", "--rows", "16,64,256", "--adapters", "1,4,16", "--k", "3072",
                     "--m", "9216", "--rank", "16", "--json-out", str(out / "gathered.json")],
        # DoRA, LoRA+ and NEFTune against plain LoRA: our step at seq 2048, batch 4, checkpointing on
        "variants": [py, "bench/train_step.py", "--variants", "plain,dora,loraplus,neftune", "--seq", "2048",
                     "--batch", "4", "--checkpointing", "on", "--budget-s", str(int(budget["variants"] * 0.7)),
                     "--json-out", str(out / "variants.json")],
        "serve": [py, "bench/serve.py", "--device", "cuda", "--dtype", "bfloat16", "--requests", "16", "--tokens",
                  "128", "--json-out", str(out / "serve.json")],
    }


def run_part(name: str, cmd: list, timeout: float, out: Path) -> dict:
    """Run one part; its output goes to <out>/<name>.log, its JSON (if it wrote one) into the result."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PHI3LORA_STRICT_KERNELS="1")
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        stdout, stderr = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        status = f"stopped at its {timeout:.0f} s limit"
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    seconds = time.monotonic() - start
    (out / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n\n{stdout}\n--- stderr ---\n{stderr}")
    result = {"status": status, "seconds": round(seconds, 1), "command": " ".join(cmd[1:]),
              "tail": (stdout + stderr).strip().splitlines()[-15:]}
    json_path = out / f"{name}.json"
    if json_path.exists():
        result["result"] = json.loads(json_path.read_text())
    # the human-readable part of a bench's output: everything before its JSON last line
    result["table"] = "\n".join(line for line in stdout.strip().splitlines() if not line.startswith("{"))
    return result


def environment() -> dict:
    import torch
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "python": sys.version.split()[0],
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# gpu_check: {env['device']}", "",
             f"{env['date']}, commit {env['commit']}, torch {env['torch']}, triton {env['triton']}, "
             f"budget {report['budget_s']:.0f} s, used {report['elapsed_s']:.0f} s", "",
             "| part | status | seconds | planned share (estimate) |", "|---|---|---|---|"]
    for name, part in report["parts"].items():
        lines.append(f"| {name} | {part['status']} | {part.get('seconds', '')} | {report['plan_estimate_s'][name]} |")
    for name, part in report["parts"].items():
        if part.get("table") or part.get("tail"):
            lines += ["", f"## {name}", "", f"`{part.get('command', '')}`", "", "```",
                      part.get("table") or "\n".join(part.get("tail", [])), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output folder (default $OUT, else ./gpu_check_out)")
    ap.add_argument("--budget-s", type=float, default=None, help="never run longer (GPU default 480, CPU 120)")
    ap.add_argument("--cpu", action="store_true", help="the CPU smoke run: tiny shapes, Triton's interpreter")
    ap.add_argument("--parts", default="tests,matmul,qlora,train,packed,gathered,variants,serve",
                    help="comma list of tests, matmul, qlora, train, packed, gathered, variants, serve")
    args = ap.parse_args(argv)
    import torch
    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device; use --cpu for the CPU smoke run", file=sys.stderr)
        sys.exit(2)
    if args.cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # inherited by the parts
    out = Path(args.out or os.environ.get("OUT") or "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    budget_s = args.budget_s or (120.0 if args.cpu else 480.0)
    plan = dict(PLAN_CPU if args.cpu else PLAN_GPU)
    scale = min(1.0, budget_s / sum(plan.values()))  # a smaller budget shrinks every share alike
    plan = {k: v * scale for k, v in plan.items()}
    cmds = commands(args.cpu, out, plan)
    env = environment()
    start = START
    parts = {}
    names = [p for p in args.parts.split(",") if p]
    for i, name in enumerate(names):
        if name not in cmds:
            ap.error(f"unknown part {name!r}; choose from {','.join(cmds)}")
        left = budget_s - (time.monotonic() - start)
        # its share and then some, but always half a share kept for each part after it; never past the budget
        keep = 0.5 * sum(plan.get(n, 0) for n in names[i + 1:])
        # 2 s kept for killing it and writing up: on a loaded machine reaping a killed part took over a second
        timeout = min(left - 2.0, max(plan[name] * 1.5, left - keep))
        # not even half its share left (or under half a second once the write-up second is kept): do not start
        # what cannot finish, nor give it a limit that runs past the budget
        if left < plan[name] * 0.5 or timeout < 0.5:
            parts[name] = {"status": f"skipped: {left:.0f} s left of the budget, its share is {plan[name]:.0f} s "
                                     "(an estimate)"}
            continue
        parts[name] = run_part(name, cmds[name], timeout=timeout, out=out)
        print(f"{name}: {parts[name]['status']} in {parts[name]['seconds']} s", flush=True)
    report = {"environment": env, "budget_s": budget_s, "elapsed_s": round(time.monotonic() - start, 1),
              "plan_estimate_s": {k: round(v) for k, v in plan.items()}, "cpu_smoke": args.cpu, "parts": parts}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))
    print(json.dumps({"out": str(out), "elapsed_s": report["elapsed_s"],
                      "status": {k: v["status"] for k, v in parts.items()}}))
    return report


if __name__ == "__main__":
    main()
