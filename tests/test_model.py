"""phi3mini against transformers' Phi3ForCausalLM: same random weights, saved by transformers, loaded by our loader."""
import json

import pytest
import torch

from helpers import make_hf_model, save_hf_checkpoint, small_tiny
from phi3lora.phi3mini import CheckpointError, ConfigError, Phi3, Phi3Config, generate

ATOL = 1e-4
LONGROPE = dict(max_position_embeddings=128, original_max_position_embeddings=32,
                rope_scaling={"type": "longrope",
                              "short_factor": [1.0 + 0.1 * i for i in range(8)],
                              "long_factor": [1.0 + 0.7 * i for i in range(8)]})
CONFIGS = {
    "sliding_window": dict(sliding_window=7),  # shorter than the 24-token sequences below
    "longrope": LONGROPE,
    "gqa": dict(num_key_value_heads=2),
    "partial_rotary_tied": dict(num_key_value_heads=2, partial_rotary_factor=0.5, tie_word_embeddings=True),
}


def pair(tmp_path, seed=0, **overrides):
    hf = make_hf_model(seed=seed, **overrides)
    ours = Phi3.from_pretrained(save_hf_checkpoint(hf, tmp_path / "ckpt"))
    return hf, ours


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path, name):
    hf, ours = pair(tmp_path, **CONFIGS[name])
    lengths = (20, 50) if name == "longrope" else (24,)  # LongRoPE: below and above original_max (32)
    for T in lengths:
        ids = torch.randint(0, 320, (2, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            ref = hf(ids).logits
            out = ours(ids)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    if name == "longrope":  # the two factor sets really differ: the long run must not equal a short-factor run
        assert ours.rotary.uses_long(49) and not ours.rotary.uses_long(31)


def test_padded_batches_match_transformers(tmp_path):
    hf, ours = pair(tmp_path, sliding_window=9)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 320, (3, 16), generator=g)
    lens = torch.tensor([16, 11, 5])
    right = (torch.arange(16)[None] < lens[:, None]).long()  # real tokens first
    left = right.flip(1)  # real tokens last
    for mask in (right, left):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            ref = hf(ids, attention_mask=mask, position_ids=pos).logits
            out = ours(ids, attention_mask=mask, position_ids=pos)
        real = mask.bool()
        torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=0)
        # and each row equals that row alone, unpadded
        for b in range(3):
            alone = ids[b][real[b]][None]
            with torch.no_grad():
                torch.testing.assert_close(out[b][real[b]], ours(alone)[0], atol=ATOL, rtol=0)


def test_gradients_match_transformers(tmp_path):
    hf, ours = pair(tmp_path, num_key_value_heads=2, sliding_window=6)
    hf.train(), ours.train()
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :4] = -100
    hf(ids, labels=labels).loss.backward()
    ours(ids, labels=labels).backward()
    hf_grads = dict(hf.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        ref = hf_grads[name].grad
        rel = (p.grad - ref).abs().max() / ref.abs().max().clamp(min=1e-12)
        assert rel < 1e-4, f"{name}: relative gradient error {rel:.2e}"
        checked += 1
    assert checked == len(hf_grads)


def test_greedy_generation_matches_transformers(tmp_path):
    hf, ours = pair(tmp_path, sliding_window=12)
    prompt = torch.randint(3, 320, (1, 9), generator=torch.Generator().manual_seed(5))
    ref = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0,
                      min_new_tokens=20)[0, 9:].tolist()
    assert generate(ours, prompt[0], max_new_tokens=20, stop_ids=[]) == ref


def _recompute_greedy(model, ids, n):
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(nxt)
            out.append(nxt)
    return out


def test_kv_cache_equals_recompute_and_longrope_crossing(tmp_path):
    hf, ours = pair(tmp_path, **LONGROPE)
    prompt = torch.randint(3, 320, (26,), generator=torch.Generator().manual_seed(6)).tolist()
    # 26 + 14 tokens crosses original_max_position_embeddings (32): the cache is rebuilt with the long factors
    cached = generate(ours, prompt, max_new_tokens=14, stop_ids=[])
    assert cached == _recompute_greedy(ours, prompt, 14)
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=14, do_sample=False, eos_token_id=None,
                      pad_token_id=0, min_new_tokens=14)[0, 26:].tolist()
    assert cached == ref


def test_left_padded_batch_generation_equals_each_alone(tmp_path):
    _, ours = pair(tmp_path, sliding_window=10)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (12, 5, 8)]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    batch = generate(ours, ids, max_new_tokens=10, attention_mask=mask, stop_ids=[])
    for p, row in zip(prompts, batch):
        assert row == generate(ours, p, max_new_tokens=10, stop_ids=[])


def test_generation_stops_on_stop_ids_and_sampling_is_seeded(tmp_path):
    _, ours = pair(tmp_path)
    prompt = [5, 6, 7]
    free = generate(ours, prompt, max_new_tokens=12, stop_ids=[])
    stop = free[3]
    assert generate(ours, prompt, max_new_tokens=12, stop_ids=[stop]) == free[: free.index(stop) + 1]
    a = generate(ours, prompt, 10, temperature=0.8, top_k=50, top_p=0.9, generator=torch.Generator().manual_seed(0))
    b = generate(ours, prompt, 10, temperature=0.8, top_k=50, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert a == b and len(a) == 10


def test_sampling_filters_equal_transformers_warpers():
    # temperature, then top-k, then top-p, as transformers' warpers: the same probabilities give the same draw
    # from the same generator, ties at the top-p boundary included (rounded logits have many)
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from phi3lora.phi3mini import sample_next
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        V = int(torch.randint(2, 300, (), generator=g))
        logits = (torch.randn(3, V, generator=g) * 4).round()
        t, k, p = 0.2 + float(torch.rand((), generator=g)), int(torch.randint(0, V + 5, (), generator=g)), \
            float(torch.rand((), generator=g))
        scores = TemperatureLogitsWarper(t)(None, logits.clone())
        scores = TopKLogitsWarper(k)(None, scores) if k > 0 else scores
        probs = TopPLogitsWarper(p)(None, scores).softmax(-1)
        want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(trial)).squeeze(-1)
        got = sample_next(logits, t, k, p, torch.Generator().manual_seed(trial))
        assert torch.equal(got, want), (trial, V, t, k, p)


def test_generate_restores_training_mode_after_an_error():
    model = small_tiny(seed=0).train()

    def stop(token):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(model, [5, 6, 7], max_new_tokens=3, on_token=stop)
    assert model.training


def test_default_stop_ids_come_from_the_generation_config_and_tokenizer():
    from phi3lora.phi3mini import Tokenizer, default_stop_ids
    model = small_tiny(seed=0)
    assert default_stop_ids(model) == [32000, 32001, 32007]  # the preset's: Phi-3-mini's generation_config.json
    model.generation_config = {}
    assert default_stop_ids(model) == [32000]  # config.json's eos_token_id alone
    assert default_stop_ids(model, Tokenizer.tiny()) == [32000, 32007]  # + the tokenizer's <|end|>


def test_our_save_pretrained_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    hf, ours = pair(tmp_path, **LONGROPE)
    ours.save_pretrained(tmp_path / "ours", max_shard_bytes=60_000)  # force a sharded checkpoint
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").float().eval()
    ids = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)
    again = Phi3.from_pretrained(tmp_path / "ours")  # and our own loader reads the shards
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids), atol=0, rtol=0)


def test_load_dtype_and_fresh_lora_free_model_is_eval(tmp_path):
    _, ours = pair(tmp_path)
    bf = Phi3.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())
    assert not bf.training and bf.rotary.inv_freq_short.device.type == "cpu"


# ----- bad input -------------------------------------------------------------------------------------------------
def test_missing_shard_is_a_clear_error(tmp_path):
    hf = make_hf_model()
    save_hf_checkpoint(hf, tmp_path / "c", max_shard_size="100KB")
    shards = sorted((tmp_path / "c").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=shards[-1].name):
        Phi3.from_pretrained(tmp_path / "c")


def test_wrong_shape_and_missing_tensor_are_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = make_hf_model()
    path = save_hf_checkpoint(hf, tmp_path / "c")
    sd = load_file(path / "model.safetensors")
    sd["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 65)
    del sd["model.layers.1.mlp.down_proj.weight"]
    sd["model.layers.1.extra.weight"] = torch.zeros(3)
    save_file(sd, path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        Phi3.from_pretrained(path)
    msg = str(e.value)
    assert "model.layers.0.self_attn.o_proj.weight: checkpoint (64, 65)" in msg
    assert "missing tensors (1): model.layers.1.mlp.down_proj.weight" in msg
    assert "unexpected tensors (1): model.layers.1.extra.weight" in msg


def test_integer_tensor_in_a_float_checkpoint_is_named(tmp_path):
    # issue 13.5: was a traceback from load_state_dict ("Only Tensors of floating point ... can require gradients")
    from safetensors.torch import load_file, save_file

    path = save_hf_checkpoint(make_hf_model(), tmp_path / "c")
    sd = load_file(path / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.int8)
    save_file(sd, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight \(model\.safetensors\): stored as int8"):
        Phi3.from_pretrained(path)


def test_an_index_that_leaves_out_tensors_is_named_as_the_cause(tmp_path):
    # issue 13.9: the missing tensors were listed with no hint that the index was at fault
    path = save_hf_checkpoint(make_hf_model(), tmp_path / "c", max_shard_size="100KB")
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    left_out = {k: v for k, v in index["weight_map"].items() if v != last}
    index_path.write_text(json.dumps({**index, "weight_map": left_out}))
    with pytest.raises(CheckpointError, match=f"{last} holds .* does not list it: the index is incomplete"):
        Phi3.from_pretrained(path)
    # the index maps a tensor to a shard that does not hold it
    from safetensors.torch import load_file, save_file

    index_path.write_text(json.dumps(index))
    shard = load_file(path / last)
    key = sorted(shard)[0]
    save_file({k: v for k, v in shard.items() if k != key}, path / last)
    with pytest.raises(CheckpointError, match=f"maps 1 of them to shards that do not hold them .*{key} -> {last}"):
        Phi3.from_pretrained(path)


def test_other_model_type_and_corrupt_file_are_clear_errors(tmp_path):
    hf = make_hf_model()
    path = save_hf_checkpoint(hf, tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type is 'llama'"):
        Phi3.from_pretrained(path)
    (path / "config.json").write_text(json.dumps(cfg))
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        Phi3.from_pretrained(path)
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        Phi3.from_pretrained(tmp_path / "nowhere")


def test_offline_hub_id_says_what_to_pass(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="local folder"):
        Phi3.from_pretrained("microsoft/Phi-3-mini-4k-instruct-does-not-exist")


# ----- config.json forms ---------------------------------------------------------------------------------------
PHI3_MINI_4K = {  # microsoft/Phi-3-mini-4k-instruct config.json (fields that matter)
    "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
    "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072,
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 4096, "model_type": "phi3",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "original_max_position_embeddings": 4096, "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.40.2", "use_cache": True, "vocab_size": 32064,
}


def test_from_hf_reads_the_hub_forms():
    c = Phi3Config.from_hf(PHI3_MINI_4K)
    assert c == Phi3Config()  # the defaults are Phi-3-mini-4k-instruct's
    with torch.device("meta"):
        n = Phi3(c).num_parameters()
    assert n == 3_821_079_552
    for kind in ("su", "longrope"):
        long = {**PHI3_MINI_4K, "max_position_embeddings": 131072, "sliding_window": 262144,
                "rope_scaling": {"type": kind, "short_factor": [1.0] * 48, "long_factor": [2.0] * 48}}
        c = Phi3Config.from_hf(long)
        assert c.rope_scaling["type"] == "longrope"
        want = (1 + torch.log(torch.tensor(32.0)) / torch.log(torch.tensor(4096.0))).sqrt()
        assert abs(c.rope_attention_factor - want) < 1e-6
    phi4 = {**PHI3_MINI_4K, "num_attention_heads": 24, "num_key_value_heads": 8, "partial_rotary_factor": 0.75,
            "tie_word_embeddings": True, "vocab_size": 200064, "hidden_size": 3072,
            "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.0] * 48},
            "max_position_embeddings": 131072}
    c = Phi3Config.from_hf(phi4)
    assert (c.head_dim, c.rotary_dim, c.num_key_value_heads) == (128, 96, 8)


def test_from_hf_refuses_what_it_cannot_honour():
    with pytest.raises(ConfigError, match="hidden_act"):
        Phi3Config.from_hf({**PHI3_MINI_4K, "hidden_act": "gelu"})
    with pytest.raises(ConfigError, match="rope_scaling type 'yarn'"):
        Phi3Config.from_hf({**PHI3_MINI_4K, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    with pytest.raises(ConfigError, match="short_factor needs 48"):
        Phi3Config.from_hf({**PHI3_MINI_4K, "rope_scaling": {"type": "su", "short_factor": [1.0] * 47,
                                                            "long_factor": [1.0] * 48}})
    with pytest.raises(ConfigError, match="resid_pdrop"):
        Phi3Config.from_hf({**PHI3_MINI_4K, "resid_pdrop": 0.1})


def test_triton_kernels_in_the_model_match_the_torch_path():
    # RMSNorm, RoPE, SwiGLU and the fused linear+cross-entropy switched on (Triton's interpreter on CPU) against the
    # plain torch path: the same loss and the same gradient for every weight. Odd sizes: T=13, GQA, partial rotary.
    torch.manual_seed(0)
    model = small_tiny(seed=0, vocab_size=96, num_key_value_heads=2, partial_rotary_factor=0.75).float()
    ids = torch.randint(0, 96, (2, 13))
    labels = ids.clone()
    labels[0, :4] = -100

    def loss_and_grads(on):
        model.zero_grad()
        model.set_kernels(on)
        loss = model(ids, labels=labels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref = loss_and_grads(False)
    loss, got = loss_and_grads(True)
    assert model.use_kernel and all(m.use_kernel for m in model.modules() if hasattr(m, "use_kernel"))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    with pytest.raises(ValueError, match="unknown kernel names"):
        model.set_kernels(flash=True)


def test_fused_loss_never_skips_an_lm_head_adapter():
    # the fused linear+cross-entropy reads lm_head.weight directly; with a LoRA adapter on lm_head the model must
    # take the plain path, so the adapter shapes the loss and gets its gradient
    from phi3lora import lora
    model = small_tiny(seed=0, vocab_size=96)
    lora.inject(model, lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["lm_head"]))
    with torch.no_grad():
        model.lm_head.lora_B.normal_(0, 0.5)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    model.set_kernels(fused_ce=False)
    ref = model(ids, labels=ids)
    model.set_kernels(fused_ce=True)
    loss = model(ids, labels=ids)
    loss.backward()
    torch.testing.assert_close(loss, ref)
    assert model.lm_head.lora_B.grad.abs().sum() > 0


# ----- review: LongRoPE far out, dtype casts, config.json defaults -----------------------------------------------
# a spread of microsoft/Phi-3.5-mini-instruct's real factors (its long factors reach 64.8), 8 per list for head_dim 16
PHI35_LONG = [1.08, 1.34, 2.62, 4.79, 12.2, 30.42, 50.34, 64.84]
PHI35_SHORT = [1.0, 1.05, 1.07, 1.16, 1.79, 2.02, 2.03, 2.84]


def test_longrope_far_positions_match_transformers(tmp_path):
    # inv_freq must be computed as transformers does, 1 / (factor * theta^(2i/d)): 1/theta^(2i/d)/factor differs in
    # the last bit for a third of the frequencies, which at position 130k moves cos/sin by ~1e-3
    hf, ours = pair(tmp_path, max_position_embeddings=131072, original_max_position_embeddings=4096,
                    rope_scaling={"type": "longrope", "short_factor": PHI35_SHORT, "long_factor": PHI35_LONG})
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(9))
    for start in (1000, 130000):  # short factors, long factors
        pos = (start + torch.arange(16)).expand(2, 16)
        with torch.no_grad():
            ref = hf(ids, position_ids=pos).logits
            out = ours(ids, position_ids=pos)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    hf_rope = hf.model.rotary_emb
    assert torch.equal(ours.rotary.inv_freq_short, hf_rope.original_inv_freq)
    assert torch.equal(ours.rotary.inv_freq_long, hf_rope.long_inv_freq)
    pos = (130000 + torch.arange(16))[None]
    for got, want in zip(ours.rotary(pos, True, torch.float32), hf_rope(torch.zeros(1), pos)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_dtype_cast_keeps_rope_frequencies_in_fp32(tmp_path):
    # model.to(torch.bfloat16) (and from_name(dtype=...)) must not round the RoPE frequencies to bf16: with 8 bits of
    # mantissa the angles are off by radians a few thousand positions in
    _, ours = pair(tmp_path, **LONGROPE)
    loaded = Phi3.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    cast = ours.to(torch.bfloat16)
    for m in (cast, small_tiny(dtype=torch.bfloat16)):
        assert m.rotary.inv_freq_short.dtype == m.rotary.inv_freq_long.dtype == torch.float32
    ids = torch.randint(0, 320, (1, 60), generator=torch.Generator().manual_seed(10))
    pos = (3000 + torch.arange(60))[None]
    with torch.no_grad():
        torch.testing.assert_close(cast(ids, position_ids=pos), loaded(ids, position_ids=pos), atol=0, rtol=0)
    torch.testing.assert_close(cast.rotary.inv_freq_long, loaded.rotary.inv_freq_long, atol=0, rtol=0)


def test_from_hf_absent_keys_take_transformers_defaults():
    # a config.json without sliding_window has no window in transformers (not Phi-3-mini-4k's 2047), and one without
    # original_max_position_embeddings uses 4096 (not max_position_embeddings)
    from transformers import Phi3Config as HFPhi3Config

    base = {k: v for k, v in PHI3_MINI_4K.items() if k not in ("sliding_window", "original_max_position_embeddings")}
    long = {**base, "max_position_embeddings": 131072, "rope_scaling": None,
            "rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48}}
    for d in (base, long):
        ours, theirs = Phi3Config.from_hf(d), HFPhi3Config(**d)
        assert ours.sliding_window == theirs.sliding_window is None
        assert ours.original_max_position_embeddings == theirs.original_max_position_embeddings == 4096
    assert Phi3Config.from_hf(long).rope_scale == 32.0


def test_from_hf_rope_parameters_take_priority_as_in_transformers():
    # transformers 5.x: values inside rope_parameters win over top-level rope_theta / partial_rotary_factor
    from transformers import Phi3Config as HFPhi3Config

    d = {**PHI3_MINI_4K, "rope_scaling": None, "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
         "rope_parameters": {"rope_type": "default", "rope_theta": 250000.0, "partial_rotary_factor": 0.5}}
    theirs = HFPhi3Config(**d).rope_parameters
    c = Phi3Config.from_hf(d)
    assert (c.rope_theta, c.partial_rotary_factor) == (theirs["rope_theta"], theirs["partial_rotary_factor"])
    # transformers takes original_max_position_embeddings from the top level (4096 when absent), never from inside
    # rope_parameters: a different value there cannot be honoured and is an error naming it
    lr = {**PHI3_MINI_4K, "rope_scaling": None, "max_position_embeddings": 131072,
          "rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.0] * 48,
                              "original_max_position_embeddings": 8192}}
    with pytest.raises(ConfigError, match="original_max_position_embeddings"):
        Phi3Config.from_hf(lr)


def test_from_hf_names_what_it_drops_or_refuses():
    with pytest.raises(ConfigError, match="quantization_config"):
        Phi3Config.from_hf({**PHI3_MINI_4K, "quantization_config": {"quant_method": "bitsandbytes"}})
    rs = {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.0] * 48,
          "short_mscale": 1.19, "long_mscale": 1.19}
    with pytest.warns(UserWarning, match="long_mscale"):
        Phi3Config.from_hf({**PHI3_MINI_4K, "max_position_embeddings": 131072, "rope_scaling": rs})


def test_left_padded_batch_generation_matches_transformers(tmp_path):
    # sliding window shorter than prompt + output, and LongRoPE crossing original_max (32) mid-generation
    hf, ours = pair(tmp_path, sliding_window=10, **LONGROPE)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (12, 5, 8)]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=25, do_sample=False, eos_token_id=None,
                      pad_token_id=0, min_new_tokens=25)[:, T:].tolist()
    assert generate(ours, ids, max_new_tokens=25, attention_mask=mask, stop_ids=[]) == ref


def test_from_pretrained_dtype_forms(tmp_path):
    # transformers-style dtype strings work; a dtype the weights cannot take is a clear error, not int8 weights
    _, ours = pair(tmp_path)
    assert next(Phi3.from_pretrained(tmp_path / "ckpt", dtype="bfloat16").parameters()).dtype == torch.bfloat16
    assert next(Phi3.from_pretrained(tmp_path / "ckpt", dtype="auto").parameters()).dtype == torch.float32
    for bad in (torch.int8, "float17"):
        with pytest.raises(ValueError, match="dtype"):
            Phi3.from_pretrained(tmp_path / "ckpt", dtype=bad)


def test_other_safetensors_next_to_the_model_are_not_loaded(tmp_path):
    # an adapter saved into the checkpoint folder is not part of the base model (transformers ignores it too)
    from safetensors.torch import save_file

    _, ours = pair(tmp_path)
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 64)},
              tmp_path / "ckpt" / "adapter_model.safetensors")
    again = Phi3.from_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, 320, (1, 8), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids), atol=0, rtol=0)


def test_short_attention_mask_with_a_cache_is_a_clear_error():
    from phi3lora.phi3mini import KVCache
    model = small_tiny(seed=0)
    cache = KVCache(model.config, 1, 16, torch.float32, "cpu")
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), cache=cache)
        with pytest.raises(ValueError, match="attention_mask has 1 columns"):
            model(torch.tensor([[8]]), attention_mask=torch.ones(1, 1), cache=cache)


def test_flops_per_token_counts_only_visible_keys():
    # attention FLOPs follow the keys each query really sees: all earlier ones, at most sliding_window of them
    def attention_flops(model, T):  # at T = 1 a query sees one key: 4·L·H·d
        c = model.config
        one = 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim
        return model.flops_per_token(T, training=False) - model.flops_per_token(1, training=False) + one

    def brute(model, T):
        c, w = model.config, model.config.sliding_window or T
        visible = sum(min(i + 1, w) for i in range(T)) / T
        return 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * visible

    for window in (None, 7, 40):
        model = small_tiny(sliding_window=window)
        for T in (1, 7, 8, 33, 100):
            assert abs(attention_flops(model, T) - brute(model, T)) < 1e-6 * brute(model, T)
    with torch.device("meta"):
        phi3 = Phi3(Phi3Config())
    n = phi3.num_parameters() - phi3.model.embed_tokens.weight.numel()
    attention = 3 * 4 * 32 * 32 * 96 * (2047 * 2048 / 2 + 2049 * 2047) / 4096
    assert phi3.flops_per_token(4096) - 4 * n == pytest.approx(attention)
