"""DoRA (use_dora) against peft 0.21 on transformers' Phi-3: forward and gradients (with and without dropout, on the
fused qkv_proj / gate_up_proj), adapter files both ways, merge / unmerge, the NF4 base, training and exact resume.

The base is a tiny random Phi3ForCausalLM with grouped-query attention (q, k, v slices of qkv_proj: 64, 32, 32 rows),
saved by transformers and loaded by our loader."""
import json
import os
import signal
from pathlib import Path

import peft
import pytest
import safetensors.torch
import torch

from helpers import make_hf_model, save_hf_checkpoint, small_tiny_args
from phi3lora import lora
from phi3lora.phi3mini import Phi3
from phi3lora.phi3mini.quant import Linear4bit, quantize_model

HF_KW = dict(num_key_value_heads=2)
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
IDS = torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_hf_checkpoint(make_hf_model(seed=0, **HF_KW), tmp_path_factory.mktemp("base") / "ckpt")


def perturb(named_params, seed, std=0.05):
    """Add the same noise to every LoRA tensor (A, B and the magnitude): B = 0 and m = ‖W‖ hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in named_params if "lora_" in n):
            p.add_(torch.randn(p.shape, generator=g) * std)


def peft_key(ours: str) -> str:
    """Our parameter name -> peft's (PeftModel.named_parameters, adapter "default")."""
    if "embed_tokens.lora_A" in ours or "embed_tokens.lora_B" in ours:
        return "base_model.model." + ours.replace(".lora_", ".lora_embedding_") + ".default"
    for part in ("lora_A", "lora_B", "lora_magnitude_vector"):
        if ours.endswith("." + part):
            return "base_model.model." + ours + ".default.weight"
    raise KeyError(ours)


def run(model, seed=0, ids=IDS):
    """Logits and the loss's gradients {name: grad} of a training-mode forward (dropout masks from seed)."""
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(ids)
    out = out.logits if hasattr(out, "logits") else out
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout, extra", [(0.0, ("embed_tokens", "lm_head")), (0.1, ())])
def test_peft_dora_adapter_loads_with_same_forward_and_gradients(ckpt, tmp_path, dropout, extra):
    # dropout 0.1 in training: peft rescales the base term of the dropped input, (m/‖·‖ − 1)·dropout(x)·Wᵀ; the
    # same seed gives both the same masks (one dropout call per layer, in the same order). An embedding's
    # magnitude is per embedding dimension (the norm of each column of W), as peft's
    hf = make_hf_model(seed=0, **HF_KW)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS + list(extra),
                                                 use_dora=True, lora_dropout=dropout))
    perturb(pm.named_parameters(), seed=4)
    pm.save_pretrained(tmp_path / "peft")
    keys = safetensors.torch.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.0.self_attn.qkv_proj.lora_magnitude_vector"].shape == (128,)

    ours = Phi3.from_pretrained(ckpt)
    lora.load_adapter(ours, tmp_path / "peft")
    qkv = ours.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, lora.Linear) and qkv.use_dora and ours.lora_config.use_dora
    theirs, their_grads = run(pm.train())
    mine, my_grads = run(ours.train())
    base = Phi3.from_pretrained(ckpt).eval()(IDS).detach()
    assert (mine - base).abs().max() > 1e-2
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
    assert len(my_grads) == len(their_grads) == (2 * 4 + len(extra)) * 3  # A, B, m of each adapted module
    if extra:
        assert ours.model.embed_tokens.lora_magnitude_vector.shape == (64,)
    for name, g in my_grads.items():
        torch.testing.assert_close(g, their_grads[peft_key(name)], atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(IDS), pm.eval()(IDS).logits, atol=1e-5, rtol=0)


def test_fused_merged_linear_dora_is_peft_on_the_fused_module(ckpt, tmp_path):
    # our qkv MergedLinear (adapters on q and v only) carries a magnitude per row of the fused weight; exported as
    # peft's one rank-2r adapter over qkv_proj with a block-structured B, peft computes the same, gradients too
    ours = Phi3.from_pretrained(ckpt)
    config = lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS + ["embed_tokens"],
                             use_dora=True, enable_lora=(True, False, True))
    lora.inject(ours, config)
    qkv = ours.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, lora.MergedLinear) and qkv.lora_magnitude_vector.shape == (128,)
    torch.testing.assert_close(qkv.lora_magnitude_vector, qkv.weight.norm(dim=1), atol=0, rtol=0)  # m = ‖W‖ at init
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(IDS), Phi3.from_pretrained(ckpt).eval()(IDS), atol=0, rtol=0)
    perturb(ours.named_parameters(), seed=5)
    lora.export_peft(ours, tmp_path / "peft", config)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["use_dora"] is True
    pm = peft.PeftModel.from_pretrained(make_hf_model(seed=0, **HF_KW), tmp_path / "peft", is_trainable=True)
    mine, my_grads = run(ours.train())
    theirs, their_grads = run(pm.train())
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
    for name, g in my_grads.items():
        if name.endswith("qkv_proj.lora_B"):  # ours: the q and v blocks of peft's block-structured B
            full = their_grads[peft_key(name)]  # (128, 8): q rows in columns 0:4, v rows in columns 4:8
            torch.testing.assert_close(g, torch.cat([full[:64, :4], full[96:, 4:]]), atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(g, their_grads[peft_key(name)], atol=1e-5, rtol=0)
    # the peft folder reads back into an equal model; split into q/k/v parts it needs every slice enabled
    again = Phi3.from_pretrained(ckpt)
    lora.load_adapter(again, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(IDS), ours.eval()(IDS), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="every slice enabled"):
        lora.export_peft(ours, tmp_path / "split", config, split_fused=True)


def test_split_export_of_dora_fuses_back_exactly(ckpt, tmp_path):
    ours = Phi3.from_pretrained(ckpt)
    config = lora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)
    lora.inject(ours, config)
    perturb(ours.named_parameters(), seed=6)
    lora.export_peft(ours, tmp_path / "split", config, split_fused=True)
    keys = safetensors.torch.load_file(tmp_path / "split" / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.0.self_attn.k_proj.lora_magnitude_vector"].shape == (32,)
    assert keys["base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector"].shape == (128,)
    again = Phi3.from_pretrained(ckpt)
    lora.load_adapter(again, tmp_path / "split")
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(IDS), ours.eval()(IDS), atol=1e-5, rtol=0)
    # our own format keeps the magnitudes too
    lora.save_adapter(ours, tmp_path / "ours")
    third = Phi3.from_pretrained(ckpt)
    lora.load_adapter(third, tmp_path / "ours")
    assert torch.equal(third.eval()(IDS), ours.eval()(IDS))


def test_dora_merge_and_unmerge_are_exact(ckpt):
    model = Phi3.from_pretrained(ckpt)
    lora.inject(model, lora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS + ["embed_tokens"], use_dora=True,
                                       enable_lora=(True, True, False)))
    perturb(model.named_parameters(), seed=7)
    weights = {n: m.weight.detach().clone() for n, m in lora.lora_layers(model)}
    with torch.no_grad():
        before = model.eval()(IDS)
        lora.merge(model)
        lora.merge(model)  # merging twice does nothing
        merged = model(IDS)
        qkv = model.model.layers[0].self_attn.qkv_proj
        # peft's merge: W' = m/‖W + s·B·A‖ · (W + s·B·A), row by row
        W = weights["model.layers.0.self_attn.qkv_proj"] + qkv.delta_weight()
        want = (qkv.lora_magnitude_vector / W.norm(dim=1)).view(-1, 1) * W
        torch.testing.assert_close(qkv.weight, want, atol=1e-6, rtol=0)
        lora.unmerge(model)
        after = model(IDS)
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=0)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    for n, m in lora.lora_layers(model):
        torch.testing.assert_close(m.weight, weights[n], atol=1e-6, rtol=0)


def test_dora_on_an_nf4_base_uses_the_dequantized_weight():
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128)
    ids = IDS % 128
    q, dense = quantize_model(Phi3.from_name("tiny", seed=0, **kw)), Phi3.from_name("tiny", seed=0, **kw)
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, Linear4bit):
                dense.get_submodule(name).weight.copy_(m.dequantized(torch.float32))
    config = lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True)
    lora.inject(q, config, dtype=torch.float32), lora.inject(dense, config, dtype=torch.float32)
    for a, b in zip(lora.lora_layers(q), lora.lora_layers(dense)):  # m = ‖dequant(W4)‖: the dense twin's
        torch.testing.assert_close(a[1].lora_magnitude_vector, b[1].lora_magnitude_vector, atol=1e-6, rtol=0)
    perturb(q.named_parameters(), seed=8)
    with torch.no_grad():
        dense.load_state_dict(lora.lora_state_dict(q), strict=False)
    (lq, gq), (ld, gd) = run(q.train(), ids=ids), run(dense.train(), ids=ids)
    torch.testing.assert_close(lq, ld, atol=1e-5, rtol=0)
    assert gq.keys() == gd.keys() and any(k.endswith("lora_magnitude_vector") for k in gq)
    for k in gq:
        torch.testing.assert_close(gq[k], gd[k], atol=1e-5, rtol=1e-4)
    with pytest.warns(UserWarning, match="4-bit base"):
        lora.merge(q)  # dense dequant(W4), the DoRA merge folded in fp32
    with torch.no_grad():
        torch.testing.assert_close(q.eval()(ids), dense.eval()(ids), atol=1e-5, rtol=0)


def test_dora_setting_is_checked():
    with pytest.raises(ValueError, match="use_dora must be a bool"):
        lora.LoraConfig(use_dora="yes")


# ----- training: the loss falls, resume is exact ----------------------------------------------------------------------
TINY = small_tiny_args() + ["--device", "cpu", "--dtype", "fp32", "--no-grad-checkpointing", "--no-packing",
                            "--lora-target-modules", "qkv_proj,o_proj,gate_up_proj,down_proj,lm_head",
                            "--lora-r", "8", "--lora-alpha", "16", "--log-every", "1000", "--use-dora",
                            "--max-steps", "6", "--batch-size", "2", "--lr", "5e-3", "--lora-dropout", "0.1",
                            "--save-every", "2", "--keep-last", "3"]


def losses(out):
    recs = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in recs if "loss" in r]


@pytest.mark.slow  # two CLI runs each, about 30 s on two cores; the quick training check is in test_lora_init.py
@pytest.mark.parametrize("variant", [["--use-dora"], ["--init-lora-weights", "pissa"],
                                     ["--init-lora-weights", "olora", "--use-dora"]],
                         ids=["dora", "pissa", "olora+dora"])
def test_training_with_each_variant_learns_and_resumes_exactly(tmp_path, monkeypatch, variant):
    # PiSSA / OLoRA: the resumed run re-runs the init on the fresh base (the same residual) before the saved A, B
    from phi3lora.cli import train
    flags = [a for a in TINY if a != "--use-dora"] + variant

    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in [("What is DoRA?", "Weight-decomposed LoRA."), ("Capital of France?", "Paris."),
                         ("2 + 2?", "4."), ("Who made Phi-3?", "Microsoft.")]]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ref = tmp_path / "ref"
    assert train.main(flags + ["--data", str(data), "--out", str(ref)]) == 0
    reference = losses(ref)
    assert len(reference) == 6 and reference[-1][1] < reference[0][1]  # it learns
    adapter = json.loads((ref / "adapter" / "adapter_config.json").read_text())
    assert adapter["lora"]["use_dora"] is ("--use-dora" in variant)
    assert adapter["lora"]["init_lora_weights"] == (variant[1] if variant[0] == "--init-lora-weights" else "kaiming")
    # Ctrl-C during step 4: saved after it, exit 130; --resume then gives the uninterrupted run bit for bit
    calls = {"n": 0}
    real = train.micro_step

    def interrupting(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kw)
    monkeypatch.setattr(train, "micro_step", interrupting)
    out = tmp_path / "out"
    assert train.main(flags + ["--data", str(data), "--out", str(out)]) == 130
    assert losses(out) == reference[:4]
    monkeypatch.undo()
    assert train.main(flags + ["--data", str(data), "--out", str(out), "--resume"]) == 0
    assert losses(out) == reference
