"""What train, chat and probe share: the same --device/--dtype vocabulary (phi3mini.hub), one resolver from a model
name to a folder (phi3mini.download.find_folder), and one way to print (phi3lora.console)."""
import io
import re

import pytest
import torch

from phi3lora import console
from phi3lora.cli import chat, probe, train
from phi3lora.phi3mini import download, hub
from phi3lora.training import metrics
from phi3lora.training.config import parse_config


def help_text(main, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "300")  # argparse wraps at the terminal width: one option per line
    try:
        main(["--help"])
    except SystemExit:
        pass
    return capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--device", "--dtype"])
def test_the_three_programs_offer_the_same_device_and_dtype_choices(flag, capsys, monkeypatch):
    shown = {}
    for name, main in (("train", train.main), ("chat", chat.main), ("probe", probe.main)):
        text = help_text(main, capsys, monkeypatch)
        found = re.search(rf"^\s+{flag} (\{{[^}}]*\}})", text, re.M)
        assert found, f"{name} --help has no {flag} {{...}} line:\n{text}"
        shown[name] = found.group(1)
    assert len(set(shown.values())) == 1, shown
    assert shown["chat"] == ("{auto,cpu,cuda,cuda:N}" if flag == "--device" else "{auto,float32,bfloat16,float16}")


def test_the_three_programs_read_dtype_and_device_alike(tmp_path, capsys):
    # the older spellings still work, as the one name; a wrong one is argparse's usage error (exit 2) everywhere
    assert parse_config(["--model", "tiny", "--dtype", "bf16"])["training"]["dtype"] == "bfloat16"
    assert chat.parse_args(["--model", "tiny", "--dtype", "bf16"]).dtype == "bfloat16"
    assert probe.parse_args(["--model", "tiny", "--prompt", "x", "--out", "o", "--dtype", "fp32"]).dtype == "float32"
    with pytest.raises(SystemExit) as e:
        probe.parse_args(["--model", "tiny", "--prompt", "x", "--out", "o", "--dtype", "int8"])
    assert e.value.code == 2
    assert chat.main(["--model", "tiny", "--dtype", "int8", "--prompt", "hi"], stdin=io.StringIO(),
                     stdout=io.StringIO(), stderr=io.StringIO()) == 2
    # a device that is none: the same one-line error from each
    err = io.StringIO()
    assert chat.main(["--model", "tiny", "--device", "gpu", "--prompt", "hi"], stdin=io.StringIO(),
                     stdout=io.StringIO(), stderr=err) == 2
    assert err.getvalue() == "error: --device gpu: not a device (auto, cpu, cuda or cuda:N)\n"
    capsys.readouterr()
    assert probe.main(["--model", "tiny", "--device", "gpu", "--prompt", "x", "--out", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err == "error: --device gpu: not a device (auto, cpu, cuda or cuda:N)\n"
    assert train.main(["--model", "tiny", "--device", "gpu", "--out", str(tmp_path / "t")]) == 2
    assert "error: --device gpu: not a device (auto, cpu, cuda or cuda:N)\n" in capsys.readouterr().err


def test_auto_resolves_alike_and_training_refuses_float16(tmp_path, capsys):
    device, dtype = hub.resolve("auto", "auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert dtype == (torch.bfloat16 if device.type == "cuda" else torch.float32)
    assert hub.resolve("cpu", "fp16") == (torch.device("cpu"), torch.float16)
    assert train.main(["--model", "tiny", "--device", "cpu", "--dtype", "float16", "--out", str(tmp_path)]) == 2
    assert "error: --dtype float16: training in float16 needs loss scaling" in capsys.readouterr().err


# ----- one resolver from a name to a folder -------------------------------------------------------------------------
@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything asks the Hub."""
    def refuse(name):
        raise AssertionError(f"asked the Hub for {name!r}")
    monkeypatch.setattr(download, "_download", refuse)


@pytest.mark.parametrize("name", ["./nowhere/ckpt", "../nowhere", "/nowhere/ckpt", "~/nowhere-x1/ckpt", "owner/",
                                  "nowhere/ckpt/", "a/b/c", "my models/ckpt"])
def test_a_missing_local_path_is_no_such_folder_not_a_hub_lookup(name, no_hub):
    assert not download.looks_like_hub_id(name)
    with pytest.raises(hub.LoadError) as e:
        hub.load(name, "cpu", "auto")
    assert str(e.value) == f"--model {name}: no such checkpoint folder: {name}"


def test_every_loader_resolves_through_find_folder(tmp_path, no_hub, monkeypatch):
    from phi3lora.phi3mini import CheckpointError, Phi3, Tokenizer, TokenizerError
    missing = str(tmp_path / "nowhere")
    for load, error in ((Phi3.from_pretrained, CheckpointError), (Tokenizer.from_pretrained, TokenizerError),
                        (hub.load_model, CheckpointError), (hub.load_tokenizer, TokenizerError)):
        with pytest.raises(error, match=re.escape(f"no such checkpoint folder: {missing}")):
            load(missing)
    asked = []
    monkeypatch.setattr(download, "_download", lambda name: asked.append(name) or tmp_path)
    for load in (Phi3.from_pretrained, Tokenizer.from_pretrained):
        with pytest.raises((CheckpointError, TokenizerError)):  # tmp_path holds no checkpoint: but it was asked
            load("owner/name")
    assert asked == ["owner/name", "owner/name"]


def test_chat_says_no_such_folder(tmp_path):
    err = io.StringIO()
    missing = str(tmp_path / "missing")
    assert chat.main(["--model", missing, "--prompt", "hi"], stdin=io.StringIO(), stdout=io.StringIO(),
                     stderr=err) == 2
    assert err.getvalue() == f"error: --model {missing}: no such checkpoint folder: {missing}\n"


# ----- one way to print ---------------------------------------------------------------------------------------------
class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def terminal(monkeypatch):
    """Call it in the test (pytest sets sys.stderr again between a fixture and the test): stderr is then a
    terminal whose text the test reads."""
    def attach():
        screen = Terminal()
        monkeypatch.setattr("sys.stderr", screen)
        return screen
    yield attach
    console.set_quiet(False)


def test_the_progress_line_is_ended_before_a_warning(terminal):
    terminal = terminal()
    console.progress("step 1/3")
    console.progress("step 2/3")
    console.warn("something odd")
    console.progress("step 3/3", last=True)
    console.info("done")
    assert terminal.getvalue() == ("\r\x1b[Kstep 1/3\r\x1b[Kstep 2/3\nwarning: something odd\n"
                                   "\r\x1b[Kstep 3/3\ndone\n")


def test_report_progress_goes_through_the_console(terminal):
    terminal = terminal()
    rec = {"loss": 1.0, "lr": 1e-4, "tokens_per_s": 10.0, "mem_gb": 0.1}
    progress = metrics.Progress(total=2, every=10)
    progress.update(1, rec, 1)
    console.error("it broke")
    text = terminal.getvalue()
    assert text.startswith("\r\x1b[Kstep 1/2 [##########----------]  50% | loss 1.0000 | lr 1.00e-04 | "), text
    assert " steps/s | 10 tok/s | mem 0.10 GB | eta " in text, text
    assert text.endswith("s\nerror: it broke\n") and text.count("\n") == 2, text


def test_quiet_ranks_print_only_errors(terminal):
    terminal = terminal()
    console.set_quiet(True)
    console.info("a note")
    console.warn("a warning")
    console.progress("step 1/1", last=True)
    console.error("a failure")
    assert terminal.getvalue() == "error: a failure\n"


def test_off_a_terminal_each_progress_line_is_a_line():
    log = io.StringIO()
    console.progress("step 1/2", file=log)
    console.warn("w", file=log)
    console.progress("step 2/2", last=True, file=log)
    assert log.getvalue() == "step 1/2\nwarning: w\nstep 2/2\n"


# ----- warnings, bars, rates ----------------------------------------------------------------------------------------
def test_a_python_warning_ends_the_progress_line(terminal, monkeypatch):
    """A warning raised mid-training (torch's, a library's) prints after a newline, not on the step line; the
    hook is Python's own again once no line is open."""
    import sys
    import warnings
    terminal = terminal()

    def python_like(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, ""))

    monkeypatch.setattr(warnings, "showwarning", python_like)  # pytest records warnings; print them, as Python does
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        console.progress("step 1/2")
        warnings.warn("something odd", UserWarning)
        console.progress("step 2/2", last=True)
    text = terminal.getvalue()
    assert text.startswith("\r\x1b[Kstep 1/2\n") and "UserWarning: something odd\n" in text, text
    assert text.endswith("\r\x1b[Kstep 2/2\n") and warnings.showwarning is python_like


def test_the_training_line_has_a_bar_rate_and_eta(terminal):
    terminal = terminal()
    now = [0.0]
    progress = metrics.Progress(total=4, every=10, clock=lambda: now[0])
    rec = {"loss": 1.0, "lr": 1e-4, "tokens_per_s": 10.0, "mem_gb": 0.1}
    now[0] = 1.0
    progress.update(2, rec, 2)  # 2 steps in 1 s: 2 steps left take 1 s
    assert terminal.getvalue() == ("\r\x1b[Kstep 2/4 [##########----------]  50% | loss 1.0000 | lr 1.00e-04 | "
                                   "2.00 steps/s | 10 tok/s | mem 0.10 GB | eta 1s")
    assert console.duration(3725) == "1:02:05" and console.duration(125) == "2:05" and console.duration(-1) == "?"


def test_a_meter_is_silent_on_short_work_then_counts_with_rate_and_eta():
    log = io.StringIO()  # not a terminal: one line every `every` seconds
    now = [0.0]
    meter = console.Meter("tokenizing d.jsonl", total=1000, unit="examples", after=2.0, every=5.0, file=log,
                          clock=lambda: now[0])
    for t, done in ((1.0, 100), (2.0, 200), (4.0, 400), (7.5, 750)):
        now[0] = t
        meter.update(done)
    meter.close()
    assert log.getvalue().splitlines() == [
        "tokenizing d.jsonl 200/1,000 examples [####----------------]  20% | 100 examples/s | eta 8s",
        "tokenizing d.jsonl 750/1,000 examples [###############-----]  75% | 100 examples/s | eta 2s",
        "tokenizing d.jsonl 750/1,000 examples [###############-----]  75% | 100 examples/s | eta 2s | 8s in all"]
    quiet = io.StringIO()
    short = console.Meter("x", file=quiet, after=2.0, clock=lambda: 0.0)
    short.update(5)
    short.close()
    assert quiet.getvalue() == ""


def test_tokenizing_a_large_set_shows_a_progress_line(tmp_path, monkeypatch, capsys):
    import functools
    import json

    from phi3lora.data import load_data, store
    from phi3lora.phi3mini import Tokenizer

    ticks = iter(range(0, 10_000, 3))  # every look at the clock 3 s later: the work "takes" over 2 s
    monkeypatch.setattr(store.console, "Meter", functools.partial(console.Meter, clock=lambda: next(ticks)))
    chat = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"messages": chat}) + "\n" for _ in range(20)))
    load_data(str(tmp_path / "d.jsonl"), Tokenizer.tiny(), 64, cache="off")
    err = capsys.readouterr().err
    assert re.search(r"tokenizing .*d\.jsonl 20 examples \| [\d.]+ examples/s \| 20 kept, [\d,]+ tokens", err), err


# ----- help and advice --------------------------------------------------------------------------------------------
def test_train_help_names_every_data_form_it_reads(capsys, monkeypatch):
    from phi3lora.data.files import DATA_SUFFIXES
    text = help_text(train.main, capsys, monkeypatch)
    assert "(JSONL)" not in text
    head = text.split("options:")[0]
    assert all(w in head for w in ("JSON lines", "Parquet", "Arrow", "CSV", "folders", "globs", "Hub", "commas"))
    data_help = re.search(r"^\s+--data STR\s+(.*?)^\s+--eval-data", text, re.M | re.S).group(1)
    assert all(s in data_help for s in DATA_SUFFIXES), data_help
    assert all(w in data_help for w in ("folders", "globs", "Hub dataset", "commas")), data_help


@pytest.mark.parametrize("main", [train.main, chat.main])
def test_quantize_offers_none_or_nf4(main, capsys, monkeypatch):
    assert re.search(r"^\s+--quantize \{none,nf4\}$", help_text(main, capsys, monkeypatch), re.M)


def test_quantize_none_and_the_older_empty_spelling_mean_the_same(tmp_path):
    assert parse_config(["--quantize", "none"])["training"]["quantize"] == "none"
    assert parse_config(["--quantize", ""])["training"]["quantize"] == "none"
    assert parse_config([])["training"]["quantize"] == "none"
    cfg = tmp_path / "c.toml"
    cfg.write_text('[training]\nquantize = ""\n')
    assert parse_config(["--config", str(cfg)])["training"]["quantize"] == "none"
    assert chat.parse_args(["--quantize", ""]).quantize == chat.parse_args([]).quantize == "none"
    from phi3lora.phi3mini.quant import is_quantized
    assert not is_quantized(hub.load_model("tiny", quantize="none"))
    from phi3lora.training.config import as_spelled_now  # a checkpoint written with quantize "" still resumes
    assert as_spelled_now({"quantize": "", "dtype": "bf16", "lr": 1.0}) == {"quantize": "none", "dtype": "bfloat16",
                                                                            "lr": 1.0}


def test_offline_advice_names_today_s_hub_command_and_is_whole(monkeypatch):
    cause = ("Cannot find an appropriate cached snapshot folder for the specified revision on the local disk and "
             "outgoing traffic has been disabled. To enable repo look-ups and downloads online, set "
             "'HF_HUB_OFFLINE=0' as environment variable.")

    def offline(name):
        raise OSError(cause)

    monkeypatch.setattr(download, "_download", offline)
    with pytest.raises(hub.LoadError) as e:
        hub.load("owner/name", "cpu", "auto")
    text = str(e.value)
    assert "`hf download owner/name --local-dir DIR`" in text and "huggingface-cli" not in text
    assert "set 'HF_HUB_OFFLINE=0' as environment variable)" in text, text  # the cause's hint, whole
    assert text.endswith("or --model tiny for the built-in demo model.")
    long = "x" * 500 + ". More."
    assert download.first_sentences(OSError("A first one. " + long)) == "A first one. ..."
