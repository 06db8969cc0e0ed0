"""training.tracking: sample prompts cut where chat.py would, greedy replies equal generate's, adapter norms, and
what lands in samples.jsonl and TensorBoard's event files (read back with tensorboard's own reader)."""
import io
import json
import math
import sys

import pytest
import torch

from phi3lora import lora
from helpers import CONV, small_tiny, small_tiny_args
from phi3lora.phi3mini import Tokenizer, default_stop_ids, generate
from phi3lora.data.pipeline import ChatEncoder, load_data
from phi3lora import console
from phi3lora.training.tracking import (ExperimentTracker, TrackerError, adapter_norm_metrics, greedy_samples,
                                       is_noise, question_of, sample_prompts)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.tiny()


def examples(tok):
    one_turn = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    enc = ChatEncoder(tok, 512)
    return [enc.encode(messages)[0] for messages in (CONV, one_turn, CONV)]


def test_sample_prompts_are_chat_prompts_of_the_last_reply(tok):
    prompts = sample_prompts(examples(tok), tok, 2)
    assert len(prompts) == 2
    assert prompts[0]["prompt_ids"] == tok.encode_chat(CONV[:-1], add_generation_prompt=True)
    assert prompts[0]["reference"] == "Its rank."
    assert prompts[1]["reference"] == "Hello."
    assert len(sample_prompts(examples(tok), tok, 10)) == 3


def test_sample_prompts_from_a_token_set(tok, tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": CONV}) + "\n")
    sets = load_data(str(path), tok, 512, eval_data=str(path), cache="off")
    prompts = sample_prompts(sets.eval, tok, 3)
    assert [p["prompt_ids"] for p in prompts] == [tok.encode_chat(CONV[:-1], add_generation_prompt=True)]
    assert all(type(t) is int for t in prompts[0]["prompt_ids"])


def test_greedy_samples_equal_generate_and_keep_the_mode(tok):
    model = small_tiny().train()
    prompts = sample_prompts(examples(tok), tok, 1)
    samples = greedy_samples(model, tok, prompts, max_new_tokens=5)
    assert model.training
    with torch.no_grad():
        new = generate(model.eval(), prompts[0]["prompt_ids"], 5, stop_ids=default_stop_ids(model, tok))
    noise = next((i for i, t in enumerate(new) if is_noise(tok, t)), len(new))
    assert samples == [{"prompt": tok.decode(prompts[0]["prompt_ids"]), "question": CONV[-2]["content"],
                        "reply": tok.decode(new[:noise], skip_special_tokens=True), "reference": "Its rank.",
                        "cut": len(new) == 5 and new[-1] not in default_stop_ids(model, tok),
                        "noise_cut": len(new) - noise}]


def test_lockstep_samples_run_every_forward_and_cut_at_the_stop(tok):
    """Under FSDP every forward is a collective: each prompt must cost the same forwards on every rank, whatever
    token comes out. Here the first token is made a stop id: alone, the reply ends after the prefill; in lockstep
    the decoding runs on to max_new_tokens, and the reply is still cut at that stop."""
    model = small_tiny()
    prompts = sample_prompts(examples(tok), tok, 1)
    with torch.no_grad():
        first = generate(model, prompts[0]["prompt_ids"], 1, stop_ids=[])[0]
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    alone = greedy_samples(model, tok, prompts, max_new_tokens=6, stop_ids=[first])
    n_alone, calls[:] = len(calls), []
    together = greedy_samples(model, tok, prompts, max_new_tokens=6, stop_ids=[first], lockstep=True)
    assert (n_alone, len(calls)) == (1, 6)  # prefill only / prefill + 5 decoding steps
    assert together == alone and alone[0]["reply"] == tok.decode([first], skip_special_tokens=True)


def test_adapter_norm_metrics(tok):
    model = small_tiny()
    lora.inject(model, lora.LoraConfig(r=2, target_modules=("o_proj",)))
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.lora_B.fill_(0.5)
    norms = adapter_norm_metrics(model)
    layer1 = model.model.layers[1].self_attn.o_proj
    assert norms["layers.1.self_attn.o_proj"] == pytest.approx(torch.linalg.matrix_norm(layer1.delta_weight()).item(),
                                                               rel=1e-5)
    assert norms["layers.0.self_attn.o_proj"] == 0
    assert norms["total"] == pytest.approx(math.sqrt(sum(v * v for k, v in norms.items() if k != "total")))


SAMPLES = [{"prompt": "<|user|>\nHi?<|end|>\n<|assistant|>", "reply": "Hello.", "reference": "Hi."}]


def test_samples_jsonl_and_resume(tmp_path):
    said = []
    rep = ExperimentTracker(tmp_path, echo=said.append)
    rep.log({"step": 1, "loss": 2.0})  # report_to none: nothing but the samples file
    rep.log_samples(10, SAMPLES)
    rep.log_samples(20, SAMPLES)
    rep.close()
    lines = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [10, 20] and lines[0]["reply"] == "Hello." and lines[0]["index"] == 0
    assert "Hello." in said[0] and "step 10" in said[0]
    with open(tmp_path / "samples.jsonl", "a") as f:
        f.write('{"step": 30, "rep')  # a killed run's half line
    ExperimentTracker(tmp_path, resume_step=15).close()  # steps after the checkpoint are redone
    assert [json.loads(x)["step"] for x in (tmp_path / "samples.jsonl").read_text().splitlines()] == [10]
    fresh = ExperimentTracker(tmp_path)  # a fresh run starts the file afresh, with its first samples
    assert (tmp_path / "samples.jsonl").exists()
    fresh.log_samples(5, SAMPLES)
    fresh.log_samples(6, SAMPLES)
    assert [json.loads(x)["step"] for x in (tmp_path / "samples.jsonl").read_text().splitlines()] == [5, 6]
    ExperimentTracker(tmp_path / "new").close()
    assert not (tmp_path / "new" / "samples.jsonl").exists()  # no samples, no file
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rep = ExperimentTracker(tmp_path, report_to="tensorboard", echo=lambda m: None)
    rep.log({"step": 5, "loss": 1.5, "lr": 1e-3, "adapter_norms": {"total": 0.25}, "note": "x", "nan_ok": True})
    rep.log({"step": 6, "loss": 1.25})
    rep.log_samples(6, SAMPLES)
    rep.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0}).Reload()
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"loss", "lr", "adapter_norms/total"}
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(5, 1.5), (6, 1.25)]
    assert acc.Scalars("adapter_norms/total")[0].value == pytest.approx(0.25)
    assert "samples/text_summary" in tags["tensors"]


def test_missing_backends_name_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(TrackerError, match=r"pip install 'phi3-lora\[tensorboard\]'"):
        ExperimentTracker(tmp_path, report_to="tensorboard")
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(TrackerError, match="pip install wandb"):
        ExperimentTracker(tmp_path, report_to="wandb")
    with pytest.raises(TrackerError, match="one of none, tensorboard, wandb"):
        ExperimentTracker(tmp_path, report_to="mlflow")


def test_train_reports_to_tensorboard_and_resumes_the_samples(tmp_path, monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from phi3lora.cli import train

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (CONV, CONV[1:3])))
    base = small_tiny_args() + ["--device", "cpu", "--dtype", "fp32", "--no-grad-checkpointing", "--no-packing",
            "--data", str(data), "--eval-data", str(data), "--out", str(tmp_path / "out"), "--batch-size", "2",
            "--eval-every", "1", "--save-every", "1", "--eval-samples", "1", "--report-to", "tensorboard",
            "--lora-target-modules", "qkv_proj,lm_head"]
    assert train.main(base + ["--max-steps", "2"]) == 0
    assert train.main(base + ["--max-steps", "3", "--resume"]) == 0
    out = tmp_path / "out"
    steps = [json.loads(x)["step"] for x in (out / "samples.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]  # the resumed run redoes nothing twice
    assert "sample 0 @ step 3" in capsys.readouterr().err
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0}).Reload()
    assert sorted({e.step for e in acc.Scalars("loss")}) == [1, 2, 3]
    assert {"eval_loss", "adapter_norms/total", "adapter_norms/lm_head"} <= set(acc.Tags()["scalars"])
    assert acc.Scalars("adapter_norms/total")[-1].value > 0
    # a missing backend stops the run before anything loads
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert train.main(base + ["--max-steps", "1", "--overwrite", "--out", str(tmp_path / "other")]) == 2
    assert "pip install 'phi3-lora[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


# ----- what a sample says on the console -----------------------------------------------------------------------------
def test_a_random_model_s_noise_is_cut_with_a_note(tok):
    """The untrained tiny model babbles <unusedN> filler pieces: the reply stops before the first, and says how
    many tokens went; it ran into max_new_tokens, so it is marked cut."""
    model = small_tiny()
    prompts = sample_prompts(examples(tok), tok, 1)
    with torch.no_grad():
        new = generate(model, prompts[0]["prompt_ids"], 24, stop_ids=default_stop_ids(model, tok))
    assert "<unused" in tok.decode(new, skip_special_tokens=True)  # what used to be printed
    [s] = greedy_samples(model, tok, prompts, max_new_tokens=24)
    assert "<unused" not in s["reply"] and s["noise_cut"] > 0
    assert s["reply"] == tok.decode(new[:len(new) - s["noise_cut"]], skip_special_tokens=True)
    assert s["cut"] is True and len(new) == 24


def test_the_question_is_the_last_user_message(tok):
    ids = tok.encode_chat(CONV[:-1], add_generation_prompt=True)
    assert question_of(tok, ids) == CONV[-2]["content"] and CONV[-2]["role"] == "user"
    assert question_of(tok, tok.encode("no chat here")) == ""


def test_sample_lines_show_the_question_beside_the_reply_and_what_was_cut(tmp_path):
    said = []
    rep = ExperimentTracker(tmp_path, echo=said.append)
    noisy = [{**SAMPLES[0], "question": "Hi?", "reply": "", "cut": True, "noise_cut": 48}]
    rep.log_samples(0, noisy)
    rep.log_samples(5, [{**SAMPLES[0], "question": "Hi?", "cut": False, "noise_cut": 0}])
    assert said[0] == "sample 0 @ step 0: 'Hi?' -> '' (… 48 more tokens of noise cut) [cut at the token limit] " \
                      "(data: 'Hi.')"
    assert said[1] == "sample 0 @ step 5: 'Hi?' -> 'Hello.' (data: 'Hi.')"
    lines = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert (lines[0]["cut"], lines[0]["noise_cut"], lines[0]["question"]) == (True, 48, "Hi?")
    assert lines[1]["cut"] is False


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_samples_end_an_open_progress_line(monkeypatch, tmp_path):
    screen = Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    rep = ExperimentTracker(tmp_path)  # the default echo: the console
    console.progress("step 1/2")
    rep.log_samples(1, SAMPLES)
    assert screen.getvalue().startswith("\r\x1b[Kstep 1/2\nsample 0 @ step 1: ")
