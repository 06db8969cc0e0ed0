"""phi3mini.probe: captured attention against transformers' eager attention, the logit lens, patching and
ablation against weight edits that must give the same outputs, LoRA norms against ΔW built in full."""
import pytest
import torch

from phi3lora import lora
from helpers import make_hf_model, save_hf_checkpoint
from phi3lora.phi3mini import Phi3
from phi3lora.lora import footprint
from phi3lora.interp import internals as probe

CONFIGS = {
    "plain": dict(),
    "sliding_window": dict(sliding_window=7),  # shorter than the 16-token sequences below: the window cuts
    "gqa": dict(num_key_value_heads=2),
}


def pair(tmp_path, **overrides):
    hf = make_hf_model(**overrides)
    return hf, Phi3.from_pretrained(save_hf_checkpoint(hf, tmp_path / "ckpt")).eval()


def ids_of(T=16, B=2, seed=0):
    return torch.randint(0, 320, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CONFIGS)
def test_attention_and_residual_match_transformers(tmp_path, name):
    hf, ours = pair(tmp_path, **CONFIGS[name])
    ids = ids_of()
    with torch.no_grad():
        ref = hf(ids, output_attentions=True, output_hidden_states=True)
        with probe.capture(ours, attention=True, residual=True) as cap:
            out = ours(ids)
    assert sorted(cap.attentions) == [0, 1]
    for layer, expected in enumerate(ref.attentions):
        assert cap.attentions[layer].shape == (2, 4, 16, 16)
        torch.testing.assert_close(cap.attentions[layer], expected, atol=1e-5, rtol=0)
    if name == "sliding_window":  # the window really cut: key 0 gets nothing from query 15
        assert (cap.attentions[0][:, :, 15, :9] == 0).all() and (cap.attentions[0][:, :, 15, 9:] > 0).all()
    # hidden_states: embeddings, then each block's output; the last one is after the final norm
    torch.testing.assert_close(cap.residual[0], ref.hidden_states[1], atol=1e-5, rtol=0)
    assert cap.residual[0].shape == (2, 16, 64)
    torch.testing.assert_close(out, ref.logits, atol=1e-4, rtol=0)


def test_attention_with_a_cache_and_padding_matches_eager_math(tmp_path):
    # the probe sees the same mask SDPA would: its output equals the SDPA path's on a left-padded, cached call
    _, ours = pair(tmp_path, sliding_window=5, num_key_value_heads=2)
    ids = ids_of(T=10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = ours(ids, attention_mask=mask, position_ids=pos)
        with probe.capture(ours, attention=True) as cap:
            probed = ours(ids, attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(probed, plain, atol=1e-5, rtol=0)
    assert (cap.attentions[1][1, :, 3:, :3] == 0).all()  # real tokens never look at the padding
    torch.testing.assert_close(cap.attentions[1].sum(-1), torch.ones(2, 4, 10))


def test_outputs_unchanged_and_hooks_removed(tmp_path):
    _, ours = pair(tmp_path, num_key_value_heads=2)
    ids = ids_of()
    with torch.no_grad():
        plain = ours(ids)
        with probe.capture(ours, residual=True, mlp=True, heads=True) as cap:
            hooked = ours(ids)
        with probe.capture(ours, attention=True, layers=[1]) as cap2:
            eager = ours(ids)
    assert torch.equal(hooked, plain)  # hooks only read
    torch.testing.assert_close(eager, plain, atol=1e-5, rtol=0)  # eager vs SDPA: rounding only
    assert cap.heads[0].shape == (2, 16, 4, 16) and cap.mlp[1].shape == (2, 16, 128)
    assert list(cap2.attentions) == [1]
    with pytest.raises(ZeroDivisionError):
        with probe.capture(ours, attention=True, residual=True):
            1 / 0
    for m in ours.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert getattr(m, "probe", None) is None
    with torch.no_grad():
        assert torch.equal(ours(ids), plain)


def test_mlp_activation_is_swiglu_of_gate_up(tmp_path):
    _, ours = pair(tmp_path)
    ids = ids_of()
    mlp = ours.model.layers[1].mlp
    seen = {}
    h = mlp.gate_up_proj.register_forward_hook(lambda m, a, out: seen.setdefault("gate_up", out))
    with torch.no_grad(), probe.capture(ours, mlp=True) as cap:
        ours(ids)
    h.remove()
    gate, up = seen["gate_up"].chunk(2, dim=-1)
    torch.testing.assert_close(cap.mlp[1], up * torch.nn.functional.silu(gate))


def test_logit_lens_of_the_last_layer_is_the_logits(tmp_path):
    _, ours = pair(tmp_path)
    ids = ids_of()
    with torch.no_grad():
        with probe.capture(ours, residual=True) as cap:
            logits = ours(ids)
        assert torch.equal(probe.lens_logits(ours, cap.residual[1]), logits)
    lens = probe.logit_lens(ours, ids, k=3)
    assert lens.layers == [0, 1] and lens.top_ids.shape == (2, 2, 16, 3)
    probs = logits.softmax(-1)
    top = probs.topk(3, dim=-1)
    assert torch.equal(lens.top_ids[-1], top.indices)
    torch.testing.assert_close(lens.top_probs[-1], top.values)
    assert torch.equal(lens.final_ids, logits.argmax(-1))
    torch.testing.assert_close(lens.final_probs[-1], top.values[..., 0])
    assert not torch.allclose(lens.final_probs[0], lens.final_probs[1])  # layer 0 reads differently


def test_ablating_a_head_equals_zeroing_its_o_proj_columns(tmp_path):
    _, ours = pair(tmp_path, num_key_value_heads=2)
    ids = ids_of()
    with torch.no_grad():
        plain = ours(ids)
        with probe.capture(ours, ablate_heads={0: [2]}):
            ablated = ours(ids)
        o = ours.model.layers[0].self_attn.o_proj.weight
        o[:, 2 * 16:3 * 16] = 0  # head 2 of 4, head_dim 16: its columns of o_proj
        reference = ours(ids)
    assert (ablated - plain).abs().max() > 1e-3
    torch.testing.assert_close(ablated, reference, atol=1e-6, rtol=0)


def test_patching_residual_and_mlp(tmp_path):
    _, ours = pair(tmp_path)
    clean, corrupt = ids_of(seed=1), ids_of(seed=2)
    with torch.no_grad():
        with probe.capture(ours, residual=True) as cap:
            clean_logits = ours(clean)
        # the residual after block 0 is all later blocks see: patching it in makes the corrupt run the clean one
        with probe.capture(ours, patch={("residual", 0): cap.residual[0]}):
            patched = ours(corrupt)
        torch.testing.assert_close(patched, clean_logits, atol=1e-5, rtol=0)
        with probe.capture(ours, patch={("mlp", 1): torch.zeros_like}):
            no_mlp = ours(clean)
        ours.model.layers[1].mlp.down_proj.weight.zero_()
        torch.testing.assert_close(no_mlp, ours(clean), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="patch keys"):
        with probe.capture(ours, patch={("nope", 0): torch.zeros_like}):
            pass
    with pytest.raises(ValueError, match="layers 0..1"):
        with probe.capture(ours, patch={("residual", 5): torch.zeros_like}):
            pass
    with pytest.raises(ValueError, match="expected a tensor of shape"), torch.no_grad():
        with probe.capture(ours, patch={("residual", 0): torch.zeros(3)}):
            ours(clean)


def adapted(tmp_path, seed=0):
    _, model = pair(tmp_path, num_key_value_heads=2)
    lora.inject(model, lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, enable_lora=(True, False, True),
                                       target_modules=("qkv_proj", "o_proj", "down_proj")))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_adapter_norms_equal_the_norms_of_the_full_delta(tmp_path):
    model = adapted(tmp_path)
    norms = footprint.adapter_norms(model)
    layers = dict(lora.lora_layers(model))
    assert [n.name for n in norms] == [n for n, m in layers.items() if m.has_lora] and len(norms) == 6
    for n in norms:
        delta = layers[n.name].delta_weight()  # s·B·A built in full (qkv: zero rows for the k slice)
        assert n.layer == int(n.name.split(".")[2]) and n.rank == 4
        assert n.frobenius == pytest.approx(torch.linalg.matrix_norm(delta).item(), rel=1e-5)
        assert n.spectral == pytest.approx(torch.linalg.matrix_norm(delta, ord=2).item(), rel=1e-5)


@pytest.mark.parametrize("merged", [False, True])
def test_adapter_effect_compares_base_and_adapted(tmp_path, merged):
    model = adapted(tmp_path)
    _, base = pair(tmp_path, num_key_value_heads=2)
    if merged:
        lora.merge(model)
    ids = ids_of()
    with torch.no_grad():
        adapted_logits, base_logits = model(ids), base(ids)
        with footprint.adapter_disabled(model):
            torch.testing.assert_close(model(ids), base_logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(ids), adapted_logits, atol=1e-6, rtol=0)
    assert all(m.merged == merged for _, m in lora.lora_layers(model))
    effect = footprint.adapter_effect(model, ids)
    lp_b = base_logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    lp_a = adapted_logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(effect.base_logprobs, lp_b, atol=1e-5, rtol=0)
    torch.testing.assert_close(effect.logprob_change, lp_a - lp_b, atol=1e-5, rtol=0)
    assert (effect.kl > 0).all() and effect.max_logit_change.shape == (2, 16)
    assert torch.equal(effect.adapted_top, adapted_logits.argmax(-1))


def test_a_fresh_adapter_changes_nothing(tmp_path):
    _, model = pair(tmp_path)
    lora.inject(model, lora.LoraConfig(r=2, lora_dropout=0.0))
    effect = footprint.adapter_effect(model.eval(), ids_of())
    assert effect.logprob_change.abs().max() == 0 and effect.kl.abs().max() < 1e-6
    assert all(n.frobenius == 0 for n in footprint.adapter_norms(model))
    with pytest.raises(ValueError, match="no LoRA adapter"):
        with footprint.adapter_disabled(pair(tmp_path)[1]):
            pass
