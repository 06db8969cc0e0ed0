"""train.py under damage (issue 13: 1, 2, 3, 7, 8) and its configuration (issue 10: 2, 5): damaged or half-deleted
checkpoints, a diverged adapter, NaN base weights, a full disk, an earlier run in --out, bad values; the tiny
settings, loss.svg."""
import errno
import json
import math
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

from phi3lora import lora  # noqa: E402
from phi3lora.cli import train  # noqa: E402
from phi3lora.training import checkpoints  # noqa: E402
from phi3lora.training import checkpoints as ckpt  # noqa: E402
from phi3lora.training import setup  # noqa: E402
from phi3lora.training.config import defaults, parse_config  # noqa: E402
from helpers import small_tiny_args  # noqa: E402

TINY = small_tiny_args() + ["--device", "cpu", "--dtype", "fp32", "--no-grad-checkpointing", "--no-packing",
        "--lora-target-modules", "qkv_proj,lm_head", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0",
        "--log-every", "1000", "--batch-size", "2", "--eval-every", "0"]
QA = [("What is LoRA?", "Low-rank adaptation."), ("Capital of France?", "Paris."), ("2 + 2?", "4.")]


def write_data(tmp_path) -> str:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n" for q, a in QA))
    return str(path)


def run(args, capsys):
    rc = train.main(TINY + args)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err


def losses(out):
    recs = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    """A finished 3-step run with a checkpoint after every step, and its losses."""
    tmp = tmp_path_factory.mktemp("ckpt")
    data, out = write_data(tmp), tmp / "out"
    assert train.main(TINY + ["--data", data, "--out", str(out), "--max-steps", "3", "--save-every", "1",
                              "--keep-last", "3", "--lr", "1e-2"]) == 0
    return data, out, losses(out)


# ----- 13.1 damaged checkpoints -------------------------------------------------------------------------------------
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "missing optimizer.pt": (lambda p: (p / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    "truncated adapter": (lambda p: truncate(next((p / "adapter").glob("*.safetensors"))), "truncated"),
    "truncated optimizer.pt": (lambda p: truncate(p / "optimizer.pt"), "optimizer.pt has"),
    "truncated trainer_state.json": (lambda p: truncate(p / "trainer_state.json"), "trainer_state.json has"),
    "missing rng.safetensors": (lambda p: (p / "rng.safetensors").unlink(), "rng.safetensors is missing"),
    "no manifest (never finished)": (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_with_its_reason(tmp_path, three_checkpoints, damage):
    _, out, _ = three_checkpoints
    root = tmp_path / "checkpoints"
    shutil.copytree(out / "checkpoints", root)
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [1, 2, 3]
    harm, reason = DAMAGE[damage]
    harm(ckpt.step_dir(root, 3))
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [1, 2]
    newest, skipped = ckpt.newest_complete(root)
    assert newest == ckpt.step_dir(root, 2)
    assert len(skipped) == 1 and skipped[0].startswith("step-0000003: ") and reason in skipped[0], skipped


def test_same_size_damage_is_found_by_the_hash(tmp_path, three_checkpoints):
    _, out, _ = three_checkpoints
    root = tmp_path / "checkpoints"
    shutil.copytree(out / "checkpoints", root)
    opt = ckpt.step_dir(root, 3) / "optimizer.pt"
    data = bytearray(opt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    opt.write_bytes(bytes(data))
    assert ckpt.problem(ckpt.step_dir(root, 3)) is None  # sizes match: listed
    newest, skipped = ckpt.newest_complete(root)  # but resume reads the hashes
    assert newest == ckpt.step_dir(root, 2) and "SHA-256" in skipped[0]


def test_resume_from_a_damaged_run_continues_from_the_newest_whole_checkpoint(tmp_path, three_checkpoints, capsys):
    data, out, reference = three_checkpoints
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (ckpt.step_dir(copy / "checkpoints", 3) / "optimizer.pt").unlink()
    with open(copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # the half-written line of a killed run
    rc, err = run(["--data", data, "--out", str(copy), "--max-steps", "3", "--save-every", "1", "--keep-last", "3",
                   "--lr", "1e-2", "--resume"], capsys)
    assert rc == 0, err
    assert "skipping checkpoint step-0000003: optimizer.pt is missing" in err
    assert "metrics.jsonl:4 is not a JSON record; dropped" in err
    assert "resumed from" in err and "step-0000002 at step 2" in err
    assert losses(copy) == reference  # step 3 again, exactly
    assert [s for s, _ in ckpt.list_checkpoints(copy / "checkpoints")] == [1, 2, 3]
    # nothing whole at all: a clear error
    for step in (1, 2, 3):
        truncate(ckpt.step_dir(copy / "checkpoints", step) / "trainer_state.json")
    rc, err = run(["--data", data, "--out", str(copy), "--max-steps", "3", "--resume"], capsys)
    assert rc == 2 and "error: --resume: no complete checkpoint" in err and "step-0000001: trainer_state" in err


def test_deletion_renames_away_first_and_leftovers_are_cleaned(tmp_path, three_checkpoints, monkeypatch, capsys):
    _, out, _ = three_checkpoints
    root = tmp_path / "checkpoints"
    shutil.copytree(out / "checkpoints", root)

    def killed(path, *a, **kw):  # kill -9 in the middle of deleting: the first file gone, then the process
        next(p for p in Path(path).rglob("*") if p.is_file()).unlink()
        raise KeyboardInterrupt
    monkeypatch.setattr(ckpt.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.delete_old(root, keep_last=2, newest_step=3)
    monkeypatch.undo()
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2, 3]  # the half-deleted step 1 is not listed
    assert (root / ".deleting-step-0000001").is_dir()
    (root / "step-0000009").mkdir()  # what a double Ctrl-C could leave
    (root / "step-0000004.tmp").mkdir()
    ckpt.clean_leftovers(root)
    assert sorted(p.name for p in root.iterdir()) == ["step-0000002", "step-0000003"]
    assert "removing incomplete checkpoint folder" in capsys.readouterr().err


# ----- 13.2 NaN, divergence, zero gradients, NaN base weights -------------------------------------------------------
def test_a_diverged_adapter_is_never_saved_and_never_named_good(tmp_path, three_checkpoints, capsys):
    data, out, _ = three_checkpoints
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    rc, err = run(["--data", data, "--out", str(copy), "--max-steps", "5", "--save-every", "1", "--keep-last", "3",
                   "--lr", "1e20", "--warmup-steps", "0", "--resume"], capsys)
    assert rc == 2 and ("diverged" in err or "no longer finite" in err), err
    assert "step-0000003" in err and "lower --lr" in err
    assert [s for s, _ in ckpt.list_checkpoints(copy / "checkpoints")] == [1, 2, 3]  # nothing poisoned written
    # a fresh run that diverges at its first step has no good checkpoint to name
    rc, err = run(["--data", data, "--out", str(tmp_path / "fresh"), "--max-steps", "3", "--lr", "1e6",
                   "--save-every", "1"], capsys)
    assert rc == 2 and "Last good checkpoint: none yet" in err, err
    assert not ckpt.list_checkpoints(tmp_path / "fresh" / "checkpoints")


def test_zero_gradients_are_reported(tmp_path, monkeypatch, capsys):
    real = train.micro_step

    def no_gradient(model, batch, n, amp):
        return real(model, batch, math.inf, amp)  # loss / inf: every gradient exactly 0
    monkeypatch.setattr(train, "micro_step", no_gradient)
    rc, err = run(["--data", write_data(tmp_path), "--out", str(tmp_path / "o"), "--max-steps", "3"], capsys)
    assert rc == 0
    assert "warning: gradient norm 0 at step 1" in err and "3 of 3 steps had gradient norm 0" in err


def test_a_nan_base_weight_is_named_at_load(tmp_path, monkeypatch, capsys):
    real = setup.load_base

    def damaged(*args, **kw):
        model = real(*args, **kw)
        with torch.no_grad():
            model.model.layers[1].post_attention_layernorm.weight[3] = float("nan")
        return model
    monkeypatch.setattr(setup, "load_base", damaged)
    rc, err = run(["--data", write_data(tmp_path), "--out", str(tmp_path / "o"), "--max-steps", "1"], capsys)
    assert rc == 2 and "model.layers.1.post_attention_layernorm.weight holds 1 NaN" in err, err
    assert "--lr" not in err.strip().splitlines()[-1] and not (tmp_path / "o" / "checkpoints").exists()


# ----- 13.3 disk full -----------------------------------------------------------------------------------------------
def disk_full(*a, **kw):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# Each file of a checkpoint failing in turn, each as its writer fails on a full disk: torch.save's zip writer raises
# RuntimeError "[enforce fail at inline_container.cc] ... unexpected pos", the others OSError ENOSPC.
ZIP_WRITER_FULL = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4288 vs 4176")
CHECKPOINT_FILES = {
    "adapter": ("save_adapter", "No space left"),
    "optimizer.pt": ("torch.save", "unexpected pos 4288 vs 4176"),
    "rng.safetensors": ("write_file", "No space left"),
    "trainer_state.json": ("write_text", "No space left"),
    "manifest.json": ("write_manifest", "No space left"),
}


@pytest.mark.parametrize("file", list(CHECKPOINT_FILES))
def test_disk_full_while_checkpointing_is_a_clean_error(tmp_path, monkeypatch, capsys, file):
    data, out = write_data(tmp_path), tmp_path / "out"
    how, reason = CHECKPOINT_FILES[file]

    def failing(real, path_of):  # real, failing when the path it writes is in step 2's checkpoint
        def write(*a, **kw):
            path = str(path_of(*a))
            if "step-0000002" in path and (file in path or how == "write_manifest"):
                if how == "torch.save":
                    raise ZIP_WRITER_FULL
                disk_full()
            return real(*a, **kw)
        return write
    target, name, path_of = {
        "save_adapter": (checkpoints.lora, "save_adapter", lambda model, path, *a: path),
        "torch.save": (torch, "save", lambda obj, f, *a: f),
        "write_file": (checkpoints.atomic, "write_file", lambda path, *a: path),
        "write_text": (Path, "write_text", lambda self, *a: self),
        "write_manifest": (checkpoints, "write_manifest", lambda folder: folder),
    }[how]
    monkeypatch.setattr(target, name, failing(getattr(target, name), path_of))
    rc, err = run(["--data", data, "--out", str(out), "--max-steps", "3", "--save-every", "1"], capsys)
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("error: cannot write the checkpoint of step 2"), err
    assert f"({file}: " in last and reason in last, last
    assert "step-0000001" in last and "--resume" in last
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]  # no .tmp left to fill it
    assert checkpoints.problem(out / "checkpoints" / "step-0000001", hashes=True) is None  # the older one intact


def test_a_config_toml_is_written_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith("config.toml"):
            disk_full()
        return real_fsync(fd)
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to tell the files apart")
    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    rc, err = run(["--data", write_data(tmp_path), "--out", str(out), "--max-steps", "1"], capsys)
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error: cannot write") and "No space left" in err, err
    assert list(out.iterdir()) == []  # no 0-byte config.toml, no temporary file


def test_disk_full_on_the_final_adapter_says_the_old_one_is_older(tmp_path, monkeypatch, capsys):
    data, out = write_data(tmp_path), tmp_path / "out"
    assert run(["--data", data, "--out", str(out), "--max-steps", "1"], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in (out / "adapter").iterdir()}
    real = lora.save_adapter

    def save_adapter(model, path, *a, **kw):
        if Path(path) == out / "adapter":
            disk_full()
        return real(model, path, *a, **kw)
    monkeypatch.setattr(lora, "save_adapter", save_adapter)
    rc, err = run(["--data", data, "--out", str(out), "--max-steps", "2", "--resume"], capsys)
    assert rc == 2 and f"cannot write {out / 'adapter'} (No space left on device)" in err, err
    assert "from an earlier run, older than this run's newest checkpoint" in err and "step-0000002" in err
    assert {p.name: p.read_bytes() for p in (out / "adapter").iterdir()} == before
    monkeypatch.undo()
    assert run(["--data", data, "--out", str(out), "--max-steps", "2", "--resume"], capsys)[0] == 0
    assert {p.name: p.read_bytes() for p in (out / "adapter").iterdir()} != before


# ----- 13.8 an earlier run in --out ---------------------------------------------------------------------------------
def test_an_earlier_run_is_never_replaced_without_overwrite(tmp_path, capsys):
    data, out = write_data(tmp_path), tmp_path / "out"
    assert run(["--data", data, "--out", str(out), "--max-steps", "1"], capsys)[0] == 0
    shutil.rmtree(out / "checkpoints")  # deleted by hand: adapter/ and metrics.jsonl are still the user's
    kept = {p: p.read_bytes() for p in [out / "metrics.jsonl", out / "config.toml", *(out / "adapter").iterdir()]}
    rc, err = run(["--data", data, "--out", str(out), "--max-steps", "1"], capsys)
    assert rc == 2 and "already holds an earlier run (adapter, metrics.jsonl, config.toml, loss.svg)" in err, err
    assert all(p.read_bytes() == b for p, b in kept.items())
    own = tmp_path / "own"  # a folder with the user's own config.toml and metrics.jsonl
    own.mkdir()
    (own / "config.toml").write_text("# mine\n")
    (own / "metrics.jsonl").write_text("{}\n")
    rc, err = run(["--data", data, "--out", str(own), "--max-steps", "1"], capsys)
    assert rc == 2 and "metrics.jsonl, config.toml" in err and (own / "config.toml").read_text() == "# mine\n"
    assert run(["--data", data, "--out", str(out), "--max-steps", "1", "--overwrite"], capsys)[0] == 0


# ----- 13.7 bad values, refused before any model loads ------------------------------------------------------------
BAD = [
    (["--lora-dropout", "1.5"], "[lora] lora_dropout (--lora-dropout) must be in [0, 1), got 1.5"),
    (["--lora-target-modules", "nope_proj"], "target_modules ['nope_proj'] match no"),
    (["--lora-enable-lora", "false,false,false", "--lora-target-modules", "qkv_proj"], "enable_lora is all False"),
    (["--lora-enable-lora", "true,false"], "enable_lora (--lora-enable-lora) needs 3 values, got 2"),
    (["--lora-alpha", "-5"], "[lora] lora_alpha (--lora-alpha) must be > 0, got -5.0"),
    (["--lora-r", "0"], "[lora] r (--lora-r) must be > 0, got 0"),
    (["--adam-beta1", "2"], "[training] adam_beta1 (--adam-beta1) must be in [0, 1), got 2.0"),
    (["--adam-beta2", "-0.1"], "adam_beta2 (--adam-beta2) must be in [0, 1)"),
    (["--adam-eps", "-1"], "adam_eps (--adam-eps) must be >= 0"),
    (["--lr", "nan"], "lr (--lr) must be a finite number, got nan"),
    (["--weight-decay", "inf"], "weight_decay (--weight-decay) must be a finite number"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_are_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, args, message):
    def never(*a, **kw):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(setup, "load_base", never)
    rc, err = run(["--out", str(tmp_path / "o")] + args, capsys)
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("error: ") and message in last and err.count("error:") == 1, err
    assert not (tmp_path / "o").exists()


def test_bad_values_in_a_config_file_too(tmp_path, capsys):
    f = tmp_path / "c.toml"
    for text, message in (("[lora]\nlora_dropout = 1.5\n", "lora_dropout (--lora-dropout) must be in [0, 1)"),
                          ('[lora]\nbias = "some"\n', "[lora] bias (--lora-bias) must be one of none, all, lora_only"),
                          ("[training]\nadam_beta1 = 1.0\n", "adam_beta1 (--adam-beta1) must be in [0, 1)")):
        f.write_text(text)
        assert train.main(["--config", str(f)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err


# ----- --model tiny takes the tiny preset's settings, under the config file and the flags ----------------------------
NOTE = "settings (flags > the tiny preset > defaults):"


def test_model_tiny_starts_from_the_preset_settings_under_the_file_and_the_flags(capsys):
    demo = parse_config(["--config", str(ROOT / "configs" / "tiny.toml")])
    notes = []
    cfg = parse_config(["--model", "tiny", "--data", "mine.jsonl"], notes)
    assert len(notes) == 1 and NOTE in notes[0]
    assert "--lr 0.001" in notes[0] and "--no-packing" in notes[0] and "--lora-alpha 256 " in notes[0], notes
    for key in ("lr", "max_steps", "batch_size", "warmup_ratio"):
        assert cfg["training"][key] == demo["training"][key], key
    assert cfg["lora"] == demo["lora"]
    # where the run reads and writes stays the user's
    assert cfg["training"]["data"] == "mine.jsonl" and cfg["training"]["eval_data"] == ""
    assert cfg["training"]["out"] == defaults()["training"]["out"]
    # a flag wins over the preset; so does a key of the config file, and a flag over the file
    assert parse_config(["--model", "tiny", "--lr", "1e-3"])["training"]["lr"] == 1e-3
    plain, notes = str(ROOT / "configs" / "phi3-mini-lora.toml"), []
    from_file = parse_config(["--config", plain, "--model", "tiny"], notes)
    assert from_file["training"]["lr"] == 2e-4 and from_file["lora"]["r"] == 16 and len(notes) == 2
    # the file's epochs govern: the preset's floor of 100 steps does not hold them down, and a line says so
    assert from_file["training"]["max_steps"] == 0 and from_file["training"]["min_steps"] == 0
    assert "governs, not --min-steps 100 (the tiny preset)" in notes[1], notes
    assert parse_config(["--config", plain, "--model", "tiny", "--lr", "3e-3"])["training"]["lr"] == 3e-3
    notes = []
    assert parse_config(["--model", "other"], notes)["training"]["lr"] == 2e-4
    assert notes == ["settings (flags > defaults):\n  flags  --model other"]  # no preset for another model


def test_the_tiny_settings_note_comes_with_the_run_not_before_an_input_error(tmp_path, capsys):
    # the settings summary belongs to the run (the demo-sized model, built only by the second run); TINY gives
    # the preset's settings as flags, so the summary names no preset here
    rc, err = run(["--model", "tiny", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")],
                  capsys)
    assert rc == 2 and err.startswith("error: ") and "settings (" not in err, err
    rc, err = run(["--model", "tiny", "--data", write_data(tmp_path), "--out", str(tmp_path / "o"), "--max-steps", "1"],
                  capsys)
    assert rc == 0 and "settings (flags > defaults):" in err and "--model tiny" in err, err


# ----- 10.5 loss.svg ------------------------------------------------------------------------------------------------
def test_loss_svg_has_title_axes_both_curves_and_a_legend(tmp_path, capsys):
    data, out = write_data(tmp_path), tmp_path / "out"
    assert run(["--data", data, "--eval-data", data, "--out", str(out), "--max-steps", "4", "--eval-every", "2"],
               capsys)[0] == 0
    svg = ET.parse(out / "loss.svg").getroot()  # well-formed XML
    ns = "{http://www.w3.org/2000/svg}"
    texts = [t.text for t in svg.iter(ns + "text")]
    assert "Loss per step: out" in texts and "optimizer step" in texts and "loss (nats per target token)" in texts
    assert "train loss" in texts and "eval loss" in texts
    lines = svg.findall(ns + "polyline")
    assert len(lines) == 2
    assert len(lines[0].get("points").split()) == 4  # train: steps 1-4
    assert len(lines[1].get("points").split()) == 3  # eval: before training, steps 2 and 4


@pytest.mark.parametrize("shape", ["rising", "falling", "flat"])
def test_loss_svg_legend_covers_no_data(tmp_path, shape):
    # the legend sat inside the plot's top-right corner, where a rising (or flat, or eval) curve runs
    from phi3lora.training.metrics import write_loss_svg
    loss = {"rising": lambda s: 1.0 + s / 10, "falling": lambda s: 5.0 - s / 10, "flat": lambda s: 2.0}[shape]
    records = [{"step": s, "loss": loss(s)} for s in range(1, 41)]
    records += [{"step": s, "eval_loss": loss(s) + 0.1} for s in (1, 20, 40)]
    write_loss_svg(records, tmp_path / "loss.svg")
    svg = ET.parse(tmp_path / "loss.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    box = next(r for r in svg.iter(ns + "rect") if r.get("class") == "legend")
    lx, ly = float(box.get("x")), float(box.get("y"))
    lx1, ly1 = lx + float(box.get("width")), ly + float(box.get("height"))
    grid = [ln for ln in svg.iter(ns + "line") if ln.get("stroke") == "#e5e5e5"]  # y grid lines span the plot area
    px0, px1 = min(float(g.get("x1")) for g in grid), max(float(g.get("x2")) for g in grid)
    py0, py1 = min(float(g.get("y1")) for g in grid), max(float(g.get("y1")) for g in grid)
    assert lx >= px1 or lx1 <= px0 or ly >= py1 or ly1 <= py0, "the legend overlaps the plot area"
    points = [tuple(map(float, p.split(","))) for line in svg.iter(ns + "polyline") for p in line.get("points").split()]
    points += [(float(c.get("cx")), float(c.get("cy"))) for c in svg.iter(ns + "circle") if c.get("r") == "3.5"
               and float(c.get("cx")) < px1 + 1]  # eval markers (the legend's own marker is inside its box)
    assert len(points) == 40 + 3 + 3
    r = 4.0  # a marker's radius and the line width around each point
    hits = [(x, y) for x, y in points if x + r > lx and x - r < lx1 and y + r > ly and y - r < ly1]
    assert not hits, f"data under the legend: {hits}"
