"""The benchmark scripts stay alive: each runs its CPU smoke configuration and ends with a JSON line that holds
the figures its table shows (the GPU runs are recorded in bench/RESULTS.md)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script, *args, timeout=300):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout, json.loads(proc.stdout.strip().splitlines()[-1])


def test_lora_matmul_smoke(tmp_path):
    # odd sizes (M=37): the Triton kernels under the interpreter, tiles past the edges
    out, result = run_bench("lora_matmul.py", "--shapes", "qkv,down", "--tokens", "37", "--warmup", "1", "--rep", "2",
                            "--json-out", str(tmp_path / "a.json"))
    assert "ours" in out and "peft" in out
    rows = result["rows"]
    assert {(r["shape"], r["pass"]) for r in rows} == {(s, p) for s in ("qkv", "down") for p in ("fwd", "fwd+bwd")}
    # (b) peft, (c) addmm and (d) ours compute the same y, dX, dA, dB as the fp32 reference (fp32 here)
    for r in rows:
        assert r["check_ok"] and max(r["check"].values()) < 1e-4, r["check"]
        assert set(r["ms"]) == {"base", "peft", "addmm", "ours"} and all(v > 0 for v in r["ms"].values())
    assert result["summary"]["checks_ok"] and not result["summary"]["grid_complete"]
    # chunks of the grid combine into one table and summary
    _, merged = run_bench("lora_matmul.py", "--merge", str(tmp_path / "a.json"))
    assert len(merged["rows"]) == len(rows) and merged["summary"]["fwd+bwd"] == result["summary"]["fwd+bwd"]


def test_gathered_lora_smoke():
    # one batch of 8 requests over 1 and 4 adapters: every method computes the same layer as the fp32 reference
    out, result = run_bench("gathered_lora.py", "--rows", "8", "--adapters", "1,4", "--k", "64", "--m", "96",
                            "--rep", "1")
    assert "per_adapter" in out and "gathered" in out
    assert [(r["rows"], r["adapters"]) for r in result["rows"]] == [(8, 1), (8, 4)]
    for r in result["rows"]:
        assert set(r["ms"]) == {"per_request", "per_adapter", "gathered"} and all(v > 0 for v in r["ms"].values())
        assert max(r["err"].values()) < 1e-5, r["err"]
    assert result["checks_ok"]


def test_load_memory_smoke():
    # a small checkpoint (about 40 MB): the figure is only meaningful at 1 GB+, here it checks the script runs and
    # reports weights and added memory in a plausible ratio
    out, result = run_bench("load_memory.py", "--hidden", "256", "--layers", "4", "--vocab", "4096", "--shard-mb", "8")
    assert result["weights_bytes"] > 0 and result["added_bytes"] > 0, result


def test_train_step_smoke():
    # our LoRA training step against transformers + peft on the same small model; CPU fp32 here. The longest-sequence
    # search runs too (on the CPU only when asked), on the small LongRoPE config, so its code path stays alive.
    out, result = run_bench("train_step.py", "--seq", "64", "--steps", "1", "--warmup", "1", "--checkpointing", "off",
                            "--longest-start", "64", "--longest-max", "128")
    systems = {r["system"] for r in result["rows"]}
    assert systems == {"ours", "theirs"}, result
    for r in result["rows"]:
        assert r["step_s"] > 0 and 0 < r["loss"] < 20, r  # a finite cross-entropy near ln(vocab) = 8.3
        assert r["trainable_params"] > 0
    assert next(r for r in result["rows"] if r["system"] == "theirs")["attn_implementation"] == "sdpa"
    (ratio,) = result["ratios"]
    assert ratio["step_time_ratio"] > 0 and "ours / theirs step time" in out
    # no OOM on the CPU: both reach the cap
    assert {k: v["longest"] for k, v in result["longest_seq_batch1"].items()} == {"ours": 128, "theirs": 128}



@pytest.mark.slow  # one more subprocess importing torch
def test_train_step_variants_smoke():
    # DoRA, LoRA+ and NEFTune rows against plain LoRA, our model only, through train.py's optimizer and hook
    out, result = run_bench("train_step.py", "--variants", "plain,dora,loraplus,neftune", "--seq", "32", "--steps", "1",
                            "--warmup", "1", "--batch", "1", "--checkpointing", "off")
    assert [r["variant"] for r in result["variants"]] == ["plain", "dora", "loraplus", "neftune"]
    dora = next(r for r in result["variants"] if r["variant"] == "dora")
    assert dora["trainable_params"] > result["variants"][0]["trainable_params"]  # the magnitude vectors
    assert all(r["step_s"] > 0 and 0 < r["loss"] < 20 and r["max_rss_gb"] > 0 for r in result["variants"])
    assert "x plain" in out

def test_train_step_oom_search_recovers():
    # the GPU batch / length searches: an out-of-memory step ends the doubling, leaves no LoRA gradients behind,
    # and the same model measures again afterwards (simulated: a CPU run has no OOM of its own)
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("train_step_bench", ROOT / "bench" / "train_step.py")
    ts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ts)
    cfg = ts.small_config()
    system = ts.build_ours(cfg, torch.float32, "cpu", (), False)
    real_loss = system.loss_fn

    def loss_fn(ids):
        if ids.numel() > 2 * 32:
            loss = real_loss(ids)
            loss.backward()  # partial gradients, then the failure
            raise torch.cuda.OutOfMemoryError("simulated")
        return real_loss(ids)

    system.loss_fn = loss_fn
    budget = ts.Budget(0)
    assert ts.largest_batch(system, 32, cfg.vocab_size, "cpu", budget) == 2
    assert all(p.grad is None for p in system.model.parameters())
    assert ts.longest_sequence(system, cfg.vocab_size, "cpu", budget, start=16, limit=256) == {
        "longest": 64, "capped": False, "incomplete": False}
    r = ts.try_steps(system, 2, 32, cfg.vocab_size, "cpu", warmup=0, steps=1)
    assert r is not None and r["step_s"] > 0


@pytest.mark.slow  # the fused NF4 GEMM and the bf16 one under the interpreter, forward + backward: ~30 s
def test_qlora_matmul_smoke():
    out, result = run_bench("qlora_matmul.py", "--shapes", "o", "--tokens", "17")
    assert "ours-nf4" in out
    (row,) = result["rows"]
    assert set(row["ms"]) >= {"ours-nf4", "ours-bf16"} and all(v > 0 for v in row["ms"].values())
    # ours (and bitsandbytes' dequant + matmul) compute y, dX, dA, dB of the dense dequant(W4) reference
    assert max(row["err"].values()) < 1e-5, row["err"]


@pytest.mark.slow  # three subprocesses that each import torch (two import transformers): ~30 CPU-seconds
def test_gpu_check_cpu_mode(tmp_path):
    # the one-command GPU check, in its CPU smoke mode: every part runs, and the JSON and markdown land in --out
    # a generous budget: CI machines are shared; on 2 idle cores the run takes about 25 s (bench/RESULTS.md)
    out, result = run_bench("gpu_check.py", "--cpu", "--out", str(tmp_path), "--budget-s", "280")
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {k: v["status"] for k, v in report["parts"].items()} == {"tests": "ok", "matmul": "ok", "qlora": "ok",
                                                                     "train": "ok", "packed": "ok", "gathered": "ok",
                                                                     "variants": "ok", "serve": "ok"}
    assert report["elapsed_s"] <= report["budget_s"] and report["environment"]["device"] == "CPU"
    assert all(r["check_ok"] for r in report["parts"]["matmul"]["result"]["rows"])
    assert {r["system"] for r in report["parts"]["train"]["result"]["rows"]} == {"ours", "theirs"}
    variants = report["parts"]["variants"]["result"]["variants"]
    assert [r["variant"] for r in variants] == ["plain", "dora", "loraplus", "neftune"]
    assert all(r["step_s"] > 0 for r in variants)
    (qlora,) = report["parts"]["qlora"]["result"]["rows"]
    assert qlora["shape"] == "o" and max(qlora["err"].values()) < 1e-5
    assert [r["concurrency"] for r in report["parts"]["serve"]["result"]["rows"]] == [1, 4]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "planned share (estimate)" in md and "## matmul" in md and "## train" in md


def test_gpu_check_never_exceeds_its_budget(tmp_path):
    _, result = run_bench("gpu_check.py", "--cpu", "--out", str(tmp_path), "--budget-s", "4", timeout=60)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["elapsed_s"] <= 4.5, report
    assert all(v["status"] != "ok" for v in report["parts"].values()), report  # stopped or skipped, and said so
