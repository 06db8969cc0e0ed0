"""The initialisations of peft 0.21 (init_lora_weights = gaussian, pissa, pissa_niter_K, olora) on transformers'
Phi-3: the same A, B and residual base weights, forward and gradients as peft; the export onto the original base
(peft's path_initial_model_for_weight_conversion) both ways; a short training run with each variant (DoRA too)
lowers the loss."""
import json

import peft
import pytest
import torch

from helpers import make_hf_model, save_hf_checkpoint
from phi3lora import lora
from phi3lora.phi3mini import Phi3

HF_KW = dict(num_key_value_heads=2)
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
IDS = torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_hf_checkpoint(make_hf_model(seed=0, **HF_KW), tmp_path_factory.mktemp("base") / "ckpt")


@pytest.fixture(scope="module")
def base_logits(ckpt):
    with torch.no_grad():
        return Phi3.from_pretrained(ckpt).eval()(IDS)


def perturb(named_params, seed, std=0.05):
    """The same noise on every LoRA tensor, in name order (as if both had trained the same way)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in named_params if "lora_" in n and "init" not in n):
            p.add_(torch.randn(p.shape, generator=g) * std)


def ours_with(ckpt, init, **kw):
    model = Phi3.from_pretrained(ckpt)
    config = lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=init,
                             **kw)
    lora.inject(model, config)
    return model, config


def peft_with(init, **kw):
    return peft.get_peft_model(make_hf_model(seed=0, **HF_KW), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=init, **kw))


def grads(model):
    model.zero_grad()
    out = model.train()(IDS)
    out = out.logits if hasattr(out, "logits") else out
    out.square().mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_changing_init_is_peft_exactly(ckpt, base_logits, init):
    ours, _ = ours_with(ckpt, init)
    pm = peft_with(init)
    their = dict(pm.named_parameters())
    qkv = ours.model.layers[0].self_attn.qkv_proj
    assert type(qkv) is lora.Linear  # one adapter over the fused q, k, v, as peft (the SVD / QR of the fused W)
    for name, m in lora.lora_layers(ours):  # the residual base, A₀ and B₀: peft's, to the last bit
        p = "base_model.model." + name
        for mine, theirs in ((m.weight, p + ".base_layer.weight"), (m.lora_A, p + ".lora_A.default.weight"),
                             (m.lora_B, p + ".lora_B.default.weight")):
            torch.testing.assert_close(mine, their[theirs], atol=1e-6, rtol=0)
    with torch.no_grad():  # residual + s·B₀·A₀ is the original model
        torch.testing.assert_close(ours.eval()(IDS), base_logits, atol=1e-5, rtol=0)
    perturb(ours.named_parameters(), 3), perturb(pm.named_parameters(), 3)
    (mine, g_mine), (theirs, g_theirs) = grads(ours), grads(pm)
    torch.testing.assert_close(mine, theirs.logits if hasattr(theirs, "logits") else theirs, atol=1e-5, rtol=0)
    assert len(g_mine) == 16
    for n, g in g_mine.items():
        torch.testing.assert_close(g, g_theirs[f"base_model.model.{n}.default.weight"], atol=1e-5, rtol=0)


def test_gaussian_and_pissa_niter_inits(ckpt, base_logits, tmp_path):
    ours, _ = ours_with(ckpt, "gaussian")
    for _, m in lora.lora_layers(ours):  # peft's gaussian: A ~ N(0, 1/r²), B = 0 (MergedLinear: per slice)
        assert not m.lora_B.any() and abs(m.lora_A.std().item() - 1 / 4) < 0.02
    with torch.no_grad():
        assert torch.equal(ours.eval()(IDS), base_logits)
    # randomized SVD with 2 iterations: W = residual + s·B₀·A₀ exactly; s·B₀·A₀ has rank 4 and nearly the energy of
    # W's top-4 part (the tiny random W's spectrum is flat, so the subspace itself is not pinned down)
    ours, config = ours_with(ckpt, "pissa_niter_2")
    o_proj = ours.model.layers[0].self_attn.o_proj
    W = Phi3.from_pretrained(ckpt).model.layers[0].self_attn.o_proj.weight.detach()
    torch.testing.assert_close(o_proj.weight + o_proj.delta_weight(), W, atol=1e-6, rtol=0)
    U, S, Vh = torch.linalg.svd(W)
    top = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    delta = o_proj.delta_weight().detach()
    assert torch.linalg.matrix_rank(delta) == 4 and delta.norm() > 0.9 * top.norm()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(IDS), base_logits, atol=1e-5, rtol=0)
    # our own format: loading onto the original base runs the same init again (its random draws are seeded)
    perturb(ours.named_parameters(), 4)
    lora.save_adapter(ours, tmp_path / "ours", config)
    again = Phi3.from_pretrained(ckpt)
    lora.load_adapter(again, tmp_path / "ours")
    assert again.lora_config.init_lora_weights == "pissa_niter_2"
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(IDS), ours.eval()(IDS), atol=1e-6, rtol=0)


@pytest.mark.parametrize("init, use_rslora", [("pissa", False), ("olora", True)])
def test_export_goes_onto_the_original_base_in_peft(ckpt, tmp_path, init, use_rslora):
    ours, config = ours_with(ckpt, init, use_rslora=use_rslora)
    perturb(ours.named_parameters(), 5)  # "trained"
    with torch.no_grad():
        mine = ours.eval()(IDS)
    lora.export_peft(ours, tmp_path / "peft", config)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 8 and not cfg["rank_pattern"]  # [A; A₀], [B, −B₀]
    pm = peft.PeftModel.from_pretrained(make_hf_model(seed=0, **HF_KW), tmp_path / "peft")  # the ORIGINAL base
    with torch.no_grad():
        torch.testing.assert_close(pm.eval()(IDS).logits, mine, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_converted_adapter_loads_on_the_original_base(ckpt, tmp_path, init):
    # peft's documented route: save the initial adapter (init_lora_weights set to True), train, then save with
    # path_initial_model_for_weight_conversion: a rank-2r plain LoRA for the original base
    pm = peft_with(init)
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(tmp_path / "initial")
    perturb(pm.named_parameters(), 6)
    with torch.no_grad():
        theirs = pm.eval()(IDS).logits
    pm.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    ours = Phi3.from_pretrained(ckpt)
    lora.load_adapter(ours, tmp_path / "converted")
    assert ours.model.layers[0].self_attn.o_proj.r == 8
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(IDS), theirs, atol=1e-5, rtol=0)


def test_init_settings_are_checked(ckpt):
    with pytest.raises(ValueError, match="init_lora_weights"):
        lora.LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match="enable_lora must be all True"):
        lora.LoraConfig(init_lora_weights="pissa", enable_lora=(True, False, True))
    # embeddings keep loralib's init under PiSSA (as peft's Embedding): their base weight is not touched
    model = Phi3.from_pretrained(ckpt)
    emb = model.model.embed_tokens.weight.detach().clone()
    lora.inject(model, lora.LoraConfig(target_modules=["embed_tokens", "o_proj"], init_lora_weights="pissa"))
    assert torch.equal(model.model.embed_tokens.weight, emb) and not model.model.embed_tokens.lora_A.any()
    assert "lora_A_init" in model.model.layers[0].self_attn.o_proj._buffers
    assert lora.LoraConfig(init_lora_weights=True).init_lora_weights == "kaiming"
    ours, config = ours_with(ckpt, "pissa", use_dora=True)
    with pytest.raises(ValueError, match="DoRA with init_lora_weights"):
        lora.export_peft(ours, "/nonexistent/never-written", config)


@pytest.mark.parametrize("init, use_dora", [("gaussian", False), ("pissa", False), ("olora", False),
                                            ("kaiming", True)])
def test_a_short_training_run_lowers_the_loss(ckpt, init, use_dora):
    model, _ = ours_with(ckpt, init, use_dora=use_dora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3)
    inputs, targets = IDS[:, :-1], IDS[:, 1:]
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.cross_entropy(model.train()(inputs).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_adapter_switched_off_is_the_original_base(ckpt, base_logits):
    # probe.py and the training log compare against the model with its adapters off: with DoRA (trained m) and a
    # PiSSA residual that must still be the original base, and the trained adapter must come back after
    from phi3lora.lora.footprint import adapter_disabled

    ours, _ = ours_with(ckpt, "pissa", use_dora=True)
    perturb(ours.named_parameters(), 7)
    with torch.no_grad():
        adapted = ours.eval()(IDS)
        with adapter_disabled(ours):
            off = ours(IDS)
        again = ours(IDS)
    torch.testing.assert_close(off, base_logits, atol=1e-5, rtol=0)
    assert (adapted - base_logits).abs().max() > 1e-2 and torch.equal(again, adapted)
