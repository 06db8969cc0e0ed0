"""The command line and config files of train.py: which of flag, file, preset and default wins, which of two
conflicting settings governs and that the program says so, --resume RUN with the run's own settings, and mistakes
in flags and TOML keys explained."""
import json
from pathlib import Path

import pytest

from phi3lora.cli import chat, probe, train
from phi3lora.training.config import parse_config, resolve_config
from helpers import small_tiny_args

ROOT = Path(__file__).resolve().parents[1]
TINY = small_tiny_args() + ["--device", "cpu", "--dtype", "fp32", "--no-grad-checkpointing", "--no-packing",
                            "--lora-target-modules", "qkv_proj,lm_head", "--lora-r", "4", "--lora-alpha", "8",
                            "--lora-dropout", "0", "--log-every", "1000", "--batch-size", "2", "--eval-every", "0"]


def write_data(tmp_path) -> str:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in (("What is LoRA?", "Low-rank adaptation."), ("Capital of France?", "Paris."), ("2 + 2?", "4."))]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def steps(out) -> list[int]:
    return [json.loads(x)["step"] for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


# ----- precedence: flag > config file > tiny preset > default, and which of two settings governs ------------------
def test_an_explicit_epochs_flag_wins_over_a_max_steps_from_below(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[training]\nmodel = \"tiny\"\nmax_steps = 100\n")
    notes = []
    t = parse_config(["--config", str(f), "--epochs", "3"], notes)["training"]
    assert (t["epochs"], t["max_steps"]) == (3, 0)  # 0: the epochs govern
    assert f"--epochs 3 (flags) governs, not --max-steps 100 ({f})" in "\n".join(notes), notes
    assert "--max-steps 100" not in notes[0]  # the summary shows what is used, not what was set aside
    # the tiny preset counts in epochs with a floor of 100 steps: a flag's epochs replace the preset's, and the
    # preset's floor does not hold them down
    notes = []
    t = parse_config(["--model", "tiny", "--epochs", "3"], notes)["training"]
    assert (t["epochs"], t["max_steps"], t["min_steps"]) == (3, 0, 0)
    assert "--epochs 3 (flags) governs, not --min-steps 100 (the tiny preset)" in "\n".join(notes), notes
    assert parse_config(["--model", "tiny"])["training"]["min_steps"] == 100  # the preset's own epochs: floored
    assert parse_config(["--model", "tiny", "--epochs", "3", "--min-steps", "50"])["training"]["min_steps"] == 50
    # the same from a config file: the file's epochs are above the preset's
    r = resolve_config(["--config", str(ROOT / "configs" / "tiny.toml"), "--epochs", "2"])
    assert (r.cfg["training"]["epochs"], r.cfg["training"]["max_steps"]) == (2, 0)


def test_max_steps_governs_at_the_same_level_and_from_above(tmp_path):
    notes = []
    t = parse_config(["--model", "tiny", "--max-steps", "5", "--epochs", "2"], notes)["training"]
    assert (t["epochs"], t["max_steps"]) == (2, 5)
    assert "--max-steps 5 (flags) governs, not --epochs 2: both given there" in "\n".join(notes), notes
    f = tmp_path / "c.toml"
    f.write_text("[training]\nepochs = 4\n")
    notes = []
    t = parse_config(["--config", str(f), "--max-steps", "7"], notes)["training"]
    assert (t["epochs"], t["max_steps"]) == (4, 7)
    assert f"--max-steps 7 (flags) governs, not --epochs 4 ({f})" in "\n".join(notes), notes
    # the same rule for warmup_steps over warmup_ratio
    notes = []
    t = parse_config(["--model", "tiny", "--warmup-ratio", "0.3"], notes)["training"]
    assert t["warmup_ratio"] == 0.3 and t["warmup_steps"] == 0 and not any("governs" in n for n in notes)


def test_the_summary_says_where_each_setting_came_from():
    notes, demo = [], str(ROOT / "configs" / "tiny.toml")
    parse_config(["--config", demo, "--lr", "0.01"], notes)
    summary = notes[0].splitlines()
    assert summary[0] == f"settings (flags > {demo} > the tiny preset > defaults):", summary
    flags, file, preset = summary[1:]
    assert flags.split() == ["flags", "--lr", "0.01"]
    assert file.split()[0] == demo and "--model tiny" in file and "--out out/tiny" in file
    assert preset.startswith("  the tiny preset") and "--epochs 16" in preset and "--min-steps 100" in preset
    assert "--no-packing" in preset
    assert "--lr" not in preset  # the flag's lr is the one used
    r = resolve_config(["--config", str(ROOT / "configs" / "tiny.toml"), "--lr", "0.01"])
    assert r.origin["training", "lr"] == "flag" and r.origin["training", "out"] == "file"
    assert r.origin["training", "min_steps"] == "preset" and r.level("training", "adam_eps") == "default"


# ----- --resume RUN ------------------------------------------------------------------------------------------------
@pytest.fixture
def two_steps(tmp_path):
    out = tmp_path / "run"
    assert train.main(TINY + ["--data", write_data(tmp_path), "--out", str(out), "--max-steps", "2",
                              "--save-every", "1"]) == 0
    return out


def test_resume_a_folder_continues_with_the_runs_own_settings(two_steps, capsys):
    capsys.readouterr()
    # no model, data or LoRA flags: they come from run/config.toml, not from the Phi-3-mini defaults
    assert train.main(["--resume", str(two_steps), "--max-steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "--resume: --max-steps 3 (flags) in place of the run's --max-steps 2" in err, err
    assert f"resumed from {two_steps / 'checkpoints' / 'step-0000002'} at step 2" in err, err
    assert steps(two_steps) == [1, 2, 3]


def test_resume_refuses_a_flag_that_changes_what_was_trained(two_steps, tmp_path, capsys):
    capsys.readouterr()
    for flag, value in (("--lora-r", "8"), ("--data", str(tmp_path / "other.jsonl")), ("--seed", "1")):
        assert train.main(["--resume", str(two_steps), flag, value]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --resume {two_steps}: cannot change what the run trained ({flag} {value} "
                              "(flags): the run has"), err
    assert steps(two_steps) == [1, 2]


def test_resume_folder_mistakes_are_clean_errors(two_steps, tmp_path, capsys):
    capsys.readouterr()
    assert train.main(["--resume", str(tmp_path / "nothing")]) == 2
    assert "no run to continue in" in capsys.readouterr().err
    assert train.main(["--resume", str(two_steps), "--out", str(tmp_path / "elsewhere")]) == 2
    assert "name two folders" in capsys.readouterr().err


# ----- mistakes on the command line and in the TOML file explained -------------------------------------------------
def test_abbreviated_and_unknown_flags_are_refused_with_a_suggestion(capsys):
    for argv, hint in ((["--ep", "3"], "(did you mean --epochs?)"), (["--epoch", "3"], "(did you mean --epochs?)"),
                       (["--max-step", "3"], "--max-steps?"), (["--lora-rank", "4"], "(did you mean --lora-r?)"),
                       (["--no-pakcing"], "--no-packing?")):
        with pytest.raises(SystemExit) as e:
            parse_config(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"error: unknown flag {argv[0]}" in err and hint in err, (argv, err)
    for parse, argv in ((chat.parse_args, ["--prom", "hi"]), (probe.parse_args, ["--prompt", "x", "--ou", "o",
                                                                                "--model", "tiny"])):
        with pytest.raises(SystemExit):
            parse(argv)
        assert "did you mean --" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("lr = 0.01\n[training]\nepochs = 1\n", "key 'lr' is at the top of {f}, outside any section: put it under "
     "[training]"),
    ("r = 4\n", "key 'r' is at the top of {f}, outside any section: put it under [lora]"),
    ("[training]\nmax_step = 5\n", "{f}: unknown key 'max_step' in [training]; did you mean max_steps?"),
    ("[lora]\nalpha = 8\n", "{f}: unknown key 'alpha' in [lora]; did you mean lora_alpha?"),
    ("[training]\nr = 8\n", "{f}: key 'r' is in [training], but it belongs under [lora]"),
    ("[trainig]\nlr = 1\n", "{f}: unknown section [trainig] (expected [training] and [lora]); did you mean "
     "[training]?"),
])
def test_toml_mistakes_are_explained(tmp_path, capsys, text, message):
    f = tmp_path / "c.toml"
    f.write_text(text)
    assert train.main(["--config", str(f)]) == 2
    assert capsys.readouterr().err == f"error: {message.format(f=f)}\n"
