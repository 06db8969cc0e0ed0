"""LoRA+ and NEFTune, exact against their references: peft's create_loraplus_optimizer (the same parameter groups,
and one AdamW step moving every weight the same way) and transformers' neftune_post_forward_hook (the same noise
from the same seed, none in eval() or generation); and both in train.py (the loss falls, resume is exact).

One tiny transformers Phi-3 with a peft adapter (LoRA on the projections and on embed_tokens, lm_head in
modules_to_save) is built per module; our model loads the very same adapter, so both hold the same parameters."""
import json
import os
import signal

import peft
import pytest
import torch
from safetensors.torch import load_file
from peft.optimizers import create_loraplus_optimizer
from transformers.integrations.neftune import neftune_post_forward_hook

from phi3lora import lora
from phi3lora.cli import train
from phi3lora.phi3mini import Phi3, generate
from phi3lora.training.config import TrainingConfig, parse_config
from phi3lora.training import setup
from phi3lora.training.setup import activate_neftune, deactivate_neftune, make_optimizer, neftune_hook
from helpers import make_hf_model, save_hf_checkpoint, small_tiny_args, write_jsonl

TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens"]
IDS = torch.randint(3, 320, (2, 9), generator=torch.Generator().manual_seed(0))
LR, RATIO, WD, LR_EMB = 1e-3, 16.0, 0.1, 3e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(peft model, folder of its base checkpoint, folder of its adapter): random A, B and lm_head copy."""
    tmp = tmp_path_factory.mktemp("loraplus")
    base = save_hf_checkpoint(make_hf_model(seed=0), tmp / "base")
    model = peft.get_peft_model(make_hf_model(seed=0), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(tmp / "adapter")
    return model, base, tmp / "adapter"


def ours_from(pair) -> Phi3:
    _, base, adapter = pair
    model = Phi3.from_pretrained(base)
    lora.load_adapter(model, adapter)
    return model.train()


def our_name(peft_name: str) -> str:
    """peft's parameter name -> ours: no wrapper prefix, no adapter name, bare lora_A / lora_B, modules_to_save's
    trained copy under the module's own name."""
    name = peft_name.removeprefix("base_model.model.")
    for theirs, mine in ((".lora_A.default.weight", ".lora_A"), (".lora_B.default.weight", ".lora_B"),
                         (".lora_embedding_A.default", ".lora_A"), (".lora_embedding_B.default", ".lora_B"),
                         (".modules_to_save.default.", ".")):
        name = name.replace(theirs, mine)
    return name


def config(**kw) -> TrainingConfig:
    return TrainingConfig(**{"lr": LR, "loraplus_lr_ratio": RATIO, "weight_decay": WD,
                             "loraplus_lr_embedding": LR_EMB, **kw})


def test_loraplus_groups_and_one_step_equal_peft(pair):
    theirs = pair[0].train()
    ours = ours_from(pair)
    start = {our_name(n): p.detach().clone() for n, p in theirs.named_parameters() if p.requires_grad}
    opt_theirs = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                           loraplus_weight_decay=WD, loraplus_lr_embedding=LR_EMB)
    params = [p for p in ours.parameters() if p.requires_grad]
    opt_ours = make_optimizer(config(), params, torch.device("cpu"), ours)

    names_theirs = {id(p): our_name(n) for n, p in theirs.named_parameters()}
    names_ours = {id(p): n for n, p in ours.named_parameters()}
    assert len(opt_ours.param_groups) == len(opt_theirs.param_groups) == 4
    for mine, ref in zip(opt_ours.param_groups, opt_theirs.param_groups):
        assert (mine["lr"], mine["weight_decay"]) == (ref["lr"], ref["weight_decay"])
        assert sorted(names_ours[id(p)] for p in mine["params"]) == sorted(names_theirs[id(p)] for p in ref["params"])
    sizes = [len(g["params"]) for g in opt_ours.param_groups]
    assert sizes == [8 + 1, 2, 8, 0]  # A: 8 lora_A + lm_head; embedding: its A and B; B: 8 lora_B; no biases
    assert {g["lr"] for g in opt_ours.param_groups} == {LR, LR_EMB, LR * RATIO}

    for model, opt in ((theirs, opt_theirs), (ours, opt_ours)):
        out = model(IDS, labels=IDS)
        (out.loss if hasattr(out, "loss") else out).backward()
        opt.step()
    after = {n: p.detach() for n, p in ours.named_parameters() if p.requires_grad}
    assert after.keys() == start.keys()
    for n, p in theirs.named_parameters():
        if p.requires_grad:
            name = our_name(n)
            torch.testing.assert_close(after[name], p.detach(), atol=1e-6, rtol=0, msg=name)
            assert not torch.equal(after[name], start[name]), name  # the step moved it
    # B moved ratio times as far as A would have (AdamW's first step is lr·sign(g) up to eps and decay)
    qkv = "model.layers.0.self_attn.qkv_proj"
    move_b = (after[f"{qkv}.lora_B"] - start[f"{qkv}.lora_B"] * (1 - LR * RATIO * WD)).abs().max()
    move_a = (after[f"{qkv}.lora_A"] - start[f"{qkv}.lora_A"] * (1 - LR * WD)).abs().max()
    assert move_b == pytest.approx(LR * RATIO, rel=1e-3) and move_a == pytest.approx(LR, rel=1e-3)


def test_loraplus_off_is_one_plain_group(pair):
    ours = ours_from(pair)
    params = [p for p in ours.parameters() if p.requires_grad]
    opt = make_optimizer(config(loraplus_lr_ratio=0.0), params, torch.device("cpu"), ours)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == LR and opt.param_groups[0]["weight_decay"] == WD


# ----- NEFTune ------------------------------------------------------------------------------------------------------
def embeddings_out(model: Phi3, ids=IDS) -> torch.Tensor:
    seen = []
    handle = model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return seen[0]


def test_neftune_noise_equals_transformers_and_only_in_training(pair):
    model = ours_from(pair)
    clean = embeddings_out(model)  # (B, L, d), no hook yet
    handle = activate_neftune(model, 5.0)
    torch.manual_seed(123)
    noisy = embeddings_out(model)
    # transformers' hook on the same embedding output, from the same RNG state
    emb = model.model.embed_tokens
    torch.manual_seed(123)
    expected = neftune_post_forward_hook(emb, (IDS,), clean)
    torch.testing.assert_close(noisy, expected, atol=0, rtol=0)
    bound = 5.0 / (IDS.shape[1] * clean.shape[2]) ** 0.5  # alpha / sqrt(L·d)
    noise = noisy - clean
    assert 0.9 * bound < noise.abs().max() <= bound + 1e-7
    torch.manual_seed(123)
    torch.testing.assert_close(neftune_hook(emb, (IDS,), clean), expected, atol=0, rtol=0)

    # eval(): no noise at all; generate() switches to eval() itself, so a training-mode model generates the same
    model.eval()
    assert torch.equal(embeddings_out(model), clean)
    model.train()
    with torch.no_grad():
        torch.manual_seed(0)
        with_hook = generate(model, IDS[:1], 6)
        deactivate_neftune(model, handle)
        assert not hasattr(emb, "neftune_noise_alpha") and not emb._forward_hooks
        assert generate(model, IDS[:1], 6) == with_hook
    assert model.training  # generate gave the training mode back
    assert torch.equal(embeddings_out(model), clean)  # the hook is gone


# ----- in train.py --------------------------------------------------------------------------------------------------
QA = [("What is LoRA?", "Low-rank adaptation."), ("Capital of France?", "Paris."), ("2 + 2?", "4."),
      ("Who made Phi-3?", "Microsoft."), ("Longest question of them all, with several words?", "A reply.")]
COMMON = small_tiny_args() + [
    "--device", "cpu", "--dtype", "fp32", "--no-grad-checkpointing", "--no-packing", "--log-every", "1000",
    "--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0", "--max-steps", "4", "--batch-size", "2",
    "--grad-accum", "2", "--lr", "5e-3", "--save-every", "2", "--keep-last", "3", "--eval-every", "0",
    "--eval-samples", "0"]
LORAPLUS = ["--loraplus-lr-ratio", "4", "--loraplus-lr-embedding", "1e-3"]
NEFTUNE = ["--neftune-noise-alpha", "5"]
VARIANTS = {  # each alone (slow), and all three together in one run (quick)
    "loraplus": ["--lora-target-modules", "qkv_proj,o_proj,gate_up_proj,down_proj,lm_head,embed_tokens", *LORAPLUS],
    "neftune": ["--lora-target-modules", "qkv_proj,o_proj,gate_up_proj,down_proj,lm_head", *NEFTUNE],
    "modules_to_save": ["--lora-target-modules", "qkv_proj,o_proj,gate_up_proj,down_proj,embed_tokens",
                        "--modules-to-save", "lm_head"],
    "all": ["--lora-target-modules", "qkv_proj,o_proj,gate_up_proj,down_proj,embed_tokens",
            "--modules-to-save", "lm_head", *LORAPLUS, *NEFTUNE],
}


def records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return [(r["step"], r["loss"], r["grad_norm"], r.get("eval_loss")) for r in records(out) if "loss" in r]


@pytest.mark.parametrize("variant", [pytest.param(v, marks=pytest.mark.slow) for v in VARIANTS if v != "all"] + ["all"])
def test_training_learns_and_resume_is_exact(tmp_path, monkeypatch, variant):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": q},
                                                            {"role": "assistant", "content": a}]} for q, a in QA])
    args = COMMON + VARIANTS[variant] + ["--data", str(data), "--eval-data", str(data)]
    hooked = []  # (training?, noise added?) of each call of the NEFTune hook, which the trainer installs

    def hook(m, i, o):
        out = neftune_hook(m, i, o)
        hooked.append((m.training, not torch.equal(out, o)))
        return out
    monkeypatch.setattr(setup, "neftune_hook", hook)
    assert train.main(args + ["--out", str(tmp_path / "ref")]) == 0
    if "--neftune-noise-alpha" in args:  # noise in every training forward, none in the evaluations
        assert set(hooked) == {(True, True), (False, False)}, hooked
    else:
        assert not hooked
    reference = losses(tmp_path / "ref")
    evals = [r["eval_loss"] for r in records(tmp_path / "ref") if "eval_loss" in r]  # before and after training
    assert len(reference) == 4 and len(evals) == 2 and evals[1] < evals[0] - 0.1, evals
    # Ctrl-C in step 2 (micro-steps 3 and 4): saved after it, then --resume gives the same run bit for bit
    calls, real = {"n": 0}, train.micro_step

    def micro_step(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **kw)
    monkeypatch.setattr(train, "micro_step", micro_step)
    out = tmp_path / "out"
    assert train.main(args + ["--out", str(out)]) == 130
    monkeypatch.setattr(train, "micro_step", real)
    assert losses(out) == reference[:2]
    assert train.main(args + ["--out", str(out), "--resume"]) == 0
    assert losses(out) == reference
    if "--modules-to-save" in args:  # the trained lm_head is in the adapter, and differs from the base's
        saved = load_file(out / "adapter" / "adapter.safetensors")
        base = Phi3.from_pretrained(small_tiny_args()[1]).lm_head.weight
        assert saved["lm_head.weight"].shape == base.shape and not torch.equal(saved["lm_head.weight"], base)
    if "--loraplus-lr-ratio" in args:  # the groups came back from the checkpoint with their roles
        state = torch.load(out / "checkpoints" / "step-0000004" / "optimizer.pt", weights_only=True)
        assert [g["loraplus"] for g in state["param_groups"]] == ["A", "embedding", "B", "B_no_decay"]
        lr_a, lr_emb, lr_b, lr_b0 = (g["lr"] for g in state["param_groups"])
        assert lr_a > 0 and (lr_emb, lr_b, lr_b0) == pytest.approx((lr_a * 1e-3 / 5e-3, lr_a * 4, lr_a * 4))

def test_neftune_is_refused_for_preference_objectives(tmp_path, capsys):
    assert train.main(COMMON + ["--objective", "dpo", "--neftune-noise-alpha", "5", "--data", "x.jsonl",
                                "--out", str(tmp_path / "o")]) == 2
    assert "--neftune-noise-alpha" in capsys.readouterr().err



def test_flags_reach_the_config():
    cfg = parse_config(small_tiny_args() + ["--loraplus-lr-ratio", "16", "--loraplus-lr-embedding", "1e-5",
                                            "--neftune-noise-alpha", "5"])
    assert (cfg["training"]["loraplus_lr_ratio"], cfg["training"]["loraplus_lr_embedding"],
            cfg["training"]["neftune_noise_alpha"]) == (16.0, 1e-5, 5.0)
