"""The benchmark scripts stay alive: each runs its CPU smoke configuration and ends with a JSON line that holds
the figures its table shows (the GPU runs are recorded in bench/RESULTS.md)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script, *args, timeout=300):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout, json.loads(proc.stdout.strip().splitlines()[-1])


def test_lora_matmul_smoke():
    out, result = run_bench("lora_matmul.py", "--shapes", "qkv,down", "--warmup", "1", "--rep", "2")
    assert "ours" in out and "peft" in out
    rows = result["rows"] if isinstance(result, dict) and "rows" in result else result
    assert rows, result


def test_load_memory_smoke():
    # a small checkpoint (about 40 MB): the figure is only meaningful at 1 GB+, here it checks the script runs and
    # reports weights and added memory in a plausible ratio
    out, result = run_bench("load_memory.py", "--hidden", "256", "--layers", "4", "--vocab", "4096", "--shard-mb", "8")
    assert result["weights_bytes"] > 0 and result["added_bytes"] > 0, result


def test_train_step_smoke():
    # our LoRA training step against transformers + peft on the same small model; CPU fp32 here
    out, result = run_bench("train_step.py", "--seq", "64", "--steps", "1", "--warmup", "1", "--checkpointing", "off",
                            "--no-longest")
    systems = {r["system"] for r in result["rows"]}
    assert systems == {"ours", "theirs"}, result
    for r in result["rows"]:
        assert r["step_s"] > 0 and 0 < r["loss"] < 20, r  # a finite cross-entropy near ln(vocab) = 8.3
    (ratio,) = result["ratios"]
    assert ratio["step_time_ratio"] > 0 and "ours / theirs step time" in out
