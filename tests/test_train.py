"""train.py end to end on the tiny model (in-process through train.main): learning, exact resume, crash safety,
bad inputs, NaN, Ctrl-C, gradient accumulation, activation checkpointing, overfit-then-generate, merge/export."""
import json
import math
import os
import signal
import tomllib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

from phi3lora import lora  # noqa: E402
from phi3lora.cli import train  # noqa: E402
from phi3lora.training.checkpoints import list_checkpoints, load_checkpoint  # noqa: E402
from phi3lora.training.config import defaults, parse_config  # noqa: E402
from phi3lora.training.data_order import EpochPlans  # noqa: E402
from phi3lora.training.lr_schedule import lr_at, total_and_warmup  # noqa: E402
from phi3lora.training.setup import autocast, build_model  # noqa: E402
from phi3lora.phi3mini import Phi3, Tokenizer, generate  # noqa: E402
from phi3lora.data.pipeline import ChatEncoder, collate  # noqa: E402
from phi3lora.training.config import typed  # noqa: E402
from helpers import small_tiny, small_tiny_args  # noqa: E402

END = 32007
# The tiny model's random, frozen lm_head caps its logits near +-1.3, so its tests also put LoRA on lm_head: without
# it the loss could not fall much below ~9.
TARGETS = "qkv_proj,o_proj,gate_up_proj,down_proj,lm_head"
TINY = small_tiny_args() + ["--device", "cpu", "--dtype", "fp32", "--no-grad-checkpointing", "--no-packing",
        "--lora-target-modules", TARGETS, "--lora-r", "8", "--lora-alpha", "16", "--log-every", "1000"]
QA = [("What is LoRA?", "Low-rank adaptation."), ("Capital of France?", "Paris."),
      ("2 + 2?", "4."), ("Who made Phi-3?", "Microsoft.")]


def conv(q, a, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    return {"messages": msgs + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def losses(out):
    recs = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in recs if "loss" in r]


def tiny_cfg(**training):
    cfg = parse_config(TINY + ["--lora-dropout", "0"])
    cfg["training"].update(training)
    return cfg


# ----- learning, outputs, overfit + generation ------------------------------------------------------------------
@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overfit")
    data = write_jsonl(tmp / "qa.jsonl", [conv(q, a) for q, a in QA])
    out = tmp / "out"
    rc = train.main(TINY + ["--data", data, "--eval-data", data, "--out", str(out), "--max-steps", "60",
                            "--batch-size", "4", "--lr", "1e-2", "--schedule", "cosine", "--warmup-steps", "3",
                            "--lora-dropout", "0",
                            "--save-every", "10", "--eval-every", "20", "--keep-last", "2",
                            "--export-peft", "--merge", "--eval-at-end"])
    assert rc == 0
    return out


def test_loss_halves_and_outputs_are_written(overfit_run):
    out = overfit_run
    steps = losses(out)
    assert [s for s, _, _ in steps] == list(range(1, 61))
    first, last = steps[0][1], steps[-1][1]
    assert last <= first / 2, (first, last)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["step"] == 0 and "eval_loss" in recs[0]  # eval before training
    evals = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 20, 40, 60] and evals[-1]["eval_loss"] < evals[0]["eval_loss"] / 2
    assert math.isclose(evals[-1]["eval_ppl"], math.exp(evals[-1]["eval_loss"]))
    for key in ("lr", "grad_norm", "tokens_per_s", "target_tokens"):
        assert key in recs[-1]
    assert (out / "loss.svg").read_text().startswith("<svg") and "polyline" in (out / "loss.svg").read_text()
    resolved = tomllib.loads((out / "config.toml").read_text())
    assert resolved["training"]["max_steps"] == 60 and resolved["lora"]["target_modules"] == TARGETS.split(",")
    assert parse_config(["--config", str(out / "config.toml")]) == \
        {"training": resolved["training"], "lora": resolved["lora"]}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000050", "step-0000060"]
    for name in ("adapter", "adapter-peft", "merged"):
        assert (out / name).is_dir() and any((out / name).iterdir()), name
    assert (out / "merged" / "config.json").exists()


def test_eval_at_end_compares_base_and_adapter_on_the_held_out_chats(overfit_run):
    """--eval-at-end: out/eval.json, base vs adapter on the eval chats. The run memorized its four replies: the
    adapter answers every one word for word, the base none, and its loss is far lower."""
    report = json.loads((overfit_run / "eval.json").read_text())
    assert report["n_examples"] == len(QA) and report["adapter_dir"] == str(overfit_run / "adapter")
    assert report["adapter"]["exact_match"] == 1.0 and report["adapter"]["token_f1"] == 1.0
    assert report["base"]["exact_match"] == 0.0
    assert report["adapter"]["loss"] < report["base"]["loss"] / 4


def test_run_folder_modes_follow_the_umask(overfit_run):
    # issue 13.9: adapter folders were 0700 and files 0600 (mkdtemp, safetensors); every folder and file of a run
    umask = os.umask(0)
    os.umask(umask)
    wrong = [f"{p.relative_to(overfit_run)}: {oct(p.stat().st_mode & 0o777)}" for p in overfit_run.rglob("*")
             if p.stat().st_mode & 0o777 != (0o777 if p.is_dir() else 0o666) & ~umask]
    assert not wrong, wrong


def test_overfit_then_greedy_generation_reproduces_replies(overfit_run):
    tok = Tokenizer.tiny()
    model = small_tiny()
    lora.load_adapter(model, overfit_run / "adapter")
    merged = Phi3.from_pretrained(overfit_run / "merged")
    for q, a in QA:
        prompt = tok.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True)
        want = tok.encode(a)
        for m in (model, merged):
            got = generate(m.eval(), prompt, max_new_tokens=len(want) + 5)
            assert got[-1] == END, (q, tok.decode(got))
            assert tok.decode(got[:-1]).strip() == a


def test_evaluations_write_samples_and_adapter_norms(overfit_run):
    samples = [json.loads(x) for x in (overfit_run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0] * 3 + [20] * 3 + [40] * 3 + [60] * 3  # 3 eval prompts per eval
    final = samples[-3:]
    assert [s["reference"] for s in final] == [a for _, a in QA[:3]]
    assert [s["reply"].strip() for s in final] == [s["reference"] for s in final]  # memorized, as above
    evals = [json.loads(x) for x in (overfit_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval_loss" in r]
    assert evals[0]["adapter_norms"]["total"] == 0  # B starts at zero
    assert evals[-1]["adapter_norms"]["total"] > 0 and evals[-1]["adapter_norms"]["lm_head"] > 0
    assert "layers.1.self_attn.qkv_proj" in evals[-1]["adapter_norms"]


# ----- resume -------------------------------------------------------------------------------------------------------
N = 8
RESUME_ARGS = ["--max-steps", str(N), "--batch-size", "2", "--grad-accum", "2", "--lr", "5e-3",
               "--lora-dropout", "0.1", "--save-every", "2", "--keep-last", "3"]


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    rows = [conv(q, a * (i + 1), system="Be brief." if i % 2 else None) for i, (q, a) in enumerate(QA)]
    rows.append(conv("Longest question of them all, with several words?", "A reply."))
    data = write_jsonl(tmp / "d.jsonl", rows)  # 5 examples, 3 micro-batches, 2 steps an epoch: epochs turn over
    out = tmp / "reference"
    assert train.main(TINY + RESUME_ARGS + ["--data", data, "--out", str(out)]) == 0
    return data, losses(out)


def count_micro_steps(monkeypatch, at: int, action):
    """Run `action` when micro-step number `at` (1-based) starts."""
    calls = {"n": 0}
    real = train.micro_step

    def wrapped(*args, **kw):
        calls["n"] += 1
        if calls["n"] == at:
            action()
        return real(*args, **kw)
    monkeypatch.setattr(train, "micro_step", wrapped)


def test_ctrl_c_then_resume_equals_uninterrupted(tmp_path, monkeypatch, resume_data, capsys):
    data, reference = resume_data
    assert len(reference) == N
    out = str(tmp_path / "out")
    # Ctrl-C during step 4 (micro-steps per step: 2, 1, 2, 1, ...; step 4 is the 6th): it finishes, is saved,
    # and the run exits with 130
    count_micro_steps(monkeypatch, 6, lambda: os.kill(os.getpid(), signal.SIGINT))
    assert train.main(TINY + RESUME_ARGS + ["--data", data, "--out", out]) == 130
    assert "continue with --resume" in capsys.readouterr().err
    assert losses(out) == reference[:4]
    assert (Path(out) / "checkpoints" / "step-0000004").is_dir()
    monkeypatch.undo()
    # a plain re-run refuses to mix with the old checkpoints; changing the data order on resume is refused
    assert train.main(TINY + RESUME_ARGS + ["--data", data, "--out", out]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert train.main(TINY + RESUME_ARGS + ["--data", data, "--out", out, "--resume", "--batch-size", "3"]) == 2
    assert "changed since: batch_size" in capsys.readouterr().err
    assert train.main(TINY + RESUME_ARGS + ["--data", data, "--out", out, "--resume"]) == 0
    assert losses(out) == reference  # identical losses and gradient norms, bit for bit


def test_sigterm_mid_step_saves_the_last_completed_step_and_resume_is_exact(tmp_path, monkeypatch, resume_data,
                                                                            capsys):
    """What a scheduler sends before it kills: the step in flight (step 4: micro-steps 6 and 7) is abandoned, step 3
    saved with its RNG and data position, exit 143; --resume then gives the uninterrupted run bit for bit."""
    data, reference = resume_data
    out = str(tmp_path / "out")
    count_micro_steps(monkeypatch, 6, lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert train.main(TINY + RESUME_ARGS + ["--data", data, "--out", out, "--save-every", "0"]) == 143
    err = capsys.readouterr().err
    assert "terminated (SIGTERM)" in err and "continue with --resume" in err and "Traceback" not in err, err
    assert losses(out) == reference[:3]
    assert [p.name for p in (Path(out) / "checkpoints").iterdir()] == ["step-0000003"]
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the loop
    assert train.main(TINY + RESUME_ARGS + ["--data", data, "--out", out, "--resume"]) == 0
    assert losses(out) == reference


def test_keyboard_interrupt_inside_a_step_saves_the_last_completed_step(tmp_path, monkeypatch, resume_data):
    data, reference = resume_data
    out = str(tmp_path / "out")

    def interrupt():
        raise KeyboardInterrupt
    count_micro_steps(monkeypatch, 5, interrupt)  # the second micro-step of step 3: step 3 is lost, 2 kept
    assert train.main(TINY + RESUME_ARGS + ["--data", data, "--out", out, "--save-every", "0"]) == 130
    assert [p.name for p in (Path(out) / "checkpoints").iterdir()] == ["step-0000002"]
    monkeypatch.undo()
    assert train.main(TINY + RESUME_ARGS + ["--data", data, "--out", out, "--resume"]) == 0
    assert losses(out) == reference


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, resume_data):
    data, reference = resume_data
    out = tmp_path / "out"
    real_save = torch.save

    def crashing_save(obj, f, *a, **kw):  # the adapter of step 6 is written, then the process "dies"
        if "step-0000006.tmp" in str(f):
            raise RuntimeError("simulated crash")
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.main(TINY + RESUME_ARGS + ["--data", data, "--out", str(out)])
    monkeypatch.undo()
    ckpts = out / "checkpoints"
    assert (ckpts / "step-0000006.tmp" / "adapter").is_dir()  # half written
    assert [s for s, _ in list_checkpoints(ckpts)] == [2, 4]
    # the previous checkpoint loads
    cfg = tiny_cfg()
    t, _ = typed(cfg)
    _, lc = typed(parse_config(TINY + RESUME_ARGS))
    model, _, params = build_model(t, lc, torch.device("cpu"), torch.float32)
    opt = torch.optim.AdamW(params)
    state = load_checkpoint(ckpts / "step-0000004", model, opt, "cpu")
    assert state["step"] == 4 and all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    # resume removes the partial folder and reproduces the uninterrupted run
    assert train.main(TINY + RESUME_ARGS + ["--data", data, "--out", str(out), "--resume"]) == 0
    assert not (ckpts / "step-0000006.tmp").exists()
    assert losses(out) == reference


# ----- bad inputs and NaN -------------------------------------------------------------------------------------------
def test_bad_data_is_a_clean_error(tmp_path, capsys):
    good = conv("q", "a")
    cases = {
        "malformed.jsonl": ([good, '{"messages": [}'], "malformed.jsonl:2: malformed JSON"),
        "role.jsonl": ([good, {"messages": [{"role": "bot", "content": "x"}]}],
                       "role.jsonl:2: message 0 has unknown role 'bot'"),
        "empty_content.jsonl": ([{"messages": [{"role": "user", "content": ""},
                                               {"role": "assistant", "content": "a"}]}],
                                "empty_content.jsonl:1: message 0 (user) has empty content"),
        "empty.jsonl": ([], "empty.jsonl: the dataset is empty"),
        "no_reply.jsonl": ([{"messages": [{"role": "user", "content": "q"}]}], "1 skipped (no assistant turn)"),
    }
    for name, (rows, message) in cases.items():
        data = write_jsonl(tmp_path / name, rows)
        assert train.main(TINY + ["--data", data, "--out", str(tmp_path / "o"), "--max-steps", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    # skipped lines are counted and reported when the rest is usable
    data = write_jsonl(tmp_path / "mixed.jsonl", [good, {"messages": [{"role": "user", "content": "q"}]}, good])
    assert train.main(TINY + ["--data", data, "--out", str(tmp_path / "m"), "--max-steps", "1"]) == 0
    assert "2 of 3 examples kept, 1 skipped (no assistant turn)" in capsys.readouterr().err


def test_bad_config_is_a_clean_error(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[training]\nlearning_rate = 1e-4\n')
    assert train.main(["--config", str(bad)]) == 2
    assert "unknown key 'learning_rate' in [training]" in capsys.readouterr().err
    bad.write_text('[training]\nbatch_size = "four"\n')
    assert train.main(["--config", str(bad)]) == 2
    assert "batch_size must be int" in capsys.readouterr().err
    assert train.main(TINY + ["--batch-size", "0"]) == 2
    assert "batch_size (--batch-size) must be > 0" in capsys.readouterr().err
    assert train.main(["--config", str(tmp_path)]) == 2  # a folder, not a file
    assert "cannot read the config file" in capsys.readouterr().err
    assert train.main(TINY + ["--device", "gpu", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error: --device gpu: not a device" in err and "Traceback" not in err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys, resume_data):
    data, reference = resume_data
    out = tmp_path / "out"
    real_forward = Phi3.forward
    calls = {"n": 0}

    def nan_forward(self, *args, **kw):
        loss = real_forward(self, *args, **kw)
        if kw.get("labels") is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 7:  # first micro-step of step 5
                return loss * float("nan")
        return loss
    monkeypatch.setattr(Phi3, "forward", nan_forward)
    assert train.main(TINY + RESUME_ARGS + ["--data", data, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: loss nan at step 5" in err and "step-0000004" in err and "Traceback" not in err
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2, 4]
    assert losses(out) == reference[:4]
    assert train.main(TINY + RESUME_ARGS + ["--data", data, "--out", str(out), "--resume"]) == 0
    assert losses(out) == reference


# ----- gradients ----------------------------------------------------------------------------------------------------
def lora_model_with_random_b(**training):
    cfg = tiny_cfg(**training)
    torch.manual_seed(0)
    model, _, params = build_model(*typed(cfg), torch.device("cpu"), torch.float32)
    tok = Tokenizer.tiny()
    with torch.no_grad():  # B starts at zero (then A gets no gradient): make both matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model, tok, params


def grads(params):
    g = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    return g


def test_batch_8_equals_8_micro_batches_of_1():
    model, tok, params = lora_model_with_random_b()
    enc = ChatEncoder(tok, 512)
    examples = [enc.encode(conv("q" * (3 * i + 1), "answer " * (i + 1))["messages"])[0] for i in range(8)]
    assert len({len(e) for e in examples}) == 8
    amp = autocast(torch.device("cpu"), torch.float32)
    whole = collate(examples, [[i] for i in range(8)], tok.pad_id)
    n = whole.n_target
    train.micro_step(model, whole, n, amp)
    g_big = grads(params)
    for i in range(8):
        train.micro_step(model, collate(examples, [[i]], tok.pad_id), n, amp)
    g_acc = grads(params)
    for a, b in zip(g_big, g_acc):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # the test can fail: averaging per-micro-batch means weights the tokens differently
    for i in range(8):
        one = collate(examples, [[i]], tok.pad_id)
        train.micro_step(model, one, one.n_target * 8, amp)
    g_naive = grads(params)
    assert max((a - b).abs().max().item() for a, b in zip(g_big, g_naive)) > 1e-4


def test_activation_checkpointing_gives_every_lora_b_a_gradient():
    cfg = tiny_cfg(grad_checkpointing=True)
    torch.manual_seed(0)
    model, _, params = build_model(*typed(cfg), torch.device("cpu"), torch.float32)
    tok = Tokenizer.tiny()
    assert model.gradient_checkpointing
    batch = collate([ChatEncoder(tok, 512).encode(conv("What is LoRA?", "A low-rank update.")["messages"])[0]],
                    [[0]], tok.pad_id)
    train.micro_step(model, batch, batch.n_target, autocast(torch.device("cpu"), torch.float32))
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    b_names = [n for n in named if "lora_B" in n]
    assert len(b_names) >= 9  # 4 projections x 2 layers + lm_head
    for n in b_names:
        assert named[n].grad is not None and named[n].grad.abs().sum() > 0, n
    with_ckpt = {n: p.grad.clone() for n, p in named.items()}
    for p in named.values():
        p.grad = None
    model.gradient_checkpointing = False
    train.micro_step(model, batch, batch.n_target, autocast(torch.device("cpu"), torch.float32))
    for n, p in named.items():
        torch.testing.assert_close(with_ckpt[n], p.grad, atol=1e-6, rtol=1e-5)


# ----- configuration and schedule -----------------------------------------------------------------------------------
def test_config_precedence_and_files(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[training]\nlr = 1\nbatch_size = 3\npacking = false\n[lora]\nr = 4\n')
    cfg = parse_config(["--config", str(f), "--batch-size", "5", "--lora-alpha", "7", "--packing",
                              "--lora-enable-lora", "true,false,true"])
    t, lc = cfg["training"], cfg["lora"]
    assert (t["lr"], t["batch_size"], t["packing"], lc["r"], lc["lora_alpha"]) == (1.0, 5, True, 4, 7)
    assert lc["enable_lora"] == [True, False, True] and t["grad_accum"] == defaults()["training"]["grad_accum"]
    cfg = parse_config(["--config", str(ROOT / "configs" / "phi3-mini-lora.toml")])
    assert cfg == parse_config(["--eval-fraction", "0.05", "--out", "out/phi3-mini-lora", "--log-every", "20"])
    assert parse_config(["--config", str(ROOT / "configs" / "tiny.toml")])["training"]["model"] == "tiny"


def test_tiny_preset_steps_follow_the_data_size():
    """--model tiny counts its run in epochs with a floor of steps: the 6-chat demo (one batch of 24 an epoch) keeps
    its 100 steps, 200 chats (9 batches) their 16 epochs (144 steps), 2000 chats their 16 epochs (1344 steps), not
    100 steps; epochs given by the user are not floored by the preset."""
    def steps(n_examples, *flags):
        t, _ = typed(parse_config(["--model", "tiny", *flags]))
        return total_and_warmup(t, EpochPlans(list(range(n_examples)), t))
    assert steps(6) == (100, 10)
    assert steps(200) == (144, 15) and steps(2000) == (1344, 135)
    # epochs given as a flag are what the user asked for: the preset's floor does not raise them
    assert steps(200, "--epochs", "20") == (180, 18) and steps(6, "--epochs", "20") == (20, 2)
    assert steps(6, "--epochs", "20", "--min-steps", "100") == (100, 10)  # a floor given at the same level holds
    assert steps(200, "--max-steps", "50") == (50, 5)
    assert steps(200, "--min-steps", "0", "--epochs", "1") == (9, 1)
    assert steps(200, "--min-steps", "0", "--epochs", "1", "--batch-size", "6") == (34, 4)


def test_lr_schedule():
    lr = [lr_at(s, 100, 20, 1e-3, 1e-5, "cosine") for s in range(100)]
    assert lr[0] == pytest.approx(1e-3 / 20) and lr[19] == pytest.approx(1e-3) and lr[20] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lr[20:], lr[21:])) and 1e-5 < lr[-1] < 2e-5
    lin = [lr_at(s, 10, 0, 1.0, 0.0, "linear") for s in range(10)]
    assert lin == pytest.approx([1 - s / 10 for s in range(10)])
    assert lr_at(50, 100, 10, 0.5, 0.0, "constant") == 0.5


# ----- review: output folder, --overwrite, kernels, setup interrupt, resume hyperparameters -------------------------
def qa_data(tmp_path):
    return write_jsonl(tmp_path / "qa.jsonl", [conv(q, a) for q, a in QA])


def test_out_that_is_a_file_or_cannot_be_made_is_a_clean_error(tmp_path, capsys):
    data = qa_data(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, message in ((afile, "is a file"), (afile / "sub", "cannot create")):
        assert train.main(TINY + ["--data", data, "--out", str(out), "--max-steps", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --out") and message in err and "Traceback" not in err, err


def test_overwrite_keeps_the_old_checkpoints_until_the_new_run_can_start(tmp_path, capsys):
    data, out = qa_data(tmp_path), str(tmp_path / "out")
    assert train.main(TINY + ["--data", data, "--out", out, "--max-steps", "1"]) == 0
    # a typo in --data: the run stops before anything of the old run is deleted
    assert train.main(TINY + ["--data", data + "x", "--out", out, "--max-steps", "1", "--overwrite"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert [s for s, _ in list_checkpoints(Path(out) / "checkpoints")] == [1]
    assert train.main(TINY + ["--data", data, "--out", out, "--max-steps", "2", "--save-every", "0",
                              "--overwrite"]) == 0
    assert [s for s, _ in list_checkpoints(Path(out) / "checkpoints")] == [2]


def test_fused_cross_entropy_is_off_when_lm_head_has_lora():
    """The fused loss reads lm_head.weight alone: with LoRA on lm_head its adapter would get no gradient."""
    for targets, fused in ((TARGETS, False), ("qkv_proj,o_proj", True)):
        cfg = parse_config(TINY + ["--kernels", "on", "--lora-target-modules", targets])
        model, _, _ = build_model(*typed(cfg), torch.device("cpu"), torch.float32)
        assert model.use_kernel is fused, targets


def test_grad_accum_beyond_an_epoch_says_so(tmp_path, capsys):
    data = qa_data(tmp_path)  # 4 examples, batch 1: 4 micro-batches an epoch
    assert train.main(TINY + ["--data", data, "--out", str(tmp_path / "o"), "--batch-size", "1",
                              "--grad-accum", "8", "--max-steps", "2"]) == 0
    assert "--grad-accum 8 is more than the 4 micro-batches of an epoch" in capsys.readouterr().err


def test_ctrl_c_during_setup_exits_cleanly(tmp_path, monkeypatch, capsys):
    def interrupted(name):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "load_tokenizer", interrupted)
    assert train.main(TINY + ["--data", qa_data(tmp_path), "--out", str(tmp_path / "o")]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_resume_uses_the_configured_optimizer_hyperparameters(tmp_path, monkeypatch):
    data, out = qa_data(tmp_path), str(tmp_path / "out")
    assert train.main(TINY + ["--data", data, "--out", out, "--max-steps", "1"]) == 0
    seen = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **kw):
        seen.append({k: self.param_groups[0][k] for k in ("weight_decay", "eps", "betas")})
        return real_step(self, *a, **kw)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    assert train.main(TINY + ["--data", data, "--out", out, "--max-steps", "2", "--resume", "--weight-decay", "0.5",
                              "--adam-eps", "1e-6", "--adam-beta2", "0.95"]) == 0
    assert seen == [{"weight_decay": 0.5, "eps": 1e-6, "betas": (0.9, 0.95)}]
