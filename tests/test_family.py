"""The Phi family against transformers: each member's shape (logits, greedy generation), Phi-4-mini's chat format
(text and ids against transformers' apply_chat_template with the published template), the format chosen from the
checkpoint, stop ids from the tokenizer and the model's config, presets."""
import json
import random
import warnings

import peft
import pytest
import safetensors.torch
import torch

from phi3lora import lora

from family import PHI4_SPECIAL, PHI4_TEMPLATE, SHAPES, write_phi4_tokenizer
from helpers import CONV, make_hf_model, save_hf_checkpoint, small_tiny, training_ids
from phi3lora.kernels.reference import apply_rope_reference
from phi3lora.phi3mini import Phi3, Phi3Config, Tokenizer, default_stop_ids, generate

ATOL = 1e-4
IGNORE = -100
END, EOS, ASSISTANT = PHI4_SPECIAL["<|end|>"], PHI4_SPECIAL["<|endoftext|>"], PHI4_SPECIAL["<|assistant|>"]
TOOLS = '[{"name": "get_weather", "description": "Weather of a city", "parameters": {"city": {"type": "str"}}}]'
PHI4_CONVERSATIONS = {
    "system": CONV,
    "no_system": CONV[1:],
    "tools": [{"role": "system", "content": "You call tools.", "tools": TOOLS},
              {"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'},
              {"role": "tool", "content": '{"temp": 21}'},
              {"role": "assistant", "content": "It is 21 degrees in Paris."}],
    "tools_none": [{"role": "system", "content": "Plain.", "tools": None}, {"role": "user", "content": "Hi"}],
    "unicode": [{"role": "user", "content": " Qu'est-ce que c'est? é ü 日本 😀\n"},
                {"role": "assistant", "content": "ΔW = B·A ✓  (two spaces)"}],
}


# ----- Phi-4-mini's chat format ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phi4_folder(tmp_path_factory):
    return write_phi4_tokenizer(tmp_path_factory.mktemp("phi4-tok"))


@pytest.fixture(scope="module")
def phi4(phi4_folder):
    return Tokenizer.from_pretrained(phi4_folder)


@pytest.fixture(scope="module")
def hf_phi4(phi4_folder):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast.from_pretrained(phi4_folder)


def hf_chat(hf, messages, add_generation_prompt, tokenize):
    out = hf.apply_chat_template(messages, chat_template=PHI4_TEMPLATE, tokenize=tokenize,
                                 add_generation_prompt=add_generation_prompt)
    if not tokenize:
        return out
    return list(out if isinstance(out, list) else out["input_ids"])


def test_phi4_format_is_chosen_from_the_template_and_its_ids_come_from_the_vocabulary(phi4):
    assert phi4.chat_format.name == "phi4" and phi4.template_known
    assert (phi4.end_id, phi4.eos_id, phi4.pad_id, phi4.bos_id) == (END, EOS, EOS, EOS)
    assert phi4.stop_ids == (END, EOS)
    assert set(phi4.roles) == {"system", "user", "assistant", "tool"}
    assert phi4.apply_chat_template(CONV[:2], add_generation_prompt=True) == \
        "<|system|>You are terse.<|end|><|user|>What is LoRA?<|end|><|assistant|>"


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("name", PHI4_CONVERSATIONS)
def test_phi4_chat_template_matches_transformers(phi4, hf_phi4, name, add_generation_prompt):
    messages = PHI4_CONVERSATIONS[name]
    if add_generation_prompt and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    text = hf_chat(hf_phi4, messages, add_generation_prompt, tokenize=False)
    assert phi4.apply_chat_template(messages, add_generation_prompt) == text
    ids = hf_chat(hf_phi4, messages, add_generation_prompt, tokenize=True)
    assert phi4.encode_chat(messages, add_generation_prompt) == ids == phi4.encode(text)


def test_phi4_random_conversations_match_transformers(phi4, hf_phi4):
    rng = random.Random(0)
    pieces = ["Hi", " lead", "trail ", "two\nlines", "日本", "😀", "say <|end|> now", "x", "  ", "€", "LoRA is"]
    for _ in range(30):
        msgs = [{"role": "system", "content": "S" + rng.choice(pieces)}] if rng.random() < 0.5 else []
        if msgs and rng.random() < 0.5:
            msgs[0]["tools"] = TOOLS
        for turn in range(rng.randint(1, 5)):
            content = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 3))) + "."
            msgs.append({"role": ("user", "assistant")[turn % 2], "content": content})
        assert phi4.encode_chat(msgs) == hf_chat(hf_phi4, msgs, False, tokenize=True)


def test_phi4_training_labels_cover_the_replies_and_their_end(phi4):
    messages = PHI4_CONVERSATIONS["tools"]
    ids, labels = training_ids(phi4, messages)
    assert ids == phi4.encode_chat(messages) and len(labels) == len(ids)
    # expected from each message's own encoding: the replies (after <|assistant|>) and their <|end|> train
    want = []
    for m in messages:
        text = phi4.apply_chat_template([m])[: -len("<|endoftext|>")]
        body = phi4.encode(text)
        want += [IGNORE] + body[1:] if m["role"] == "assistant" else [IGNORE] * len(body)
    assert labels == want + [IGNORE]
    assert sum(1 for y in labels if y == END) == 2 and ids[-1] == EOS
    # the prompt chat.py sends for the last reply is the prefix of the training ids before that reply
    prompt = phi4.encode_chat(messages[:-1], add_generation_prompt=True)
    assert ids[:len(prompt)] == prompt and prompt[-1] == ASSISTANT and labels[len(prompt)] != IGNORE


def test_format_follows_the_checkpoint_not_the_name(tmp_path, phi4):
    # no template: Phi-4-mini's special tokens (<|tool|>, <|/tool|>) decide
    bare = Tokenizer.from_pretrained(write_phi4_tokenizer(tmp_path / "bare", template=None))
    assert bare.chat_format.name == "phi4" and bare.encode_chat(CONV) == phi4.encode_chat(CONV)
    # a Phi-3 vocabulary in a folder named like Phi-4: Phi-3's format
    tiny = Tokenizer.tiny()
    tiny.save_pretrained(tmp_path / "Phi-4-mini-instruct")
    assert Tokenizer.from_pretrained(tmp_path / "Phi-4-mini-instruct").chat_format.name == "phi3"
    # an unknown template warns and names the format it falls back to
    cfg = json.loads((tmp_path / "bare" / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "bare" / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="renders and trains on the phi4 chat format"):
        Tokenizer.from_pretrained(tmp_path / "bare")
    # saving keeps the format (the template is written back)
    phi4.save_pretrained(tmp_path / "again")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = Tokenizer.from_pretrained(tmp_path / "again")
    assert again.chat_format.name == "phi4" and again.encode_chat(CONV) == phi4.encode_chat(CONV)


def test_phi35_and_hub_spelled_templates_are_phi3s_format():
    from phi3lora.phi3mini.chat_format import PHI3_CHAT_TEMPLATE, for_checkpoint
    phi35 = PHI3_CHAT_TEMPLATE.replace("message['role'] == 'system' %}",
                                       "message['role'] == 'system' and message['content'] %}")
    for template in (PHI3_CHAT_TEMPLATE, phi35, phi35.replace("\\n", "\n")):  # JSON-decoded: real newlines
        fmt, known = for_checkpoint(template, lambda text: True)
        assert (fmt.name, known) == ("phi3", True)
    assert for_checkpoint(PHI4_TEMPLATE, lambda text: False) == (for_checkpoint(None, lambda t: True)[0], True)


def test_tools_and_tool_role_refused_where_the_format_has_none(phi4):
    tiny = Tokenizer.tiny()
    with pytest.raises(ValueError, match=r"message 0 \(system\) has \"tools\".*phi3"):
        tiny.encode_chat(PHI4_CONVERSATIONS["tools"][:2])
    with pytest.raises(ValueError, match="message 1 has unknown role 'tool'"):
        tiny.encode_chat([CONV[1], {"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match=r"message 1 \(user\): \"tools\" must be a string .* on a system message"):
        phi4.encode_chat([CONV[0], {"role": "user", "content": "x", "tools": TOOLS}])
    with pytest.raises(ValueError, match=r"\"tools\" must be a string"):
        phi4.encode_chat([{"role": "system", "content": "x", "tools": [{"name": "f"}]}])


# ----- each member's shape against transformers --------------------------------------------------------------------
def pair(tmp_path, name):
    hf = make_hf_model(seed=1, **SHAPES[name])
    return hf, Phi3.from_pretrained(save_hf_checkpoint(hf, tmp_path / name))


@pytest.mark.parametrize("name", SHAPES)
def test_logits_and_greedy_generation_match_transformers(tmp_path, name):
    hf, ours = pair(tmp_path, name)
    assert ours.config.tie_word_embeddings == (name == "phi4-mini")
    long = "rope_scaling" in SHAPES[name]
    for T in ((20, 45) if long else (24,)):  # LongRoPE: below and above original_max_position_embeddings (32)
        ids = torch.randint(0, 320, (2, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            torch.testing.assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=0)
    # greedy decoding with the KV cache; from 24 tokens the LongRoPE members cross 32 and switch factor sets
    prompt = torch.randint(3, 320, (1, 24), generator=torch.Generator().manual_seed(5))
    ref = hf.generate(prompt, max_new_tokens=14, do_sample=False, eos_token_id=None, pad_token_id=0,
                      min_new_tokens=14)[0, 24:].tolist()
    assert generate(ours, prompt[0], max_new_tokens=14, stop_ids=[]) == ref


def test_phi4_mini_partial_rotary_leaves_the_last_quarter_of_each_head_unrotated(tmp_path):
    _, ours = pair(tmp_path, "phi4-mini")
    c = ours.config
    assert (c.head_dim, c.rotary_dim, len(c.rope_scaling["long_factor"])) == (16, 12, 6)
    q = torch.randn(1, c.num_attention_heads, 5, c.head_dim)
    pos = torch.arange(5)[None]
    cos, sin = ours.rotary(pos, False, torch.float32)
    q2, _ = apply_rope_reference(q, q[:, :c.num_key_value_heads], cos, sin)
    assert torch.equal(q2[..., 12:], q[..., 12:]) and not torch.allclose(q2[:, :, 1:, :12], q[:, :, 1:, :12])


# ----- presets ----------------------------------------------------------------------------------------------------
# (layers, hidden, intermediate, heads, kv heads, head_dim, rotary dim, vocab, tied, max positions, window)
PRESET_SHAPES = {
    "phi3-mini-4k": (32, 3072, 8192, 32, 32, 96, 96, 32064, False, 4096, 2047),
    "phi3-mini-128k": (32, 3072, 8192, 32, 32, 96, 96, 32064, False, 131072, 262144),
    "phi3.5-mini": (32, 3072, 8192, 32, 32, 96, 96, 32064, False, 131072, 262144),
    "phi3-medium-4k": (40, 5120, 17920, 40, 10, 128, 128, 32064, False, 4096, 2047),
    "phi3-medium-128k": (40, 5120, 17920, 40, 10, 128, 128, 32064, False, 131072, 131072),
    "phi4-mini": (32, 3072, 8192, 24, 8, 128, 96, 200064, True, 131072, 262144),
}
# parameter counts: Phi-3-mini 3.82 B, Phi-3-medium 13.96 B, Phi-4-mini 3.84 B (model cards: 3.8 B, 14 B, 3.8 B)
PRESET_PARAMS = {"phi3-mini-4k": 3_821_079_552, "phi3-medium-4k": 13_960_238_080, "phi4-mini": 3_836_021_760}


@pytest.mark.parametrize("name", PRESET_SHAPES)
def test_presets(name):
    from phi3lora.phi3mini.presets import PRESETS
    c = Phi3Config.from_name(name)
    got = (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
           c.head_dim, c.rotary_dim, c.vocab_size, c.tie_word_embeddings, c.max_position_embeddings, c.sliding_window)
    assert got == PRESET_SHAPES[name]
    assert c.original_max_position_embeddings == 4096 and (c.rope_scaling is not None) == (got[9] > 4096)
    assert PRESETS[name].hub_id.startswith("microsoft/")
    if name in PRESET_PARAMS:
        with torch.device("meta"):
            model = Phi3(c)
        assert model.num_parameters() == PRESET_PARAMS[name]
    if name == "phi4-mini":
        assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (199999, 199999, 199999)
        assert PRESETS[name].eos_ids == (200020, 199999)


def test_tiny_phi4_model_stops_on_its_own_ids(phi4):
    model = small_tiny(vocab_size=200064, bos_token_id=199999, eos_token_id=199999, pad_token_id=199999)
    model.generation_config = {"eos_token_id": [200020, 199999]}  # Phi-4-mini's generation_config.json
    assert default_stop_ids(model, phi4) == [200020, 199999]
    assert 32007 not in default_stop_ids(model, phi4)


# ----- tied embeddings with LoRA ------------------------------------------------------------------------------------
def randomize_lora(model, seed=2, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


IDS = torch.randint(0, 320, (2, 13), generator=torch.Generator().manual_seed(3))


def test_tied_model_saves_and_merges_tied_when_no_adapter_touches_the_tie(tmp_path):
    hf, ours = pair(tmp_path, "phi4-mini")
    lora.inject(ours, lora.LoraConfig(r=4, lora_alpha=8))
    randomize_lora(ours)
    with torch.no_grad():
        want = ours(IDS)
    lora.merge(ours)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight and ours.config.tie_word_embeddings
    ours.save_pretrained(tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is True
    names = set(safetensors.torch.load_file(tmp_path / "merged" / "model.safetensors"))
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    from transformers import AutoModelForCausalLM
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").float().eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, want, atol=1e-5, rtol=0)


def test_lora_on_a_tied_lm_head_matches_peft_and_merging_unties(tmp_path):
    hf, ours = pair(tmp_path, "phi4-mini")
    embed = ours.model.embed_tokens.weight.detach().clone()
    lora.inject(ours, lora.LoraConfig(r=4, lora_alpha=8, target_modules=("qkv_proj", "lm_head", "embed_tokens")))
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # the adapters share the frozen matrix
    randomize_lora(ours)
    with torch.no_grad():
        want = ours(IDS)
        base = hf(IDS).logits
    assert (want - base).abs().max() > 1e-2
    # peft on transformers' tied model computes the same (the adapters change outputs, never the shared matrix)
    lora.export_peft(ours, tmp_path / "peft")
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()(IDS).logits
    torch.testing.assert_close(theirs, want, atol=1e-5, rtol=0)
    # merging gives each side its own matrix; the merged checkpoint is untied and loads in transformers
    with pytest.warns(UserWarning, match="tied embeddings"):
        lora.merge(ours)
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight and not ours.config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), want, atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").float().eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, want, atol=1e-5, rtol=0)
    # and the original matrix was never written through
    lora.unmerge(ours)
    torch.testing.assert_close(ours.model.embed_tokens.weight.detach(), embed, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.lm_head.weight.detach(), embed, atol=1e-6, rtol=0)


# ----- a PEFT export that vLLM reads ------------------------------------------------------------------------------
VLLM_KEYS = ("r", "lora_alpha", "target_modules", "bias", "use_rslora", "use_dora", "modules_to_save")


def vllm_rule_logits(ckpt, folder, ids, max_lora_rank):
    """Logits of the base checkpoint plus the adapter read by vLLM's documented rules (vllm/lora/peft_helper.py,
    vllm/lora/models.py): only the keys above; one scaling lora_alpha / r (rsLoRA: / sqrt(r)) for every module;
    each module's rank from its tensors, at most --max-lora-rank; r above it refused; DoRA, biases and
    modules_to_save refused; rank_pattern / alpha_pattern never read."""
    cfg = {k: v for k, v in json.loads((folder / "adapter_config.json").read_text()).items() if k in VLLM_KEYS}
    assert not cfg.get("use_dora") and not cfg.get("modules_to_save") and cfg.get("bias", "none") == "none"
    assert cfg["r"] <= max_lora_rank
    scaling = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])
    tensors = safetensors.torch.load_file(folder / "adapter_model.safetensors")
    model = Phi3.from_pretrained(ckpt)
    modules = dict(model.named_modules())
    hooked = 0
    for key, A in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        assert name.rsplit(".", 1)[-1] in cfg["target_modules"]
        B = tensors[key.replace("lora_A", "lora_B")]
        assert A.shape[0] == B.shape[1] <= max_lora_rank

        def hook(module, inputs, out, A=A, B=B):
            return out + scaling * (inputs[0] @ A.T @ B.T)

        modules[name].register_forward_hook(hook)
        hooked += 1
    assert hooked
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("case", ["qkv_slices", "mixed_ranks_and_alphas_rslora"])
def test_peft_export_reads_the_same_in_peft_and_by_vllm_rules(tmp_path, case):
    hf, ours = pair(tmp_path, "phi3-medium-4k")
    ckpt = tmp_path / "phi3-medium-4k"
    if case == "qkv_slices":  # MergedLinear on q and v (rank 2·4 in peft's form), plain r 4 elsewhere
        lora.inject(ours, lora.LoraConfig(r=4, lora_alpha=16, enable_lora=(True, False, True)))
    else:  # a peft adapter with per-module ranks and alphas (patterns), loaded into ours
        kw = dict(r=4, lora_alpha=8, use_rslora=True, task_type="CAUSAL_LM",
                  target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                  rank_pattern={"o_proj": 2, "down_proj": 6}, alpha_pattern={"gate_up_proj": 3, "o_proj": 5})
        peft.get_peft_model(make_hf_model(seed=1, **SHAPES["phi3-medium-4k"]), peft.LoraConfig(**kw)) \
            .save_pretrained(tmp_path / "src")
        lora.load_adapter(ours, tmp_path / "src")
    randomize_lora(ours)
    with torch.no_grad():
        want = ours(IDS)
        base = hf(IDS).logits
    assert (want - base).abs().max() > 1e-2
    lora.export_peft(ours, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    top = max(t.shape[0] for k, t in safetensors.torch.load_file(tmp_path / "peft" / "adapter_model.safetensors")
              .items() if k.endswith("lora_A.weight"))
    assert cfg["r"] == top == (8 if case == "qkv_slices" else 6)
    assert lora.vllm_max_lora_rank(cfg["r"]) == 8
    got = vllm_rule_logits(ckpt, tmp_path / "peft", IDS, max_lora_rank=lora.vllm_max_lora_rank(cfg["r"]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()(IDS).logits
    torch.testing.assert_close(theirs, want, atol=1e-5, rtol=0)
    # and back into ours
    again = Phi3.from_pretrained(ckpt)
    lora.load_adapter(again, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(again(IDS), want, atol=1e-5, rtol=0)


def test_vllm_max_lora_rank():
    assert [lora.vllm_max_lora_rank(r) for r in (1, 8, 9, 16, 48, 64, 65, 512)] == [8, 8, 16, 16, 64, 64, 128, 512]
    with pytest.raises(ValueError, match="above 512"):
        lora.vllm_max_lora_rank(513)


def test_family_memory_bench_counts_the_presets():
    """bench/family_memory.py: base parameters as the presets' (a tied matrix once), LoRA parameters by hand."""
    import runpy
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "bench" / "family_memory.py"
    estimate = runpy.run_path(str(script), run_name="family_memory")["estimate"]
    row = estimate("phi4-mini", 16, 2048)
    assert row["params"] == PRESET_PARAMS["phi4-mini"]
    # per layer: qkv (A 3r x 3072, B (3072 + 2 x 1024) x r), o (r x 3072 + 3072 x r), gate_up, down
    per_layer = 48 * 3072 + 5120 * 16 + 2 * 16 * 3072 + 16 * 3072 + 16384 * 16 + 16 * 8192 + 3072 * 16
    assert row["lora_params"] == 32 * per_layer
    assert row["weights_gb"] == pytest.approx(2 * PRESET_PARAMS["phi4-mini"] / 1e9)
    assert row["activations_gb"] == pytest.approx(2048 * 32 * 3072 * 2 / 1e9)
