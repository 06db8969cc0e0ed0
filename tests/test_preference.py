"""Preference tuning (--objective dpo / orpo): the losses and their LoRA gradients against TRL's formulas on
log-probs from transformers + peft, the preference data forms, and train.py end to end (learning, exact resume,
--init-adapter as the reference)."""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import peft
import pytest
import torch
import torch.nn.functional as F

from phi3lora import lora
from phi3lora.cli import train
from phi3lora.data import DataError
from phi3lora.data.pipeline import Batch
from phi3lora.data.preference import collate_pairs, encode_pair, load_preferences, record_to_pair
from phi3lora.phi3mini import Phi3, Tokenizer
from phi3lora.training import preference
from helpers import chat_encoder, make_hf_model, save_hf_checkpoint, small_tiny_args, write_jsonl

IGNORE = -100
TARGETS = "qkv_proj,o_proj,gate_up_proj,down_proj,lm_head"


# ----- exactness against TRL on transformers + peft ---------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Our model and peft's on the same tiny weights, with the same non-zero adapter (B random, not 0)."""
    tmp = tmp_path_factory.mktemp("pref")
    ckpt = save_hf_checkpoint(make_hf_model(seed=0), tmp / "ckpt")
    ours = Phi3.from_pretrained(ckpt)
    config = lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(TARGETS.split(",")))
    torch.manual_seed(1)
    lora.inject(ours, config)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn_like(p))
    lora.export_peft(ours, tmp / "peft", config)
    theirs = peft.PeftModel.from_pretrained(make_hf_model(seed=0), tmp / "peft", is_trainable=True)
    return ours.train(), theirs.train()


def fixed_batch(n_pairs=3, width=14, vocab=320):
    """Chosen rows then rejected rows; a prompt of varying length (no loss), a response, right padding."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab, (2 * n_pairs, width), generator=g)
    labels = ids.clone()
    for b in range(2 * n_pairs):
        prompt, end = 3 + b % 3, width - (b % 4)
        labels[b, :prompt] = IGNORE
        labels[b, end:] = IGNORE
        ids[b, end:] = 2  # pad
    return Batch(ids, labels, n_target=int((labels[:, 1:] != IGNORE).sum()))


def hf_logps(model, batch):
    """Summed response log-probs (2N,) and per-token counts, as TRL computes them from the logits."""
    logits = model(input_ids=batch.input_ids).logits[:, :-1].float()
    y = batch.labels[:, 1:]
    mask = y != IGNORE
    per_token = torch.gather(logits.log_softmax(-1), 2, y.clamp(min=0).unsqueeze(2)).squeeze(2) * mask
    return per_token.sum(1), mask.sum(1), logits, y


def lora_grads_ours(model):
    return {n.replace(".lora_A", ".A").replace(".lora_B", ".B"): p.grad.clone()
            for n, p in model.named_parameters() if p.requires_grad}


def lora_grads_peft(model):
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            name = n.removeprefix("base_model.model.").replace(".lora_A.default.weight", ".A")
            name = name.replace(".lora_B.default.weight", ".B")
            out[name] = p.grad.clone()
    return out


def compare_grads(ours, theirs):
    a, b = lora_grads_ours(ours), lora_grads_peft(theirs)
    assert sorted(a) == sorted(b) and len(a) > 0
    for k in a:
        theirs_k = b[k]
        if theirs_k.shape != a[k].shape:  # a fused qkv / gate_up adapter: peft's B is block-diagonal over the slices
            g, r = theirs_k.shape[1] // a[k].shape[1], a[k].shape[1]
            rows = a[k].shape[0] // g
            assert theirs_k.shape[1] == g * r
            theirs_k = torch.cat([theirs_k[i * rows:(i + 1) * rows, i * r:(i + 1) * r] for i in range(g)])
        torch.testing.assert_close(a[k], theirs_k, atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_loss_and_lora_gradients_match_trl(models, label_smoothing):
    ours, theirs = models
    batch, beta = fixed_batch(), 0.3
    n = batch.input_ids.shape[0] // 2
    # theirs: TRL's DPOTrainer sigmoid loss (trl/trainer/dpo_trainer.py, loss_type "sigmoid"; with label smoothing
    # the conservative-DPO form TRL documents) on peft's log-probs, the reference with the adapter disabled
    theirs.zero_grad(set_to_none=True)
    logps, _, _, _ = hf_logps(theirs, batch)
    with torch.no_grad(), theirs.disable_adapter():
        ref, _, _, _ = hf_logps(theirs, batch)
    chosen_logratios, rejected_logratios = logps[:n] - ref[:n], logps[n:] - ref[n:]
    delta = chosen_logratios - rejected_logratios
    trl_loss = (-F.logsigmoid(beta * delta) * (1 - label_smoothing)
                - F.logsigmoid(-beta * delta) * label_smoothing).mean()
    trl_loss.backward()
    # ours: the training path's pieces
    ours.zero_grad(set_to_none=True)
    obj = preference.Objective("dpo", beta, label_smoothing, preference.Reference(ours, None))
    ref_ours = obj.reference.logps(batch, torch.autocast("cpu", enabled=False))
    torch.testing.assert_close(ref_ours, ref, atol=1e-5, rtol=0)
    losses, nll, stats = preference.pair_terms(ours, batch, obj, torch.autocast("cpu", enabled=False), ref_ours)
    loss = losses.sum() / n
    loss.backward()
    assert float(nll) == 0.0
    torch.testing.assert_close(loss, trl_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(stats["chosen_rewards"], (beta * chosen_logratios).sum().detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats["margins"], (beta * delta).sum().detach(), atol=1e-5, rtol=0)
    compare_grads(ours, theirs)


def test_orpo_loss_and_lora_gradients_match_trl(models):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    ours, theirs = models
    batch, beta = fixed_batch(), 0.25
    n = batch.input_ids.shape[0] // 2
    theirs.zero_grad(set_to_none=True)
    logps, counts, logits, y = hf_logps(theirs, batch)
    avg = logps / counts  # TRL's get_batch_logps(average_log_prob=True)
    # TRL's own odds-ratio term, called on a stand-in for the trainer (it reads only beta and the device)
    fake = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device="cpu"))
    or_losses, chosen_rewards, _, _, _ = ORPOTrainer.odds_ratio_loss(fake, avg[:n], avg[n:])
    nll = F.cross_entropy(logits[:n].reshape(-1, logits.shape[-1]), y[:n].reshape(-1), ignore_index=IGNORE)
    trl_loss = nll - or_losses.mean()  # ORPOTrainer: policy_nll_loss - losses.mean() (NLL on the response here)
    trl_loss.backward()
    ours.zero_grad(set_to_none=True)
    obj = preference.Objective("orpo", beta)
    losses, nll_sum, stats = preference.pair_terms(ours, batch, obj, torch.autocast("cpu", enabled=False))
    loss = losses.sum() / n + nll_sum / preference.chosen_targets(batch)
    loss.backward()
    torch.testing.assert_close(loss, trl_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(stats["chosen_rewards"], chosen_rewards.sum(), atol=1e-5, rtol=0)
    compare_grads(ours, theirs)


def test_orpo_log1mexp_stable_near_zero():
    x = torch.tensor([-1e-6, -0.5, -0.7, -5.0, -50.0], dtype=torch.float64)
    exact = torch.tensor([-13.815511057964233, -0.9327521295671886, -0.6863410028083851, -0.006760749449488557,
                          -1.9287498479942364e-22], dtype=torch.float64)  # log(1 - e^x), mpmath at 30 digits
    torch.testing.assert_close(preference.log1mexp(x), exact, rtol=1e-9, atol=1e-30)


# ----- data ---------------------------------------------------------------------------------------------------------
Q, GOOD, BAD = "Capital of France?", "Paris.", "Lyon."
FORMS = [
    {"prompt": Q, "chosen": GOOD, "rejected": BAD},
    {"prompt": [{"role": "user", "content": Q}], "chosen": [{"role": "assistant", "content": GOOD}],
     "rejected": [{"role": "assistant", "content": BAD}]},
    {"chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": GOOD}],
     "rejected": [{"role": "user", "content": Q}, {"role": "assistant", "content": BAD}]},
    {"chosen": f"<|user|>\n{Q}<|end|>\n<|assistant|>\n{GOOD}<|end|>\n",
     "rejected": f"<|user|>\n{Q}<|end|>\n<|assistant|>\n{BAD}<|end|>\n"},
    {"conversations": [{"from": "human", "value": Q}], "chosen": {"from": "gpt", "value": GOOD},
     "rejected": {"from": "gpt", "value": BAD}},
    {"instruction": Q, "input": "", "chosen": GOOD, "rejected": BAD},
]


@pytest.mark.parametrize("record", FORMS, ids=["trl", "trl-messages", "implicit", "implicit-text", "sharegpt",
                                               "alpaca"])
def test_every_form_gives_the_same_pair_with_loss_only_on_the_response(record):
    tok = Tokenizer.tiny()
    pair, status = encode_pair(chat_encoder(tok, max_seq_len=256), *record_to_pair(record))
    assert status == "ok"
    for ex, reply in ((pair.chosen, GOOD), (pair.rejected, BAD)):
        assert ex.input_ids == tok.encode_chat([{"role": "user", "content": Q},
                                                {"role": "assistant", "content": reply}])
        targets = [t for t, y in zip(ex.input_ids, ex.labels) if y != IGNORE]
        assert tok.decode(targets) == reply + "<|end|>"


def test_multi_turn_prompt_keeps_its_earlier_reply_out_of_the_loss():
    tok = Tokenizer.tiny()
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": Q}]
    pair, _ = encode_pair(chat_encoder(tok, max_seq_len=256),
                          *record_to_pair({"prompt": prompt, "chosen": GOOD, "rejected": BAD}))
    assert tok.decode([t for t, y in zip(pair.chosen.input_ids, pair.chosen.labels) if y != IGNORE]) == \
        GOOD + "<|end|>"


def test_bad_records_are_all_reported_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [FORMS[0], {"prompt": Q, "chosen": GOOD}, "{not json",
                                              {"prompt": Q, "chosen": "", "rejected": BAD},
                                              {"prompt": Q, "chosen": "a <|end|> b", "rejected": BAD}])
    with pytest.raises(DataError) as e:
        load_preferences(str(path), Tokenizer.tiny(), 256)
    text = str(e.value)
    assert "4 bad lines" in text
    for line in (2, 3, 4, 5):
        assert f"p.jsonl:{line}" in text
    assert "p.jsonl:1:" not in text


def test_pairs_batch_chosen_rows_then_rejected_rows():
    tok = Tokenizer.tiny()
    enc = chat_encoder(tok, max_seq_len=256)
    pairs = [encode_pair(enc, *record_to_pair(r))[0] for r in FORMS[:2]]
    b = collate_pairs(pairs, [[1], [0]], tok.pad_id)
    assert b.input_ids.shape[0] == 4
    assert b.input_ids[0, :len(pairs[1].chosen)].tolist() == list(pairs[1].chosen.input_ids)
    assert b.input_ids[3, :len(pairs[0].rejected)].tolist() == list(pairs[0].rejected.input_ids)


# ----- train.py end to end ------------------------------------------------------------------------------------------
FACTS = [("Capital of France?", "Paris.", "Rome."), ("2 + 2?", "4.", "5."), ("Sky color?", "Blue.", "Green."),
         ("Legs of a spider?", "Eight.", "Six."), ("Days in a week?", "Seven.", "Ten."),
         ("Capital of Japan?", "Tokyo.", "Oslo."), ("Water freezes at?", "Zero.", "Fifty."),
         ("Largest planet?", "Jupiter.", "Mars.")]
TINY = small_tiny_args() + ["--device", "cpu", "--dtype", "fp32", "--no-grad-checkpointing", "--no-packing",
                            "--lora-target-modules", TARGETS, "--lora-r", "8", "--lora-alpha", "16",
                            "--lora-dropout", "0", "--log-every", "1000", "--data-cache", "off", "--eval-every", "0",
                            "--eval-samples", "0", "--batch-size", "4", "--lr", "5e-3"]


def prefs(tmp_path):
    return str(write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in FACTS]))


def records(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def run(args):
    return train.main(TINY + args)


@pytest.mark.parametrize("objective, ref", [("dpo", "step"), ("dpo", "precompute"), ("orpo", "step")])
def test_a_short_run_learns_the_preferences(tmp_path, objective, ref):
    out = tmp_path / "run"
    assert run(["--objective", objective, "--ref-logps", ref, "--data", prefs(tmp_path), "--out", str(out),
                "--max-steps", "24", "--save-every", "0"]) == 0
    recs = [r for r in records(out) if "loss" in r]
    if objective == "dpo":  # the adapter starts at zero: policy = reference, every reward 0, loss log 2
        assert recs[0]["rewards/chosen"] == 0.0 and abs(recs[0]["loss"] - 0.6931472) < 1e-6
        assert (out / "reference_logps.pt").exists() == (ref == "precompute")
    last = recs[-4:]
    assert min(r["rewards/accuracies"] for r in last) > 0.9
    assert min(r["rewards/margins"] for r in last) > 0
    for key in ("rewards/rejected", "logps/chosen", "logps/rejected"):
        assert key in recs[-1]
    assert "reward margin" in (out / "loss.svg").read_text()


def test_preference_resume_is_exact(tmp_path):
    data = prefs(tmp_path)
    common = ["--objective", "dpo", "--data", data, "--max-steps", "6", "--grad-accum", "2", "--batch-size", "2"]
    assert run(common + ["--out", str(tmp_path / "a"), "--save-every", "0"]) == 0
    assert run(common + ["--out", str(tmp_path / "b"), "--save-every", "3"]) == 0
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-0000006")  # as if stopped after step 3
    assert train.main(["--resume", str(tmp_path / "b")]) == 0
    a = [r for r in records(tmp_path / "a") if "loss" in r]
    b = [r for r in records(tmp_path / "b") if "loss" in r]
    assert [r["step"] for r in b] == list(range(1, 7))
    for x, y in zip(a, b):
        assert x["loss"] == y["loss"] and x["rewards/margins"] == y["rewards/margins"], (x, y)


def test_accumulation_is_pair_exact(tmp_path):
    """Batch 4 x accumulation 1 and batch 2 x accumulation 2 see the same pairs: same loss and metrics."""
    data = prefs(tmp_path)
    common = ["--objective", "orpo", "--data", data, "--max-steps", "2", "--save-every", "0"]
    assert run(common + ["--out", str(tmp_path / "a"), "--batch-size", "4"]) == 0
    assert run(common + ["--out", str(tmp_path / "b"), "--batch-size", "2", "--grad-accum", "2"]) == 0
    a, b = ([r for r in records(tmp_path / d) if "loss" in r] for d in "ab")
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm", "rewards/margins", "nll_loss"):
            assert abs(x[key] - y[key]) < 1e-5 * max(1, abs(x[key])), (key, x[key], y[key])


def test_an_sft_adapter_starts_a_dpo_run_and_is_its_reference(tmp_path):
    sft = tmp_path / "sft"
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": q},
                                                                {"role": "assistant", "content": c}]}
                                                  for q, c, _ in FACTS])
    assert run(["--data", str(chats), "--out", str(sft), "--max-steps", "5", "--save-every", "0"]) == 0
    out = tmp_path / "dpo"
    assert run(["--objective", "dpo", "--init-adapter", str(sft / "adapter"), "--data", prefs(tmp_path),
                "--out", str(out), "--max-steps", "2", "--save-every", "0"]) == 0
    first = [r for r in records(out) if "loss" in r][0]
    # the policy starts as the SFT adapter, and the reference is that adapter: every reward 0 at the first step,
    # while the SFT model already prefers the chosen answers over the base (logps differ from a fresh run's)
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    fresh = tmp_path / "fresh"
    assert run(["--objective", "dpo", "--data", prefs(tmp_path), "--out", str(fresh), "--max-steps", "1",
                "--save-every", "0"]) == 0
    assert first["logps/chosen"] > [r for r in records(fresh) if "loss" in r][0]["logps/chosen"]

