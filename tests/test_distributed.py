"""train.py under torchrun on CPU (gloo): 2 ranks x batch b must train exactly as 1 process x batch 2b, with DDP
and with FSDP2 (--fsdp), and a checkpoint of each resumes on the others.

The runs are subprocesses (torchrun starts its own): the test saves the small tiny model (tests/helpers.py) as a
model folder and trains that.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import free_port, small_tiny_config
from phi3lora.phi3mini import Phi3, Tokenizer
from phi3lora.training import distributed

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo_chat.jsonl"
STEPS = 5


def command(tmp: Path, out: str, procs: int, batch: int, *extra: str) -> list[str]:
    """train.py (under torchrun when procs > 1) on 5 examples: with a global batch of 4, each epoch is one
    micro-batch of 4 and one of 1, which leaves rank 1 nothing in every second step."""
    args = ["train.py", "--model", str(tmp / "model"), "--data", str(tmp / "data.jsonl"), "--eval-data",
            str(tmp / "data.jsonl"), "--out", str(tmp / out), "--batch-size", str(batch), "--max-steps", str(STEPS),
            "--max-seq-len", "128", "--no-packing", "--lora-dropout", "0", "--warmup-steps", "1", "--eval-every", "0",
            "--save-every", "2", "--keep-last", "3", *extra]
    launcher = [sys.executable]
    if procs > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1",
                     "--master_port", str(free_port())]
    return launcher + args


# as a user runs train.py: without conftest.py's TRITON_INTERPRET (the 4-bit layers would run in the interpreter)
ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "PYTHONPATH": str(ROOT),
       "OMP_NUM_THREADS": "1"}


def train(tmp: Path, out: str, procs: int, batch: int, *extra: str) -> Path:
    done = subprocess.run(command(tmp, out, procs, batch, *extra), cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (tmp / f"{out}.log").write_text(done.stderr)
    return tmp / out


def records(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def assert_same_training(a: Path, b: Path, steps=range(1, STEPS + 1)) -> None:
    ra, rb = records(a), records(b)
    for step in steps:
        assert ra[step]["loss"] == pytest.approx(rb[step]["loss"], abs=1e-5), step
        assert ra[step]["grad_norm"] == pytest.approx(rb[step]["grad_norm"], rel=1e-4, abs=1e-6), step
        assert ra[step]["target_tokens"] == rb[step]["target_tokens"]
    assert ra[STEPS]["eval_loss"] == pytest.approx(rb[STEPS]["eval_loss"], abs=1e-5)
    wa, wb = (load_file(str(p / "adapter" / "adapter.safetensors")) for p in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    Phi3(small_tiny_config()).save_pretrained(tmp / "model")
    Tokenizer.tiny().save_pretrained(tmp / "model")
    (tmp / "data.jsonl").write_text("".join(DEMO.read_text().splitlines(keepends=True)[:5]))
    return tmp, train(tmp, "one", 1, 4), train(tmp, "two", 2, 2)


@pytest.fixture(scope="module")
def fsdp_run(runs):
    return train(runs[0], "fsdp", 2, 2, "--fsdp")


@pytest.mark.slow
def test_two_ranks_of_batch_2_train_as_one_process_of_batch_4(runs):
    _, one, two = runs
    assert_same_training(one, two)
    assert records(two)[0]["eval_loss"] == pytest.approx(records(one)[0]["eval_loss"], abs=1e-5)
    state = json.loads((two / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["batch_index"] == 2  # global micro-batches, not per rank


@pytest.mark.slow
def test_fsdp_two_ranks_of_batch_2_train_as_one_process_of_batch_4(runs, fsdp_run):
    """The base sharded over the 2 ranks: the same losses, gradient norms, evaluation (rank 1 runs a dropped forward
    in the last round: 3 eval batches over 2 ranks) and greedy samples (decoded in lockstep) as one process."""
    _, one, _ = runs
    assert_same_training(one, fsdp_run)
    assert records(fsdp_run)[0]["eval_loss"] == pytest.approx(records(one)[0]["eval_loss"], abs=1e-5)
    samples = [(fsdp_run / "samples.jsonl").read_text(), (one / "samples.jsonl").read_text()]
    assert samples[0] == samples[1] and samples[0].count("\n") == 6  # 3 prompts at steps 0 and 5
    state = json.loads((fsdp_run / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["fsdp"] is True and state["batch_index"] == 2
    held = re.findall(r"this one holds ([\d.,]+) MiB of its ([\d.,]+) MiB", (fsdp_run.parent / "fsdp.log").read_text())
    shard, whole = map(float, held[0])
    assert len(held) == 1 and abs(shard - whole / 2) <= 0.1  # rank 0 holds half (0.1 MiB: printed rounded), logged once
    # the adapter records the base it was trained on, read before the base was sharded
    meta = [json.loads((p / "adapter" / "adapter_config.json").read_text()) for p in (fsdp_run, one)]
    assert meta[0]["base_fingerprint"] == meta[1]["base_fingerprint"] and meta[0]["base_fingerprint"]


@pytest.mark.slow
def test_fsdp_shards_a_4bit_base_and_trains_as_one_process(runs):
    """QLoRA under FSDP2: the packed NF4 codes are sharded (uint8, gathered with the block's bf16/fp32 norms) and
    the run equals --quantize nf4 in one process."""
    tmp = runs[0]
    one, two = (train(tmp, name, procs, batch, "--quantize", "nf4", *extra)
                for name, procs, batch, extra in (("nf4-one", 1, 4, ()), ("nf4-fsdp", 2, 2, ("--fsdp",))))
    assert_same_training(one, two)
    assert "holds" in (tmp / "nf4-fsdp.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("source, procs, batch, extra", [("two", 1, 4, ()), ("one", 2, 2, ()),
                                                         ("fsdp", 1, 4, ()), ("one", 2, 2, ("--fsdp",)),
                                                         ("fsdp", 2, 2, ())])
def test_resume_on_another_number_of_processes(runs, fsdp_run, source, procs, batch, extra):
    """Each kind of checkpoint (1 process, DDP, FSDP) resumes in another layout: the run goes on as if unbroken."""
    tmp, one, _ = runs
    resumed = tmp / f"from-{source}-{procs}{''.join(extra)}"
    shutil.copytree(tmp / source, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS:07d}")  # back to step 4 of 5
    train(tmp, resumed.name, procs, batch, "--resume", *extra)
    assert_same_training(one, resumed)


def test_each_rank_takes_its_contiguous_share():
    rows = [[0], [1], [2], [3], [4]]
    shares = [distributed.share(rows, distributed.World(r, 2)) for r in range(2)]
    assert shares == [[[0], [1], [2]], [[3], [4]]]
    assert distributed.share([[7]], distributed.World(1, 2)) == []
    assert distributed.share(rows, distributed.SINGLE) == rows


def test_without_torchrun_it_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.from_env() == distributed.SINGLE
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.from_env() == distributed.World(1, 2, 1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(distributed.TrainError, match="not a valid process layout"):
        distributed.from_env()


def rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker with this LOCAL_RANK (Linux /proc)."""
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"LOCAL_RANK={rank}".encode() in env:
            return int(child)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's pid in /proc")
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_ctrl_c_on_one_rank_stops_all_with_a_checkpoint(runs, mode):
    tmp = runs[0]
    out = tmp / f"stopped-{mode}"
    cmd = command(tmp, out.name, 2, 2, "--save-every", "1000", *(["--fsdp"] if mode == "fsdp" else []))
    cmd[cmd.index("--max-steps") + 1] = "1000"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").exists() and len(records(out)) >= 3):  # eval at 0, then steps 1, 2
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be stopped"
            time.sleep(0.2)
        os.kill(rank_pid(proc.pid, 1), signal.SIGINT)  # rank 1 alone: rank 0 hears of it at the next step
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "exitcode  : 130" in err, err[-3000:]
    steps = [step for step, _ in sorted(records(out).items())]
    saved = [p.name for p in (out / "checkpoints").iterdir()]
    assert saved == [f"step-{steps[-1]:07d}"] and 2 <= steps[-1] < 1000
    state = json.loads((out / "checkpoints" / saved[0] / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == steps[-1]


def test_dist_memory_table_adds_up():
    sys.path.insert(0, str(ROOT / "bench"))
    import dist_memory
    from family_memory import estimate

    mini = estimate("phi3-mini-4k", 16, 8192)
    two, eight = (dist_memory.per_gpu("phi3-mini-4k", 16, 8192, n) for n in (2, 8))
    assert two["ddp_gb"] == eight["ddp_gb"] > mini["weights_gb"]  # DDP: the whole base on every GPU
    shard = mini["weights_gb"] * (1 / 2 - 1 / 8)
    assert two["fsdp_gb"] - eight["fsdp_gb"] == pytest.approx(shard)  # FSDP2: the base / N, the adapter whole
    # the root unit: embeddings and lm_head (32064 x 3072 each, not tied) and the final norm
    assert dist_memory.root_params("phi3-mini-4k") == 2 * 32064 * 3072 + 3072
    # a Phi-3-mini block: qkv 3072x9216, o 3072x3072, gate_up 3072x16384, down 8192x3072, two norms of 3072
    assert dist_memory.block_params("phi3-mini-4k") == 3072 * (9216 + 3072 + 16384 + 8192) + 2 * 3072
