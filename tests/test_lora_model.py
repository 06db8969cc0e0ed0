"""LoRA on our Phi-3: invariants, adapter files, PEFT both ways (through transformers + peft), bad input.

The base is a tiny random Phi3ForCausalLM with grouped-query attention (4 heads, 2 KV heads: q, k, v slices of
qkv_proj are 64, 32, 32 rows), saved by transformers and loaded by our loader."""
import json
import os

import peft
import pytest
import safetensors.torch
import torch
from peft.utils.other import get_pattern_key

from phi3lora import lora
from helpers import make_hf_model, save_hf_checkpoint
from phi3lora.phi3mini import Phi3

HF_KW = dict(num_key_value_heads=2)
TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
IDS = torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_hf_checkpoint(make_hf_model(seed=0, **HF_KW), tmp_path_factory.mktemp("base") / "ckpt")


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids)


def randomize_lora(model, seed=1, std=0.05):
    """Random A and B (B = 0 would hide every mistake in the low-rank path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def injected(ckpt, seed=1, **config):
    model = Phi3.from_pretrained(ckpt)
    config = lora.LoraConfig(**{"r": 4, "lora_alpha": 8, **config})
    lora.inject(model, config)
    randomize_lora(model, seed)
    return model, config


# ----- invariants --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [TARGETS, TARGETS + ("lm_head", "embed_tokens")])
def test_fresh_injection_gives_base_logits_exactly(ckpt, targets):
    model = Phi3.from_pretrained(ckpt)
    base = logits(model)
    weights = {n: p for n, p in model.named_parameters()}
    lora.inject(model, lora.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    assert torch.equal(logits(model), base)
    # the very same weight Parameters, not copies
    after = dict(model.named_parameters())
    for n, p in weights.items():
        assert after[n] is p, n
    qkv = model.model.layers[1].self_attn.qkv_proj
    assert isinstance(qkv, lora.MergedLinear) and qkv.slice_sizes == [64, 32, 32]
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, lora.Linear)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n in after if "lora_" in n}
    assert model.lora_config.target_modules == targets
    if "embed_tokens" in targets:
        assert isinstance(model.model.embed_tokens, lora.Embedding)
        assert model.model.embed_tokens.padding_idx == 2
    with pytest.raises(ValueError, match="already has LoRA layers"):
        lora.inject(model, lora.LoraConfig())


def test_optimizer_step_changes_only_lora(ckpt):
    model = Phi3.from_pretrained(ckpt).train()
    lora.inject(model, lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.0)
    for _ in range(2):  # the first step moves B off zero, the second gives A a gradient
        opt.zero_grad()
        model(IDS, labels=IDS).backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
            assert p.grad is None
    changed = [n for n, p in trainable.items() if not torch.equal(p, start[n])]
    assert sorted(changed) == sorted(trainable) and len(trainable) == 2 * 4 * 2  # A, B x 4 modules x 2 layers


def hand_delta(m):
    """s·ΔW (out, in) built by hand from the layer's tensors, independent of the layer's own code."""
    A, B = m.lora_A.detach(), m.lora_B.detach()
    if isinstance(m, lora.MergedLinear):
        delta = torch.zeros(m.out_features, m.in_features)
        start, e, b_row = 0, 0, 0
        for size, on in zip(m.slice_sizes, m.enable_lora):
            if on:
                delta[start:start + size] = B[b_row:b_row + size] @ A[e * m.r:(e + 1) * m.r]
                e, b_row = e + 1, b_row + size
            start += size
        return m.scaling * delta
    return m.scaling * (B @ A)


@pytest.mark.parametrize("enable_lora", [(True, True, True), (True, False, True)])
def test_merge_equals_w_plus_s_b_a_and_is_idempotent(ckpt, enable_lora):
    model, _ = injected(ckpt, enable_lora=enable_lora, target_modules=TARGETS + ("lm_head",))
    unmerged = logits(model)
    layers = dict(lora.lora_layers(model))
    W0 = {n: m.weight.detach().clone() for n, m in layers.items()}
    lora.merge(model)
    for n, m in layers.items():
        assert m.merged
        torch.testing.assert_close(m.weight.detach(), W0[n] + hand_delta(m), atol=1e-6, rtol=0)
    once = {n: m.weight.detach().clone() for n, m in layers.items()}
    lora.merge(model)  # merging twice changes nothing
    for n, m in layers.items():
        assert torch.equal(m.weight, once[n])
    merged = logits(model)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert not torch.equal(merged, logits(Phi3.from_pretrained(ckpt)))  # the adapter is really in there
    lora.unmerge(model)
    for n, m in layers.items():
        torch.testing.assert_close(m.weight.detach(), W0[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)


def test_lora_params_take_the_base_dtype(ckpt):
    model = Phi3.from_pretrained(ckpt, dtype=torch.bfloat16)
    lora.inject(model, lora.LoraConfig(r=4))
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.lora_A.dtype == qkv.lora_B.dtype == torch.bfloat16
    model2 = Phi3.from_pretrained(ckpt, dtype=torch.bfloat16)
    lora.inject(model2, lora.LoraConfig(r=4), dtype=torch.float32)
    assert model2.model.layers[0].self_attn.qkv_proj.lora_A.dtype == torch.float32
    assert logits(model2).shape == (2, 11, 320)


def test_print_trainable_parameters(ckpt, capsys):
    model = Phi3.from_pretrained(ckpt)
    lora.inject(model, lora.LoraConfig(r=4))
    trainable, total = lora.print_trainable_parameters(model)
    # per layer: qkv A (12, 64) + B (128, 4), o (4, 64) + (64, 4), gate_up (4, 64) + (256, 4), down (4, 128) + (64, 4)
    per_layer = 12 * 64 + 128 * 4 + 4 * 64 + 64 * 4 + 4 * 64 + 256 * 4 + 4 * 128 + 64 * 4
    assert trainable == 2 * per_layer
    assert total == sum(p.numel() for p in Phi3.from_pretrained(ckpt).parameters()) + trainable
    assert capsys.readouterr().out.strip() == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                                               f"trainable%: {100 * trainable / total:.4f}")


def test_lora_config_validation_and_round_trip():
    c = lora.LoraConfig(r=8, lora_alpha=16.5, target_modules=["qkv_proj"], enable_lora=[True, False, True])
    assert c.target_modules == ("qkv_proj",) and c.enable_lora == (True, False, True)
    assert lora.LoraConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    bad = [dict(r=0), dict(r=-2), dict(r=1.5), dict(r=True), dict(lora_alpha=0), dict(lora_dropout=1.0),
           dict(lora_dropout=-0.1), dict(bias="some"), dict(target_modules=()), dict(enable_lora=(False,) * 3)]
    for kw in bad:
        with pytest.raises(ValueError, match=next(iter(kw))):
            lora.LoraConfig(**kw)
    with pytest.raises(ValueError, match="unknown LoraConfig fields"):
        lora.LoraConfig.from_dict({"r": 4, "rank": 4})


def test_target_the_model_lacks_is_named(ckpt):
    model = Phi3.from_pretrained(ckpt)
    with pytest.raises(ValueError) as e:
        lora.inject(model, lora.LoraConfig(target_modules=("qkv_proj", "q_proj", "v_proj")))
    msg = str(e.value)
    assert "['q_proj', 'v_proj']" in msg and "qkv_proj" in msg and "gate_up_proj" in msg  # names the available ones
    assert not lora.lora_layers(model)  # nothing was swapped before the error
    with pytest.raises(ValueError, match=r"mlp \(a MLP\)"):
        lora.inject(model, lora.LoraConfig(target_modules=("mlp",)))


# ----- adapter files -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("merged", [False, True])
def test_save_load_round_trip_into_fresh_model(ckpt, tmp_path, merged):
    model, config = injected(ckpt, enable_lora=(True, False, True), use_rslora=True,
                             target_modules=TARGETS + ("embed_tokens",))
    expected = logits(model)
    if merged:
        lora.merge(model)
    lora.save_adapter(model, tmp_path / "adapter", config)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temporary folder left behind
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["format"] == "phi3-lora-adapter" and meta["format_version"] == 1
    assert meta["lora"] == config.to_dict() and meta["base_model"] == str(ckpt)
    assert meta["model"]["hidden_size"] == 64 and meta["model"]["num_key_value_heads"] == 2
    saved = safetensors.torch.load_file(tmp_path / "adapter" / "adapter.safetensors")
    assert set(saved) == {k for k in model.state_dict() if "lora_" in k}
    assert saved["model.layers.0.self_attn.qkv_proj.lora_A"].shape == (8, 64)

    fresh = Phi3.from_pretrained(ckpt)  # no LoRA layers: load_adapter injects them from the file
    lora.load_adapter(fresh, tmp_path / "adapter")
    assert fresh.lora_config == config
    assert fresh.model.layers[0].self_attn.qkv_proj.enable_lora == [True, False, True]
    assert torch.equal(logits(fresh), expected)  # A and B as they were, merged or not when saved

    # into a model that already has the same (merged) layers: it ends up merged with the loaded adapter
    again = Phi3.from_pretrained(ckpt)
    lora.inject(again, config)
    lora.merge(again)
    lora.load_adapter(again, tmp_path / "adapter")
    assert all(m.merged for _, m in lora.lora_layers(again))
    torch.testing.assert_close(logits(again), expected, atol=1e-5, rtol=0)


def test_load_into_model_with_other_lora_settings_fails(ckpt, tmp_path):
    model, config = injected(ckpt)
    lora.save_adapter(model, tmp_path / "a", config)
    other = Phi3.from_pretrained(ckpt)
    lora.inject(other, lora.LoraConfig(r=8, lora_alpha=8))
    with pytest.raises(lora.AdapterError, match=r"qkv_proj: adapter MergedLinear r=4 .* vs model MergedLinear r=8"):
        lora.load_adapter(other, tmp_path / "a")


def test_adapter_for_another_model_size_names_the_tensor(ckpt, tmp_path):
    big_ckpt = save_hf_checkpoint(make_hf_model(seed=3, hidden_size=96, **HF_KW), tmp_path / "big")
    big, config = injected(big_ckpt)
    lora.save_adapter(big, tmp_path / "big-adapter", config)
    model = Phi3.from_pretrained(ckpt)
    with pytest.raises(lora.AdapterError) as e:
        lora.load_adapter(model, tmp_path / "big-adapter")
    msg = str(e.value)
    assert "model.layers.0.self_attn.qkv_proj.lora_A: adapter (12, 96) vs model (12, 64)" in msg
    assert "hidden_size=96" in msg
    assert not lora.lora_layers(model)  # checked before anything changed


def test_corrupt_or_missing_files_are_named(ckpt, tmp_path):
    model, config = injected(ckpt)
    with pytest.raises(lora.AdapterError, match="nowhere: no such adapter folder"):
        lora.load_adapter(model, tmp_path / "nowhere")
    lora.save_adapter(model, tmp_path / "a", config)
    weights = tmp_path / "a" / "adapter.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # an interrupted copy
    with pytest.raises(lora.AdapterError, match=str(weights)):
        lora.load_adapter(Phi3.from_pretrained(ckpt), tmp_path / "a")
    weights.unlink()
    with pytest.raises(lora.AdapterError, match=f"{weights}: missing"):
        lora.load_adapter(Phi3.from_pretrained(ckpt), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(lora.AdapterError, match="adapter_config.json: not valid JSON"):
        lora.load_adapter(Phi3.from_pretrained(ckpt), tmp_path / "a")


def test_missing_and_unexpected_keys_are_listed(ckpt, tmp_path):
    model, config = injected(ckpt)
    lora.save_adapter(model, tmp_path / "a", config)
    path = tmp_path / "a" / "adapter.safetensors"
    tensors = safetensors.torch.load_file(path)
    tensors.pop("model.layers.1.mlp.down_proj.lora_B")
    tensors["model.layers.1.mlp.down_proj.lora_C"] = torch.zeros(2)
    safetensors.torch.save_file(tensors, path)
    with pytest.raises(lora.AdapterError) as e:
        lora.load_adapter(Phi3.from_pretrained(ckpt), tmp_path / "a")
    msg = str(e.value)
    assert "missing LoRA tensors (1): model.layers.1.mlp.down_proj.lora_B" in msg
    assert "unexpected tensors (1): model.layers.1.mlp.down_proj.lora_C" in msg


def assert_previous_adapter_kept(ckpt, tmp_path, first_logits):
    """After a failed save: only the adapter folder is left, and it still gives the first adapter's logits."""
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    fresh = Phi3.from_pretrained(ckpt)
    lora.load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(logits(fresh), first_logits)


def test_crash_during_save_keeps_previous_adapter(ckpt, tmp_path, monkeypatch):
    model, config = injected(ckpt)
    first = logits(model)
    lora.save_adapter(model, tmp_path / "adapter", config)
    randomize_lora(model, seed=9)

    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        lora.save_adapter(model, tmp_path / "adapter", config)
    monkeypatch.undo()
    assert_previous_adapter_kept(ckpt, tmp_path, first)
    # and a successful save replaces it
    lora.save_adapter(model, tmp_path / "adapter", config)
    fresh = Phi3.from_pretrained(ckpt)
    lora.load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(logits(fresh), logits(model))
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_save_refuses_to_replace_a_folder_that_is_not_an_adapter(ckpt, tmp_path):
    model, config = injected(ckpt)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(lora.AdapterError, match="not an adapter folder"):
        lora.save_adapter(model, tmp_path, config)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ----- PEFT --------------------------------------------------------------------------------------------------------
def peft_logits(folder, ids=IDS):
    hf = make_hf_model(seed=0, **HF_KW)  # the same weights as ckpt
    with torch.no_grad():
        base = hf(ids).logits
        model = peft.PeftModel.from_pretrained(hf, folder).eval()
        return model(ids).logits, base


@pytest.mark.parametrize("enable_lora, use_rslora, extra", [
    ((True, True, True), False, ()),
    ((True, False, True), False, ("lm_head",)),
    ((False, True, False), True, ("embed_tokens",)),
    ((True, False, True), True, ()),
])
def test_export_peft_loads_in_peft_with_same_logits(ckpt, tmp_path, enable_lora, use_rslora, extra):
    model, config = injected(ckpt, enable_lora=enable_lora, use_rslora=use_rslora, target_modules=TARGETS + extra)
    ours = logits(model)
    lora.export_peft(model, tmp_path / "peft", config, base_model_name_or_path="microsoft/Phi-3-mini-4k-instruct")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == "microsoft/Phi-3-mini-4k-instruct"
    n = sum(enable_lora)
    # one top-level r (the largest rank: qkv_proj's 4·n) with the scaling every module has; the others' ranks
    # in rank_pattern for peft, with the alpha that keeps their scaling
    others = {m: 4 for m in TARGETS[1:] + extra}
    assert (cfg["r"], cfg["rank_pattern"]) == ((4 * n, others) if n > 1 else (4, {}))
    s = 8 / (2 if use_rslora else 4)
    assert cfg["lora_alpha"] == pytest.approx(s * ((4 * n) ** 0.5 if use_rslora else 4 * n))
    keys = safetensors.torch.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"].shape == (4 * n, 64)
    assert keys["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"].shape == (128, 4 * n)
    theirs, base = peft_logits(tmp_path / "peft")
    assert (ours - base).abs().max() > 1e-2  # the adapter changes the output...
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)  # ...the same way in peft


@pytest.mark.parametrize("variant", ["plain", "patterns_rslora_head_embed"])
def test_peft_adapter_loads_into_our_model(ckpt, tmp_path, variant):
    kw = dict(r=4, lora_alpha=8, target_modules=list(TARGETS), task_type="CAUSAL_LM")
    if variant != "plain":
        kw.update(target_modules=list(TARGETS) + ["lm_head", "embed_tokens"], use_rslora=True,
                  rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 3, "model.layers.1.self_attn.qkv_proj": 5})
    hf = make_hf_model(seed=0, **HF_KW)
    model = peft.get_peft_model(hf, peft.LoraConfig(**kw))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        theirs = model.eval()(IDS).logits
    model.save_pretrained(tmp_path / "peft")

    ours = Phi3.from_pretrained(ckpt)
    lora.load_adapter(ours, tmp_path / "peft")
    assert isinstance(ours.model.layers[0].self_attn.qkv_proj, lora.Linear)  # peft's one adapter over q, k, v
    if variant != "plain":
        assert ours.model.layers[0].self_attn.o_proj.r == 2
        assert ours.model.layers[1].self_attn.qkv_proj.lora_alpha == 5
        assert isinstance(ours.model.embed_tokens, lora.Embedding)
    base = logits(Phi3.from_pretrained(ckpt))
    assert (theirs - base).abs().max() > 1e-2
    torch.testing.assert_close(logits(ours), theirs, atol=1e-4, rtol=0)
    # and on through our own format
    lora.save_adapter(ours, tmp_path / "ours")
    again = Phi3.from_pretrained(ckpt)
    lora.load_adapter(again, tmp_path / "ours")
    assert torch.equal(logits(again), logits(ours))


def test_peft_features_we_cannot_honour_are_refused(ckpt, tmp_path):
    model, config = injected(ckpt)
    lora.export_peft(model, tmp_path / "peft", config)
    cfg_path = tmp_path / "peft" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    for field, value in [("lora_bias", True), ("bias", "all"), ("layer_replication", [[0, 1]])]:
        cfg_path.write_text(json.dumps({**cfg, field: value}))
        with pytest.raises(lora.AdapterError, match=field):
            lora.load_adapter(Phi3.from_pretrained(ckpt), tmp_path / "peft")
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "peft" / "adapter_model.safetensors").rename(tmp_path / "peft" / "adapter_model.bin")
    with pytest.raises(lora.AdapterError, match="pickle files are not loaded"):
        lora.load_adapter(Phi3.from_pretrained(ckpt), tmp_path / "peft")


def test_split_fused_export_is_exact(ckpt, tmp_path):
    model, config = injected(ckpt, enable_lora=(True, False, True))
    lora.export_peft(model, tmp_path / "split", config, split_fused=True)
    cfg = json.loads((tmp_path / "split" / "adapter_config.json").read_text())
    tensors = safetensors.torch.load_file(tmp_path / "split" / "adapter_model.safetensors")
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert not any("k_proj" in k or "qkv_proj" in k or "gate_up_proj" in k for k in tensors)

    def part_delta(prefix, part, rows):
        """s·B·A of one split peft adapter, with peft's own pattern lookup for r and alpha; zeros if absent."""
        key = f"base_model.model.{prefix}.{part}"
        if f"{key}.lora_A.weight" not in tensors:
            return torch.zeros(rows, 64)
        A, B = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        module = f"{prefix}.{part}"
        alpha = cfg["alpha_pattern"].get(get_pattern_key(cfg["alpha_pattern"].keys(), module), cfg["lora_alpha"])
        r = cfg["rank_pattern"].get(get_pattern_key(cfg["rank_pattern"].keys(), module), cfg["r"])
        assert A.shape[0] == r and B.shape == (rows, r)
        return alpha / r * (B @ A)

    for i in range(2):
        attn, mlp = model.model.layers[i].self_attn, model.model.layers[i].mlp
        qkv = torch.cat([part_delta(f"model.layers.{i}.self_attn", p, n)
                         for p, n in [("q_proj", 64), ("k_proj", 32), ("v_proj", 32)]])
        torch.testing.assert_close(qkv, hand_delta(attn.qkv_proj), atol=1e-7, rtol=0)
        gate_up = torch.cat([part_delta(f"model.layers.{i}.mlp", p, 128) for p in ("gate_proj", "up_proj")])
        torch.testing.assert_close(gate_up, hand_delta(mlp.gate_up_proj), atol=1e-7, rtol=0)
        assert gate_up[:128].abs().max() > 0 and gate_up[128:].abs().max() > 0

    # our loader fuses the parts back: the same model
    fresh = Phi3.from_pretrained(ckpt)
    lora.load_adapter(fresh, tmp_path / "split")
    qkv = fresh.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, lora.MergedLinear) and qkv.enable_lora == [True, False, True]
    torch.testing.assert_close(logits(fresh), logits(model), atol=1e-5, rtol=0)


# ----- review additions -------------------------------------------------------------------------------------------
def test_failed_rename_into_place_restores_previous_adapter(ckpt, tmp_path, monkeypatch):
    # the old folder is renamed aside before the new one goes in: if that second rename fails, the old one must
    # come back under its name rather than stay behind as a stray .old- sibling
    model, config = injected(ckpt)
    first = logits(model)
    lora.save_adapter(model, tmp_path / "adapter", config)
    randomize_lora(model, seed=9)
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in os.fspath(src):
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        lora.save_adapter(model, tmp_path / "adapter", config)
    monkeypatch.undo()
    assert_previous_adapter_kept(ckpt, tmp_path, first)


def test_malformed_adapter_description_is_an_adapter_error(ckpt, tmp_path):
    model, config = injected(ckpt)
    lora.save_adapter(model, tmp_path / "a", config)
    cfg_path = tmp_path / "a" / "adapter_config.json"
    meta = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**meta, "layers": list(meta["layers"])}))
    with pytest.raises(lora.AdapterError, match="invalid adapter description"):
        lora.load_adapter(Phi3.from_pretrained(ckpt), tmp_path / "a")


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_peft_init_that_changes_base_weights_is_refused(ckpt, tmp_path, init):
    # peft re-runs these initialisations when it loads such a folder, rewriting the base weights (W - s·B₀·A₀);
    # loading the tensors onto the unchanged base would silently compute something else
    model, config = injected(ckpt)
    lora.export_peft(model, tmp_path / "peft", config)
    cfg_path = tmp_path / "peft" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "init_lora_weights": init}))
    fresh = Phi3.from_pretrained(ckpt)
    with pytest.raises(lora.AdapterError, match="init_lora_weights"):
        lora.load_adapter(fresh, tmp_path / "peft")
    assert not lora.lora_layers(fresh)
    for harmless in (True, False, "gaussian"):
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "init_lora_weights": harmless}))
        lora.load_adapter(Phi3.from_pretrained(ckpt), tmp_path / "peft")


def test_same_adapter_tolerates_alpha_rounding():
    a = lora.LayerSpec("Linear", 5, 2.5, use_rslora=True)
    assert a.same_adapter(lora.LayerSpec("Linear", 5, 2.5 / 5 ** 0.5 * 5 ** 0.5, use_rslora=True, lora_dropout=0.1))
    assert not a.same_adapter(lora.LayerSpec("Linear", 5, 2.6, use_rslora=True))
    assert not a.same_adapter(lora.LayerSpec("Linear", 4, 2.5, use_rslora=True))


def test_incomplete_peft_adapter_names_the_missing_key(ckpt, tmp_path):
    model, config = injected(ckpt, target_modules=TARGETS + ("embed_tokens",))
    lora.export_peft(model, tmp_path / "peft", config)
    path = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    tensors.pop("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
    tensors.pop("base_model.model.model.embed_tokens.lora_embedding_A")
    safetensors.torch.save_file(tensors, path)
    with pytest.raises(lora.AdapterError) as e:
        lora.load_adapter(Phi3.from_pretrained(ckpt), tmp_path / "peft")
    msg = str(e.value)
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in msg
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in msg


def test_split_peft_parts_of_wrong_shape_are_named(ckpt, tmp_path):
    model, config = injected(ckpt, enable_lora=(True, False, True))
    lora.export_peft(model, tmp_path / "split", config, split_fused=True)
    path = tmp_path / "split" / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    tensors[key] = tensors[key][:, :3].contiguous()  # rank 3 against A's rank 4
    safetensors.torch.save_file(tensors, path)
    with pytest.raises(lora.AdapterError, match=rf"{key}: adapter \(32, 3\) vs model \(32, 4\)"):
        lora.load_adapter(Phi3.from_pretrained(ckpt), tmp_path / "split")


def test_training_a_merged_model_warns(ckpt):
    # injected layers merge only when asked (merge_weights=False): train() after lora.merge must say that the
    # adapter is out of the forward pass instead of silently training nothing
    model = Phi3.from_pretrained(ckpt)
    lora.inject(model, lora.LoraConfig(r=4, target_modules=["qkv_proj"]))
    model.train()  # unmerged: no warning
    lora.merge(model)
    with pytest.warns(UserWarning, match="lora.unmerge"):
        model.train()
    lora.unmerge(model)
    model.train()


def test_adapter_folders_respect_the_umask(ckpt, tmp_path):
    # issue 13.9: folders were created 0700 and files 0600 (tempfile.mkdtemp)
    import stat
    old = os.umask(0o022)
    try:
        model, config = injected(ckpt)
        for folder in (lora.save_adapter(model, tmp_path / "a", config), lora.export_peft(model, tmp_path / "p")):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
            for f in folder.iterdir():
                assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    finally:
        os.umask(old)


def test_checkpoint_folder_points_at_its_adapter(ckpt, tmp_path):
    # issue 13.9: `--adapter run/checkpoints/step-N` said "missing (not an adapter folder?)"
    model, config = injected(ckpt)
    lora.save_adapter(model, tmp_path / "step-0000020" / "adapter", config)
    with pytest.raises(lora.AdapterError, match=r"step-0000020: not an adapter folder, .*point at .*0020/adapter"):
        lora.load_adapter(Phi3.from_pretrained(ckpt), tmp_path / "step-0000020")


def test_adapter_onto_another_base_of_the_same_shape_warns(ckpt, tmp_path):
    # issue 13.9: it loaded silently; the adapter now records its base's name and a few of its weights
    import warnings
    model, config = injected(ckpt)
    lora.save_adapter(model, tmp_path / "a", config)
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["base_model"] == str(ckpt) and "model.embed_tokens.weight" in meta["base_fingerprint"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora.AdapterWarning)  # the same base, in another dtype: no warning
        lora.load_adapter(Phi3.from_pretrained(ckpt, dtype=torch.bfloat16), tmp_path / "a")
    other = save_hf_checkpoint(make_hf_model(seed=1, **HF_KW), tmp_path / "other")
    with pytest.warns(lora.AdapterWarning, match="trained on base model .*other weights"):
        lora.load_adapter(Phi3.from_pretrained(other), tmp_path / "a")
