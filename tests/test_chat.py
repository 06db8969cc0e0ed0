"""chat.py on the built-in tiny model: one-shot and scripted sessions run in-process through `chat.main`, plus real
subprocess runs. Where a test needs replies of a known shape (special tokens, interrupts, truncation) it swaps
`chat.generate` for a fake that streams chosen token ids; everything else goes through the real model."""
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

from phi3lora.cli import chat  # noqa: E402
from phi3lora import lora  # noqa: E402
from phi3lora.phi3mini import Tokenizer  # noqa: E402
from helpers import small_tiny, small_tiny_dir, training_ids  # noqa: E402

# What `--model tiny` means to chat.py (replies of up to 64 tokens by default), at the small size (tests/helpers.py).
# The real processes and the demo below run the tiny model by its name, at the demo's size.
TINY = ["--model", small_tiny_dir(), "--max-new-tokens", "64"]
MARKERS = ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.tiny()


def run(argv, stdin_text="", stdin=None):
    """chat.main in-process -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = chat.main(argv, stdin=stdin if stdin is not None else io.StringIO(stdin_text), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def prompts(monkeypatch):
    """Record the prompt ids of every generate call (the real generate still runs)."""
    seen = []
    real = chat.generate

    def recording(model, input_ids, *a, **kw):
        seen.append(list(input_ids))
        return real(model, input_ids, *a, **kw)

    monkeypatch.setattr(chat, "generate", recording)
    return seen


def fake_generate(monkeypatch, replies, seen=None):
    """Replace generate: the n-th call streams the token ids replies[n] (a list of ids, or a callable)."""
    calls = iter(replies)

    def fake(model, input_ids, max_new_tokens, on_token=None, **kw):
        if seen is not None:
            seen.append(list(input_ids))
        ids = next(calls)
        for t in ids:
            on_token(t)
        return list(ids)

    monkeypatch.setattr(chat, "generate", fake)


def make_adapter(path, seed=0, **model_overrides):
    """An adapter for the small tiny model (or a differently shaped one) with random, non-zero lora_B."""
    model = small_tiny(seed=0, **model_overrides)
    config = lora.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    lora.inject(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    lora.save_adapter(model, path, config)
    return path


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("adapter") / "adapter")


# ----- one-shot ---------------------------------------------------------------------------------------------------
def test_one_shot_prints_one_reply(prompts, tok):
    code, out, err = run([*TINY, "--prompt", "hello there", "--max-new-tokens", "12"])
    assert code == 0, err
    assert out.endswith("\n") and out.count("\n") == 1 and out.strip()
    assert not any(m in out for m in MARKERS)
    assert prompts == [tok.encode_chat([{"role": "user", "content": "hello there"}], add_generation_prompt=True)]


def test_reply_never_shows_chat_markers(monkeypatch, tok):
    # special tokens as ids, and the same markers spelled out in plain-text pieces across token boundaries
    spelled = tok.encode("x <|user|> y <|assistant|>", add_special_tokens=False) if "add_special_tokens" in \
        Tokenizer.encode.__code__.co_varnames else tok.encode("x <|user|> y <|assistant|>")
    ids = tok.encode("Hi") + [32001, 32010] + tok.encode(" there <|en") + tok.encode("d|> friend") + spelled + [32007]
    fake_generate(monkeypatch, [ids])
    code, out, err = run([*TINY, "--prompt", "hello"])
    assert code == 0, err
    assert not any(m in out for m in MARKERS), out
    assert "Hi" in out and "friend" in out


def test_stats_on_stderr():
    code, out, err = run([*TINY, "--prompt", "hi", "--max-new-tokens", "5", "--stats"])
    assert code == 0
    assert "time to first token" in err and "tokens/s" in err
    assert "tokens/s" not in out


# ----- sessions through standard input ------------------------------------------------------------------------------
def test_scripted_session_keeps_history(prompts, tok):
    script = "/system You are terse.\nhello\nhow are you?\n/reset\nagain\n/exit\nnever answered\n"
    code, out, err = run([*TINY, "--max-new-tokens", "6"], script)
    assert code == 0, err
    lines = out.splitlines()
    assert len(prompts) == 3
    assert not out.startswith(">") and "chatting with" not in out  # no prompt decoration on a pipe
    sys_msg = {"role": "system", "content": "You are terse."}
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    assert prompts[0] == tok.encode_chat([sys_msg, user("hello")], add_generation_prompt=True)
    # the second turn's prompt holds the first turn and the reply that was printed for it
    reply1 = out.split("\n")[0]
    assert prompts[1] == tok.encode_chat(
        [sys_msg, user("hello"), {"role": "assistant", "content": reply1}, user("how are you?")],
        add_generation_prompt=True)
    assert prompts[1][:len(prompts[0])] == prompts[0]
    # /reset: the history is gone, the system message stays
    assert prompts[2] == tok.encode_chat([sys_msg, user("again")], add_generation_prompt=True)
    assert len(lines) == 3 or out.count("\n") == 3


def test_session_commands(monkeypatch, tok):
    seen = []
    fake_generate(monkeypatch, [tok.encode("one") + [32007], tok.encode("two") + [32007]], seen)
    code, out, err = run(TINY, "hi\n/system Be kind.\n\n/bogus\nyo\n")  # EOF ends the session
    assert code == 0
    assert out == "one\ntwo\n"
    assert "unknown command /bogus" in err
    assert seen[1] == tok.encode_chat([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "yo"}],
                                      add_generation_prompt=True)


def test_prompt_prefix_matches_training_encoding(tok):
    # the prompt chat.py builds for a conversation is exactly the prefix train.py trains on for it
    conv = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "bonjour"}, {"role": "user", "content": "what is LoRA? é ü 日本"},
            {"role": "assistant", "content": "Une adaptation de rang faible."}]
    turns = [("hello", "bonjour")]
    prompt, dropped = chat.fit_prompt(tok, "Answer in French.", turns, conv[3]["content"], limit=10_000)
    assert dropped == 0
    ids, labels = training_ids(tok, conv, train_on="assistant")
    ids, labels = list(ids), list(labels)
    assert ids[:len(prompt)] == prompt
    # the new user turn and the assistant header are never targets (the earlier reply is: it is an assistant turn) ...
    last_user = max(i for i, t in enumerate(ids[:len(prompt)]) if t == tok.token_to_id("<|user|>"))
    assert all(l == -100 for l in labels[last_user:len(prompt)])
    assert any(l != -100 for l in labels[:last_user])  # "bonjour" is trained on
    assert labels[len(prompt)] != -100  # ... and the reply starts right after it
    assert tok.decode(ids[len(prompt):]).strip().startswith("Une adaptation")


def test_ctrl_c_stops_the_reply_and_the_session_goes_on(monkeypatch, tok):
    class Interrupted(list):
        def __iter__(self):
            yield from tok.encode("partial")
            raise KeyboardInterrupt

    fake_generate(monkeypatch, [Interrupted(), tok.encode("next") + [32007]])
    code, out, err = run(TINY, "first\nsecond\n")
    assert code == 0
    assert out == "partial\nnext\n"
    assert "interrupted" in err


def test_ctrl_c_at_the_prompt_exits_cleanly():
    class CtrlC(io.StringIO):
        def readline(self, *a):
            raise KeyboardInterrupt

    code, out, err = run(TINY, stdin=CtrlC())
    assert code == 0 and "Traceback" not in err


def test_history_truncation_drops_oldest_turn(monkeypatch, tok):
    seen = []
    reply = tok.encode("a fairly long reply of many words to fill the context") + [32007]
    fake_generate(monkeypatch, [reply] * 6, seen)
    argv = [*TINY, "--system", "SYS", "--max-context", "100", "--max-new-tokens", "20"]
    code, out, err = run(argv, "".join(f"question number {i}\n" for i in range(6)))
    assert code == 0, err
    assert out.count("\n") == 6
    assert "dropped the oldest" in err
    assert all(len(p) <= 80 for p in seen)
    last = tok.decode(seen[-1], skip_special_tokens=False)
    assert "SYS" in last and "question number 5" in last and "question number 0" not in last
    sys_prefix = tok.encode_chat([{"role": "system", "content": "SYS"}, {"role": "user", "content": "x"}])
    assert seen[-1][:3] == sys_prefix[:3]


def test_message_longer_than_context_is_an_error():
    code, out, err = run([*TINY, "--max-context", "40", "--max-new-tokens", "20",
                          "--prompt", "word " * 100])
    assert code == 2 and "error: the message is too long" in err


def test_empty_reply_is_not_kept_and_the_session_goes_on(monkeypatch, tok):
    # a reply that is only <|end|> (or Ctrl-C before the first token) shows nothing; an empty assistant message
    # cannot be rendered, so the turn must not stay in the history
    seen = []
    fake_generate(monkeypatch, [[32007], tok.encode("two") + [32007]], seen)
    code, out, err = run(TINY, "hi\nyo\n")
    assert code == 0, err
    assert out == "\ntwo\n" and "Traceback" not in err
    assert seen[1] == tok.encode_chat([{"role": "user", "content": "yo"}], add_generation_prompt=True)


def test_blank_system_and_prompt(prompts, tok):
    code, out, err = run([*TINY, "--system", "  ", "--prompt", "hi", "--max-new-tokens", "3"])
    assert code == 0, err  # a blank --system is no system message, like "/system" with no text
    assert prompts[-1] == tok.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    code, out, err = run([*TINY, "--prompt", " \n "])
    assert code == 2 and err.startswith("error:") and "empty" in err and out == ""


def test_model_folder_without_tokenizer_is_a_clear_error(tmp_path):
    small_tiny(seed=0).save_pretrained(tmp_path / "ckpt")  # weights only, no tokenizer.json
    code, out, err = run(["--model", str(tmp_path / "ckpt"), "--prompt", "hi"])
    assert code == 2 and err.startswith("error: --model") and "tokenizer.json" in err and "Traceback" not in err


# ----- adapters -----------------------------------------------------------------------------------------------------
def test_adapter_changes_reply_and_merge_keeps_it(adapter):
    base = run([*TINY, "--prompt", "hello", "--max-new-tokens", "16"])
    tuned = run([*TINY, "--prompt", "hello", "--max-new-tokens", "16", "--adapter", str(adapter)])
    merged = run([*TINY, "--prompt", "hello", "--max-new-tokens", "16", "--adapter", str(adapter),
                  "--merge"])
    assert base[0] == tuned[0] == merged[0] == 0, (tuned[2], merged[2])
    assert tuned[1] != base[1]
    assert merged[1] == tuned[1]


def test_peft_adapter_folder_gives_the_same_reply(adapter, tmp_path):
    model = small_tiny(seed=0)
    lora.load_adapter(model, adapter)
    lora.export_peft(model, tmp_path / "peft", model.lora_config)
    argv = [*TINY, "--prompt", "hello", "--max-new-tokens", "16", "--adapter"]
    ours, peft = run(argv + [str(adapter)]), run(argv + [str(tmp_path / "peft")])
    assert ours[0] == peft[0] == 0, peft[2]
    assert peft[1] == ours[1]


def test_missing_adapter_is_a_clear_error(tmp_path):
    code, out, err = run([*TINY, "--prompt", "hi", "--adapter", str(tmp_path / "nope")])
    assert code == 2 and out == ""
    assert err.startswith("error: --adapter") and "nope" in err and "Traceback" not in err


def test_adapter_for_another_model_is_a_clear_error(tmp_path):
    path = make_adapter(tmp_path / "other", hidden_size=32, intermediate_size=96)
    code, out, err = run([*TINY, "--prompt", "hi", "--adapter", str(path)])
    assert code == 2 and out == ""
    assert err.startswith("error: --adapter") and "shape" in err.lower()


def test_bad_model_is_a_clear_error(tmp_path):
    code, out, err = run(["--model", str(tmp_path / "missing"), "--prompt", "hi"])
    assert code == 2 and err.startswith("error: --model") and "no such checkpoint folder" in err


def test_bad_arguments_exit_2():
    assert run([*TINY, "--top-p", "0"])[0] == 2
    assert run([*TINY, "--merge"])[0] == 2


def test_bad_numbers_exit_2_with_one_line(capsys):
    # issue 13.6: --temperature nan was a RuntimeError from multinomial; --max-context 0 silently meant the whole
    # context and -5 said "context of -5 tokens"
    for args in (["--temperature", "nan"], ["--temperature", "inf"], ["--max-context", "0"], ["--max-context", "-5"]):
        assert run([*TINY, "--prompt", "hi", *args])[0] == 2, args
        err = capsys.readouterr().err
        assert f"error: {args[0]} must be" in err and "Traceback" not in err, err


def test_nan_logits_are_refused(monkeypatch):
    # issue 13.2: a poisoned model printed an empty reply and exited 0
    from phi3lora.phi3mini import hub

    real = hub.load_model

    def poisoned(*a, **kw):
        model = real(*a, **kw)
        with torch.no_grad():
            model.model.norm.weight[0] = float("nan")
        return model

    monkeypatch.setattr(hub, "load_model", poisoned)
    code, out, err = run([*TINY, "--prompt", "hi"])
    assert code == 2 and out == "" and err.startswith("error: the model computes NaN or infinite logits"), err
    code, out, err = run(TINY, "hello\nagain\n")  # a session ends too, at the first message
    assert code == 2 and err.count("error:") == 1, err


def test_adapter_with_nan_weights_is_refused_at_load(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_adapter(tmp_path / "a")
    tensors = load_file(path / "adapter.safetensors")
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path / "adapter.safetensors")
    code, out, err = run([*TINY, "--prompt", "hi", "--adapter", str(path)])
    assert code == 2 and err.startswith("error: --adapter") and "NaN or infinite values" in err and key in err


def test_adapter_for_another_base_warns(tmp_path):
    model = small_tiny(seed=1)  # same shapes as TINY's model (seed 0), other weights
    lora.inject(model, lora.LoraConfig(r=2))
    model.name_or_path = "my-other-base"
    lora.save_adapter(model, tmp_path / "a")
    code, out, err = run([*TINY, "--prompt", "hi", "--max-new-tokens", "2", "--adapter",
                          str(tmp_path / "a")])
    assert code == 0 and "warning:" in err and "'my-other-base'" in err and "Traceback" not in err, err


def test_checkpoint_folder_as_adapter_points_at_its_adapter(adapter, tmp_path):
    import shutil
    shutil.copytree(adapter, tmp_path / "step-0000010" / "adapter")
    code, out, err = run([*TINY, "--prompt", "hi", "--adapter", str(tmp_path / "step-0000010")])
    assert code == 2 and "point at" in err and str(tmp_path / "step-0000010" / "adapter") in err


# ----- real processes -----------------------------------------------------------------------------------------------
def _subprocess(args, stdin=""):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(ROOT / "chat.py"), *args], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)


def test_subprocess_pipe_and_errors():
    p = _subprocess(["--model", "tiny", "--max-new-tokens", "8"], "hello\n/reset\nwhat is lora?\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("\n") == 2 and "Traceback" not in p.stderr
    p = _subprocess(["--model", "microsoft/Phi-3-mini-4k-instruct", "--prompt", "hi"])
    assert p.returncode == 2 and p.stderr.startswith("error: --model") and "Traceback" not in p.stderr
    assert "local folder" in p.stderr


@pytest.mark.slow
def test_demo_memorizes_its_chats(tmp_path):
    # the README's demo as it is (configs/tiny.toml, the demo-sized tiny model, ~1 min): after training, a trained
    # question gets its trained answer word for word; before training, the base model's noise
    import json

    import train
    out = tmp_path / "demo"
    assert train.main(["--config", str(ROOT / "configs" / "tiny.toml"), "--out", str(out), "--save-every", "0",
                       "--eval-every", "0"]) == 0
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[0] > 9 and losses[-1] < 0.1, (losses[0], losses[-1])
    chats = [json.loads(line)["messages"] for line in (ROOT / "data" / "demo_chat.jsonl").read_text().splitlines()]
    for user, assistant in [(c[0]["content"], c[1]["content"]) for c in chats[:2]]:
        question = ["--model", "tiny", "--prompt", user, "--max-new-tokens", "40"]
        base = run(question)
        tuned = run(question + ["--adapter", str(out / "adapter")])
        assert base[0] == tuned[0] == 0, tuned[2]
        assert tuned[1].strip() == assistant, (tuned[1], assistant)
        assert base[1].strip() != assistant


def test_closed_stdin_or_stdout_is_a_clean_error(monkeypatch):
    # issue 13.6: `<&-` / `>&-` leave sys.stdin / sys.stdout None, which was an AttributeError
    monkeypatch.setattr(sys, "stdin", None)
    out, err = io.StringIO(), io.StringIO()
    assert chat.main(TINY, stdout=out, stderr=err) == 2
    assert err.getvalue().startswith("error: stdin is closed") and out.getvalue() == "", err.getvalue()
    assert chat.main([*TINY, "--prompt", "hi", "--max-new-tokens", "2"], stdout=out, stderr=err) == 0
    monkeypatch.setattr(sys, "stdout", None)
    err = io.StringIO()
    assert chat.main([*TINY, "--prompt", "hi"], stderr=err) == 2
    assert err.getvalue().startswith("error: stdout is closed")


def test_a_reader_that_goes_away_ends_it_quietly():
    # issue 13.6: `| head -c 1` gave a BrokenPipeError traceback. A pipe whose reader is gone before the first byte
    # fails every write (EPIPE), as after head exits; a real process, for the flush at interpreter exit too.
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--model", "tiny", "--max-new-tokens", "4",
                            "--prompt", "hi"], stdout=w, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                           env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120)
    finally:
        os.close(w)
    assert p.returncode == 141 and p.stderr == "", p.stderr


# ----- a reply cut by the token limit -------------------------------------------------------------------------------
def test_a_reply_cut_by_max_new_tokens_says_so_on_stderr(monkeypatch, tok):
    """stdout stays the reply alone (its last line is the reply); the notice goes to stderr, on its own line."""
    fake_generate(monkeypatch, [tok.encode("one two three")[:3]])
    code, out, err = run([*TINY, "--prompt", "hello", "--max-new-tokens", "3"])
    assert code == 0, err
    assert out.count("\n") == 1 and "cut" not in out
    assert "[cut at --max-new-tokens 3]\n" in err.splitlines(keepends=True)


def test_a_reply_that_stops_or_is_shorter_is_not_called_cut(monkeypatch, tok):
    end = tok.end_id
    fake_generate(monkeypatch, [tok.encode("Hi")[:1] + [end], tok.encode("Hi")[:1]])
    for _ in range(2):  # 2 tokens, the last a stop id; then 1 token of a limit of 2
        code, out, err = run([*TINY, "--prompt", "hello", "--max-new-tokens", "2"])
        assert code == 0 and out.strip(), err
        assert "cut at" not in err, err
