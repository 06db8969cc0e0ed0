"""phi3lora.eval: lm-eval's model type "phi3lora" against lm-eval's own `hf` model with the same adapter exported
to PEFT (a local task directory: multiple choice, generate_until, rolling perplexity; no network), and the
base-vs-adapter comparison on a chat file, from Python and from `phi3lora eval`."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import small_tiny, small_tiny_dir, write_jsonl

lm_eval = pytest.importorskip("lm_eval")

from phi3lora import lora  # noqa: E402
from phi3lora.phi3mini import Phi3, Tokenizer  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MC = [{"question": f"Is {a} bigger than {b}?", "choices": ["yes", "no", "maybe"], "answer": int(a <= b)}
      for a, b in [(3, 1), (2, 5), (7, 7), (9, 4), (1, 8), (6, 2)]]
GEN = [{"question": q, "target": t} for q, t in [("Two plus two?", "four"), ("Color of the sky?", "blue"),
                                                   ("Opposite of up?", "down")]]
# the longer texts run past max_length=48 below, so the rolling windows and the left cut of a long context are used
PPL = [{"text": "the quick brown fox jumps over the lazy dog " * n} for n in (1, 4, 9)]

TASKS = {
    "tiny_mc": """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""",
    "tiny_gen": """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""",
    "tiny_ppl": """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/ppl.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The small tiny checkpoint, an adapter with nonzero B in our format and exported to PEFT, the task folder."""
    root = tmp_path_factory.mktemp("eval")
    # lm-eval's hf model resizes the embedding to len(tokenizer) before it loads a PEFT adapter (Phi-3 pads its
    # 32011 tokens to 32064 rows; the resize drops those rows, so log-softmax runs over fewer logits). A checkpoint
    # whose rows are the tokenizer's is the same model on both sides; the rest is small_tiny_dir()'s.
    base = root / "base"
    model = small_tiny(vocab_size=Tokenizer.tiny().vocab_size)
    model.save_pretrained(base)
    shutil.copy(Path(small_tiny_dir()) / "generation_config.json", base)
    Tokenizer.tiny().save_pretrained(base)
    base = str(base)
    model = Phi3.from_pretrained(base)
    ids = torch.arange(100, 120)[None]
    before = model(ids)
    config = lora.LoraConfig(r=4, lora_alpha=8)
    lora.inject(model, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B = 0 would make the adapter the base: nothing compared
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    assert (model(ids) - before).abs().max() > 1e-2  # the adapter changes the outputs: there is something to compare
    lora.save_adapter(model, root / "adapter", config)
    lora.export_peft(model, root / "peft", config, base_model_name_or_path=base)
    tasks = root / "tasks"
    tasks.mkdir()
    write_jsonl(tasks / "mc.jsonl", MC)
    write_jsonl(tasks / "gen.jsonl", GEN)
    write_jsonl(tasks / "ppl.jsonl", PPL)
    for name, text in TASKS.items():
        (tasks / f"{name}.yaml").write_text(text.format(dir=tasks))
    return {"base": base, "adapter": str(root / "adapter"), "peft": str(root / "peft"), "tasks": str(tasks),
            "root": root}


def run_harness(model: str, model_args: str, task_dir: str, tasks, batch_size: int, limit=None):
    from phi3lora.cli.eval import task_manager  # importing phi3lora.eval registers "phi3lora"

    # task_manager: one index of lm-eval's thousands of task YAMLs per process (the command's, cached)
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), limit=limit,
                                   task_manager=task_manager(task_dir), batch_size=batch_size,
                                   log_samples=True, device="cpu")


def per_sample(results, task):
    """(doc id, the model's responses as floats or strings) per logged sample of task, in doc order."""
    out = []
    for s in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
        resps = [r[0] for r in s["resps"]]
        out.append((s["doc_id"], [r[0] if isinstance(r, (tuple, list)) else r for r in resps],
                    [bool(r[1]) for r in resps if isinstance(r, (tuple, list)) and len(r) > 1]))
    return out


def compare_with_hf(s, tasks, limit=None):
    """Run the tasks with model="phi3lora" (batches of 3: left padding used) and with lm-eval's hf + PEFT (batches
    of 1), and require the same per-sample responses and the same metrics."""
    ours = run_harness("phi3lora", f"pretrained={s['base']},adapter={s['adapter']},dtype=float32,max_length=48",
                       s["tasks"], tasks, batch_size=3, limit=limit)
    hf = run_harness("hf", f"pretrained={s['base']},peft={s['peft']},dtype=float32,max_length=48", s["tasks"], tasks,
                     batch_size=1, limit=limit)
    for task in tasks:
        mine, theirs = per_sample(ours, task), per_sample(hf, task)
        assert [d for d, _, _ in mine] == [d for d, _, _ in theirs]
        assert len(mine) == (limit or {"tiny_mc": len(MC), "tiny_gen": len(GEN), "tiny_ppl": len(PPL)}[task])
        for (doc, a, ga), (_, b, gb) in zip(mine, theirs):
            if task == "tiny_gen":
                assert a == b, (doc, a, b)
            else:
                torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                                           atol=1e-4, rtol=0, msg=f"{task} doc {doc}")
                assert ga == gb, (task, doc)
        for metric, value in theirs_metrics(hf, task).items():
            assert ours["results"][task][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), (task, metric)


def theirs_metrics(results, task) -> dict:
    return {k: v for k, v in results["results"][task].items() if isinstance(v, float) and "stderr" not in k}


def test_multiple_choice_scores_as_lm_eval_hf_with_the_peft_adapter(setup):
    """The quick one: four multiple-choice questions (12 loglikelihood requests, padded in batches of 3)."""
    compare_with_hf(setup, ["tiny_mc"], limit=4)


@pytest.mark.slow
def test_every_request_type_scores_as_lm_eval_hf_with_the_peft_adapter(setup):
    """loglikelihood (accuracy), generate_until (the text, stop strings, max_gen_toks) and loglikelihood_rolling
    (perplexities, over several windows of max_length 48): the same numbers as hf + PEFT, 1e-4 in fp32."""
    compare_with_hf(setup, list(TASKS))


# ----- phi3lora eval: base vs adapter on a chat file, --tasks, errors ------------------------------------------------
CHATS = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
         for q, a in [("What is LoRA?", "A low-rank update."), ("Capital of France?", "Paris."),
                      ("2 + 2?", "4.")]]


def run_cli(argv, capsys):
    from phi3lora.cli import main

    rc = main(["eval", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_eval_command_compares_base_and_adapter_and_runs_tasks(setup, capsys):
    s = setup
    data = write_jsonl(s["root"] / "chats.jsonl", CHATS)
    out = s["root"] / "run"
    rc, stdout, err = run_cli(["--model", s["base"], "--adapter", s["adapter"], "--data", str(data), "--device", "cpu",
                               "--max-new-tokens", "5", "--out", str(out), "--tasks", "tiny_mc", "--include-path",
                               s["tasks"], "--limit", "2", "--batch-size", "2", "--output-path", str(out / "lm"),
                               "--log-samples"], capsys)
    assert rc == 0, err
    report = json.loads((out / "eval.json").read_text())
    assert report["n_examples"] == 3 and report["adapter_dir"] == s["adapter"]
    for column in ("base", "adapter"):
        assert set(report[column]) >= {"loss", "perplexity", "exact_match", "token_f1"}
        assert report[column]["perplexity"] == pytest.approx(math.exp(report[column]["loss"]), rel=1e-6)
    assert abs(report["base"]["loss"] - report["adapter"]["loss"]) > 1e-3  # the base column is the adapter off
    assert "tiny_mc" in report["lm_eval"]["results"]
    assert "acc,none" in report["lm_eval"]["results"]["tiny_mc"]
    written = json.loads((out / "lm" / "results.json").read_text())  # lm-eval's own record, every response in it
    assert written["results"]["tiny_mc"]["acc,none"] == report["lm_eval"]["results"]["tiny_mc"]["acc,none"]
    assert len(written["samples"]["tiny_mc"]) == 2
    # the table a user sees: both columns, every number, and lm-eval's own table
    assert "base" in stdout and "adapter" in stdout and "perplexity" in stdout and "token F1" in stdout
    assert "tiny_mc" in stdout and "acc" in stdout
    assert f"{report['adapter']['loss']:.4f}" in stdout


def test_eval_command_errors_are_one_line(setup, capsys, tmp_path):
    s = setup
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    common = ["--model", s["base"], "--device", "cpu"]
    rc, _, err = run_cli(common + ["--tasks", "tiny_mc,no_such_task", "--include-path", s["tasks"]], capsys)
    assert rc == 2 and "unknown task 'no_such_task'" in err and "Traceback" not in err
    rc, _, err = run_cli(common + ["--adapter", str(tmp_path / "missing"), "--data", str(data)], capsys)
    assert rc == 2 and "--adapter" in err and "no such adapter folder" in err and "Traceback" not in err
    # an adapter for another base: the tiny preset is 256 wide, this adapter's base 64
    rc, _, err = run_cli(["--model", "tiny", "--device", "cpu", "--adapter", s["adapter"], "--data", str(data)],
                         capsys)
    assert rc == 2 and f"--adapter {s['adapter']}" in err and "Traceback" not in err
    rc, _, err = run_cli(common, capsys)
    assert rc == 2 and "nothing to evaluate" in err


def test_without_lm_eval_the_chat_comparison_works_and_tasks_name_the_extra(setup, tmp_path):
    """lm_eval made unimportable: phi3lora.eval still imports (no "phi3lora" model registered), --data runs, and
    --tasks is one line naming the extra to install."""
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS[:1])
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "from phi3lora.cli import eval as command\n"
            "assert 'phi3lora.eval.harness' not in sys.modules\n"
            f"rc = command.main(['--model', {setup['base']!r}, '--device', 'cpu', '--data', {str(data)!r}, "
            "'--max-new-tokens', '2'])\n"
            "assert rc == 0, rc\n"
            f"sys.exit(command.main(['--model', {setup['base']!r}, '--tasks', 'arc_easy']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "exact match" in r.stdout
    assert "error: --tasks needs lm-evaluation-harness: pip install 'phi3-lora[eval]'" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_training_path_does_not_import_lm_eval():
    """train.py's default run loads neither phi3lora.eval nor lm_eval (the README's venv has no lm_eval)."""
    code = ("import sys, phi3lora.cli.train, phi3lora.cli.chat; "
            "print(sorted(m for m in sys.modules if m.startswith(('lm_eval', 'phi3lora.eval'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    assert out.strip() == "[]"


def test_answer_scores_and_the_last_reply():
    from phi3lora.data import ChatEncoder
    from phi3lora.eval.compare import last_reply, normalize, token_f1

    assert normalize("The  Answer, is: Paris!") == "answer is paris"
    assert token_f1("Paris.", "paris") == 1.0 and token_f1("in Paris", "Paris, France") == pytest.approx(0.5)
    assert token_f1("", "x") == 0.0 and token_f1("", "") == 1.0
    tok = Tokenizer.tiny()
    messages = CHATS[0]["messages"] + [{"role": "user", "content": "And r?"}, {"role": "assistant", "content": "rank"}]
    ex, status = ChatEncoder(tok, None, "assistant").encode(messages)
    prompt, reply = last_reply(ex.input_ids, ex.labels)
    assert prompt == tok.encode_chat(messages[:3], add_generation_prompt=True)
    assert tok.decode(reply, skip_special_tokens=True) == "rank" and reply[-1] == tok.end_id
