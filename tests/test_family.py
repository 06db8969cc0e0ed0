"""The Phi family against transformers: each member's shape (logits, greedy generation), Phi-4-mini's chat format
(text and ids against transformers' apply_chat_template with the published template), the format chosen from the
checkpoint, stop ids from the tokenizer and the model's config, presets."""
import json
import random
import warnings

import pytest
import torch

from family import PHI4_SPECIAL, PHI4_TEMPLATE, SHAPES, write_phi4_tokenizer
from helpers import CONV, make_hf_model, save_hf_checkpoint
from phi3mini import Phi3, Phi3Config, Tokenizer, default_stop_ids, generate

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
    ids, labels = phi4.encode_for_training(messages)
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
