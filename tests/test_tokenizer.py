"""phi3mini.tokenizer: the tiny tokenizer's layout, round trips, Phi-3's chat format against transformers (rendered
text and token ids), training labels by token position (data.ChatEncoder, built on the tokenizer's public methods),
the prompt/training prefix invariant, streaming decode, saving and loading (ours and transformers' AutoTokenizer),
and the errors for bad folders and bad messages."""
import json
import random
import re
import time
import warnings

import pytest

from helpers import CONV, chat_encoder, training_ids
from phi3lora.data import ChatEncoder, DataError
from phi3lora.phi3mini import StreamDecoder, Tokenizer
from phi3lora.phi3mini.tiny import _TINY_WORDS, tiny_tokenizer_json
from phi3lora.phi3mini.tokenizer import PHI3_CHAT_TEMPLATE, TokenizerError

IGNORE = -100
BOS, EOS, ASSISTANT, SYSTEM, END, USER = 1, 32000, 32001, 32006, 32007, 32010

CONVERSATIONS = {
    "system": CONV,
    "no_system": CONV[1:],
    "single_user": CONV[1:2],
    "system_and_user": CONV[:2],
    "unicode": [{"role": "user", "content": "Qu'est-ce que c'est? é ü 日本 😀"},
                {"role": "assistant", "content": "Une adaptation de rang faible: ΔW = B·A ✓"}],
}
ROUND_TRIP = [
    "", "Hello world", "the rank of a LoRA adapter", " leading space", "trailing space ", "  two  spaces  ",
    "\n", "\n\nnewlines\nin between\n", "tabs\tand\r\nCRLF", "café naïve façade", "ünïcödé ß ø Æ",
    "日本語のテキストと中文", "emoji 😀👍🏽 and a family 👨‍👩‍👧", "€100 ≈ $108", "a\u00a0non-breaking space",
    "<not special> and <|not a token|>", "code: def f(x):\n    return x ** 2\n", "\x00\x01 control bytes",
    "ends with many spaces    ",
]
# fragments of random message contents: whitespace at either end, newlines, unicode, special-token text
FRAGMENTS = ["Hi", "Hello there!", " leading space", "trailing space ", "two\nlines", "\nstarts with a newline",
             "ends with a newline\n", "tabs\tinside", "café au lait", "日本語", "emoji 😀 ok", "What is LoRA?",
             "A low-rank update.", "x", "say <|end|> now", "<|user|> inside", "double  spaces", "12345", "€"]
# training data refuses special-token text in a content (data.ChatEncoder): its conversations leave those out
PLAIN_FRAGMENTS = [f for f in FRAGMENTS if "<|" not in f]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.tiny()


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf(saved):
    """transformers' generic fast tokenizer over our saved tokenizer.json."""
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast.from_pretrained(saved)


def hf_chat_ids(hf, messages, add_generation_prompt):
    out = hf.apply_chat_template(messages, chat_template=PHI3_CHAT_TEMPLATE, tokenize=True,
                                 add_generation_prompt=add_generation_prompt)
    # transformers 5 returns a BatchEncoding (return_dict defaults to True), 4.x a list
    return list(out if isinstance(out, list) else out["input_ids"])


def random_conversations(n, seed=0, fragments=FRAGMENTS):
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        msgs = [{"role": "system", "content": rng.choice(fragments)}] if rng.random() < 0.5 else []
        for turn in range(rng.randint(1, 6)):
            content = "".join(rng.choice(fragments) for _ in range(rng.randint(1, 3)))
            if not content.strip():
                content = "x"
            msgs.append({"role": ("user", "assistant")[turn % 2], "content": content})
        convs.append(msgs)
    return convs


def expected_chat(tok, messages):
    """ids and assistant-only labels built by hand from each content's own encoding (the whitespace a content
    starts with is absorbed by the rstrip role token before it)."""
    ids, labels = [], []
    role_id = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
    for m in messages:
        body = tok.encode(m["content"].lstrip()) + [END]
        ids += [role_id[m["role"]]] + body
        labels += [IGNORE] + (body if m["role"] == "assistant" else [IGNORE] * len(body))
    return ids + [EOS], labels + [IGNORE]


# ----- the tiny tokenizer ---------------------------------------------------------------------------------------
def test_tiny_has_phi3_ids_and_flags(tok):
    assert tok.vocab_size == 32011
    assert [tok.id_to_token(i) for i in (0, 1, 2, 3, 13, 258)] == ["<unk>", "<s>", "</s>", "<0x00>", "<0x0A>",
                                                                    "<0xFF>"]
    names = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
             "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
    assert [tok.token_to_id(n) for n in names] == list(range(32000, 32011))
    added = tok.backend.get_added_tokens_decoder()
    for i in range(32000, 32011):
        assert added[i].special and added[i].rstrip == (i != EOS) and not added[i].lstrip
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.end_id) == (1, 32000, 32000, 0, 32007)
    assert tok.stop_ids == (32007, 32000)
    assert tok.role_ids == {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


def test_tiny_is_deterministic_and_fast():
    start = time.perf_counter()
    text = tiny_tokenizer_json.__wrapped__()  # uncached build
    built = time.perf_counter() - start
    assert text == tiny_tokenizer_json.__wrapped__()
    assert built < 2.0, f"building the tiny vocabulary took {built:.2f} s"
    a, b = Tokenizer.tiny(), Tokenizer.tiny()
    s = "Hello there, what is the rank of this adapter? 日本 😀"
    assert a.encode(s) == b.encode(s)


def test_english_is_not_char_level(tok):
    s = "What is the rank of a LoRA adapter? I think the answer is in the model."
    ids = tok.encode(s)
    assert len(ids) < len(s) / 3
    assert tok.id_to_token(ids[0]) == "▁What"  # SentencePiece's word-start mark on the first word
    # every listed word is one piece: "▁word" and "▁Word" at a word start, "word" inside ("low-rank")
    words = _TINY_WORDS.split()
    for w in words:
        assert len(tok.encode(w)) == len(tok.encode(w[0].upper() + w[1:])) == 1, w
        if w.islower():
            assert tok.id_to_token(tok.encode("-" + w)[-1]) == w, w
    # unlisted words split into subword pieces, not characters
    assert len(tok.encode("interestingly thermal")) <= 8


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids) and 0 not in ids  # byte fallback: never <unk>


def test_round_trip_random_strings(tok):
    rng = random.Random(1)
    alphabet = "ab Z9 .,!?'\n\t\r" + "éüßøñ" + "日本語中文한국어" + "😀👍🏽€→∑" + "<|>"
    for _ in range(300):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert tok.decode(tok.encode(s)) == s, repr(s)


def test_metaspace_char_in_text_decodes_as_a_space(tok, hf):
    # Phi-3's (SentencePiece's) one lossy character: "▁" (U+2581) is how the vocabulary writes a space
    ids = tok.encode("a▁b")
    assert ids == tok.encode("a b") and tok.decode(ids) == "a b" == hf.decode(ids)
    assert ids == hf.encode("a▁b", add_special_tokens=False)


def test_decode_takes_tensors_and_skips_padding_ids(tok):
    torch = pytest.importorskip("torch")
    ids = tok.encode("Hi there")
    assert tok.decode(torch.tensor(ids)) == "Hi there"
    assert tok.decode(ids + [32011, 32063]) == "Hi there"  # the embedding's padding rows have no token


# ----- special tokens ---------------------------------------------------------------------------------------------
def test_special_tokens_in_text_and_rstrip(tok):
    # the whitespace after an rstrip token is absorbed; the content after it starts a new "▁" word
    assert tok.encode("<|user|>\nHi") == [USER] + tok.encode("Hi")
    assert tok.encode("<|user|>\n\n  Hi") == [USER] + tok.encode("Hi")
    assert tok.encode("<|user|>\n") == tok.encode("<|user|>") == [USER]
    assert tok.encode("<|assistant|>\n") == [ASSISTANT]
    assert tok.encode("x<|end|>\n<|assistant|>\n") == tok.encode("x") + [END, ASSISTANT]
    # <|endoftext|> is not rstrip: the newline after it stays text
    assert tok.encode("<|endoftext|>\n") == [EOS] + tok.encode("\n")
    # a partly spelled marker is plain text
    assert USER not in tok.encode("<|user") and END not in tok.encode("<|en") + tok.encode("d|>")
    assert tok.encode("Hi", add_bos=True) == [BOS] + tok.encode("Hi")
    ids = tok.encode("<|user|>\nHi<|end|>\n")
    assert tok.decode(ids, skip_special_tokens=True) == "Hi"
    assert tok.decode(ids) == "<|user|> Hi<|end|>"  # the newlines are gone: they live inside the special tokens


def test_decode_matches_transformers(tok, hf):
    for messages in CONVERSATIONS.values():
        ids = tok.encode_chat(messages)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


# ----- chat format ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_template_matches_transformers(tok, hf, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf.apply_chat_template(messages, chat_template=PHI3_CHAT_TEMPLATE, tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
    ids = tok.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    assert ids == hf_chat_ids(hf, messages, add_generation_prompt)
    assert ids == tok.encode(text)
    assert ids[0] == (SYSTEM if messages[0]["role"] == "system" else USER)  # no BOS
    assert ids[-1] == (ASSISTANT if add_generation_prompt else EOS)


def test_chat_template_text_exactly():
    # the Hub file's template text: Jinja string literals with backslash-n escapes, the eos token at the end
    assert "\n" not in PHI3_CHAT_TEMPLATE
    assert "{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}" in PHI3_CHAT_TEMPLATE
    assert PHI3_CHAT_TEMPLATE.endswith("{% else %}{{ eos_token }}{% endif %}")
    tok = Tokenizer.tiny()
    assert tok.apply_chat_template(CONV[:3]) == ("<|system|>\nYou are terse.<|end|>\n<|user|>\nWhat is LoRA?<|end|>\n"
                                                 "<|assistant|>\nA low-rank update.<|end|>\n<|endoftext|>")
    assert tok.apply_chat_template(CONV[1:2], add_generation_prompt=True) == \
        "<|user|>\nWhat is LoRA?<|end|>\n<|assistant|>\n"


def test_encode_chat_on_many_conversations(tok, hf):
    # per-message encoding == the rendered string's encoding == transformers' ids, whatever the contents hold
    # (whitespace the rstrip tokens absorb, newlines, unicode, special-token text)
    for messages in random_conversations(150):
        for agp in (False, True):
            ids = tok.encode_chat(messages, add_generation_prompt=agp)
            assert ids == tok.encode(tok.apply_chat_template(messages, add_generation_prompt=agp)), messages
            assert ids == hf_chat_ids(hf, messages, agp), messages
            assert BOS not in ids


# ----- training labels ----------------------------------------------------------------------------------------------
def test_training_labels_token_by_token(tok):
    ids, labels = training_ids(tok, CONV, train_on="assistant")
    want_ids, want_labels = expected_chat(tok, CONV)
    assert ids == want_ids == tok.encode_chat(CONV)
    assert labels == want_labels
    # read back from the token ids: trained spans are exactly each reply's content and its <|end|>
    spans, start = [], None
    for p, (t, y) in enumerate(zip(ids, labels)):
        assert y in (IGNORE, t)
        if y != IGNORE and start is None:
            start = p
        if y == IGNORE and start is not None:
            spans.append((start, p))
            start = None
    assert [ids[s - 1] for s, _ in spans] == [ASSISTANT, ASSISTANT]  # the role token itself is not trained
    assert [ids[e - 1] for _, e in spans] == [END, END]  # ... its <|end|> is
    assert [tok.decode(ids[s:e - 1]) for s, e in spans] == ["A low-rank update.", "Its rank."]
    assert labels[-1] == IGNORE and ids[-1] == EOS  # the closing eos (== pad) is not a target
    assert sum(y != IGNORE for y in labels) == len(tok.encode("A low-rank update.")) + len(tok.encode("Its rank.")) + 2

    ids_all, labels_all = training_ids(tok, CONV, train_on="all")
    assert ids_all == ids and labels_all == ids


def test_training_labels_on_many_conversations(tok):
    checked = 0
    for messages in random_conversations(100, seed=2, fragments=PLAIN_FRAGMENTS):
        if not any(m["role"] == "assistant" for m in messages):
            assert chat_encoder(tok).encode(messages) == (None, "no_assistant")
            continue
        checked += 1
        ids, labels = training_ids(tok, messages)
        assert (ids, labels) == expected_chat(tok, messages)
        assert ids == tok.encode_chat(messages) and len(labels) == len(ids)
        n_replies = sum(m["role"] == "assistant" for m in messages)
        assert sum(1 for p, y in enumerate(labels) if y == END and (p + 1 == len(labels) or labels[p + 1] == IGNORE)) \
            == n_replies  # every reply ends with a trained <|end|>
    assert checked > 50


def test_training_refuses_special_token_text(tok):
    # encode and apply_chat_template read "<|end|>" in a content as the token (as transformers does); trained, it
    # would teach the model to end a reply there, so the training encoder names the message instead
    checked = 0
    for messages in random_conversations(60, seed=6):
        bad = [i for i, m in enumerate(messages) if "<|" in m["content"]]
        if not bad or not any(m["role"] == "assistant" for m in messages):
            continue
        with pytest.raises(DataError, match=f"the conversation: message {bad[0]} .* contains the special token"):
            chat_encoder(tok).encode(messages)
        checked += 1
    assert checked > 10


def test_prompt_is_the_prefix_of_training_ids(tok):
    convs = list(CONVERSATIONS.values()) + random_conversations(60, seed=3, fragments=PLAIN_FRAGMENTS)
    checked = 0
    for messages in convs:
        if not any(m["role"] == "assistant" for m in messages):
            continue
        ids, labels = training_ids(tok, messages)
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = tok.encode_chat(messages[:k], add_generation_prompt=True)
            assert ids[:len(prompt)] == prompt
            # inside the prompt only the earlier replies are targets, and the prompt's <|assistant|> is not
            if any(m["role"] == "assistant" for m in messages[:k]):
                earlier = training_ids(tok, messages[:k])[1][:len(prompt) - 1]
            else:
                earlier = [IGNORE] * (len(prompt) - 1)
            assert labels[:len(prompt)] == earlier + [IGNORE]
            assert labels[len(prompt)] != IGNORE  # the reply starts right after the prompt
            if not any(m["role"] == "assistant" for m in messages[:k]):
                assert all(y == IGNORE for y in labels[:len(prompt)])
            checked += 1
    assert checked > 50


def test_no_double_bos(tok):
    text = tok.apply_chat_template(CONV)
    assert BOS not in tok.encode_chat(CONV) and BOS not in training_ids(tok, CONV)[0]
    assert tok.encode(text, add_bos=True).count(BOS) == 1
    assert tok.encode("<s>" + text).count(BOS) == 1  # a BOS spelled in the text is the only one


# ----- streaming ------------------------------------------------------------------------------------------------------
def stream(tok, ids, skip=True):
    dec = tok.stream_decoder(skip_special_tokens=skip)
    chunks = [dec.push(i) for i in ids]
    return chunks, dec.flush()


def test_stream_holds_incomplete_characters(tok):
    ids = tok.encode("€")
    assert [tok.id_to_token(i) for i in ids] == ["▁", "<0xE2>", "<0x82>", "<0xAC>"]
    chunks, rest = stream(tok, ids)
    assert chunks == ["", "", "", "€"] and rest == ""
    assert isinstance(tok.stream_decoder(), StreamDecoder)


@pytest.mark.parametrize("text", [s for s in ROUND_TRIP if s] + [
    "Voilà: crème brûlée, smörgåsbord, jalapeño.", "東京は日本の首都です。", "🤖🚀 rockets 🔥🔥 and 👩🏽‍💻",
    "mixed: é日😀 a b  c\n", "  space first, then a word"])
def test_stream_concatenates_to_decode(tok, text):
    ids = tok.encode(text)
    chunks, rest = stream(tok, ids)
    assert "".join(chunks) + rest == tok.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in c for c in chunks)  # a character is never split between chunks


@pytest.mark.parametrize("skip", [True, False])
def test_stream_chat_with_special_tokens(tok, skip):
    for messages in list(CONVERSATIONS.values()) + random_conversations(30, seed=4):
        ids = tok.encode_chat(messages)
        chunks, rest = stream(tok, ids, skip)
        assert "".join(chunks) + rest == tok.decode(ids, skip_special_tokens=skip)


def test_stream_flush_gives_what_was_held(tok):
    ids = tok.encode("ok 😀")[:-1]  # the emoji's last byte never arrives
    chunks, rest = stream(tok, ids)
    assert "".join(chunks) == "ok " and rest == tok.decode(ids)[3:] and "\ufffd" in rest


# ----- saving and loading -------------------------------------------------------------------------------------------
SAMPLES = ["Hello world", "<|user|>\nHi<|end|>\n<|assistant|>\n", "<s>x</s>y", " there <|en", "d|> friend",
           "é日😀 and\nnew lines  ", "<|endoftext|><|placeholder3|>"]


def test_from_pretrained_of_saved_folder_equals_original(tok, saved):
    assert sorted(p.name for p in saved.iterdir()) == ["special_tokens_map.json", "tokenizer.json",
                                                       "tokenizer_config.json"]
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["chat_template"] == PHI3_CHAT_TEMPLATE and config["pad_token"] == "<|endoftext|>"
    again = Tokenizer.from_pretrained(saved)
    assert again.vocab_size == tok.vocab_size and again.stop_ids == tok.stop_ids
    assert (again.bos_id, again.eos_id, again.pad_id, again.end_id) == (tok.bos_id, tok.eos_id, tok.pad_id, tok.end_id)
    for s in SAMPLES:
        assert again.encode(s) == tok.encode(s)
    again_encoder = ChatEncoder(again)
    for messages in random_conversations(20, seed=5, fragments=PLAIN_FRAGMENTS):
        assert again_encoder.encode(messages) == chat_encoder(tok).encode(messages)
    assert Tokenizer.from_pretrained(saved / "tokenizer.json").encode(SAMPLES[1]) == tok.encode(SAMPLES[1])
    assert again.chat_template == PHI3_CHAT_TEMPLATE


def test_saved_folder_loads_in_auto_tokenizer(tok, saved):
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(saved)
    for s in SAMPLES:
        assert auto.encode(s, add_special_tokens=False) == tok.encode(s), s
        assert auto(s)["input_ids"] == tok.encode(s), s  # no BOS added by the tokenizer.json either
        ids = tok.encode(s)
        assert auto.decode(ids) == tok.decode(ids)
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id, auto.unk_token_id) == (1, 32000, 32000, 0)
    for messages in (CONV, CONV[1:]):
        for agp in (False, True):  # the chat template saved in tokenizer_config.json
            assert auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp) == \
                tok.apply_chat_template(messages, add_generation_prompt=agp)


def test_chat_template_jinja_file_is_read(saved, tmp_path):
    # transformers 5 saves the template to chat_template.jinja instead of tokenizer_config.json
    (tmp_path / "tokenizer.json").write_text((saved / "tokenizer.json").read_text())
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    with pytest.warns(UserWarning, match="its chat_template is not Phi-3's"):  # kept, but the format is Phi-3's
        assert Tokenizer.from_pretrained(tmp_path).chat_template == "{{ messages }}"
    # Phi-3.5-mini's variant of the template is recognised as Phi-3's
    phi35 = PHI3_CHAT_TEMPLATE.replace("'system' %}", "'system' and message['content'] %}")
    (tmp_path / "chat_template.jinja").write_text(phi35)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Tokenizer.from_pretrained(tmp_path).chat_template == phi35


def test_special_tokens_map_overrides_and_added_tokens_are_checked(saved, tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_text((saved / name).read_text())
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<unk>"}}))
    assert Tokenizer.from_pretrained(folder).pad_id == 0
    config = json.loads((saved / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["32007"]["content"] = "<|stop|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: added token '<\|stop\|>' has id 32007"):
        Tokenizer.from_pretrained(folder)


# ----- bad input ----------------------------------------------------------------------------------------------------
def test_missing_or_malformed_files(tmp_path, saved):
    with pytest.raises(TokenizerError, match=re.escape(f"{tmp_path / 'tokenizer.json'}: no such file")):
        Tokenizer.from_pretrained(tmp_path)
    assert issubclass(TokenizerError, ValueError)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=re.escape(f"{tmp_path / 'tokenizer.json'}: not a valid tokenizer.json")):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text((saved / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match=re.escape(f"{tmp_path / 'tokenizer_config.json'}: not valid JSON")):
        Tokenizer.from_pretrained(tmp_path)


def test_vocabulary_without_chat_tokens(tmp_path):
    spec = json.loads(tiny_tokenizer_json())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < 32001]
    for name in [n for n, i in spec["model"]["vocab"].items() if i > 32000]:
        del spec["model"]["vocab"][name]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    plain = Tokenizer.from_pretrained(tmp_path)
    assert plain.decode(plain.encode("still works")) == "still works"
    assert plain.stop_ids == (32000,)
    with pytest.raises(TokenizerError, match="no <\\|system\\|>, <\\|user\\|>, <\\|assistant\\|>, <\\|end\\|> token"):
        plain.encode_chat(CONV)


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}],
     "message 1 has unknown role 'tool' (expected one of system, user, assistant)"),
    ([{"role": "user", "content": ""}], "message 0 (user) has empty content"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " \n "}],
     "message 1 (assistant) has empty content"),
    ([{"role": "user", "content": None}], "message 0 (user) content must be a string, got NoneType"),
    ([{"role": "user", "content": "hi"}, "hello"], "message 1 must be an object with \"role\" and \"content\""),
    ([{"content": "hi"}], "message 0 must be an object with \"role\" and \"content\""),
    ("just a string", "messages must be a list"),
])
def test_bad_messages_name_the_index(tok, messages, message):
    for call in (tok.apply_chat_template, tok.encode_chat, chat_encoder(tok).encode):
        with pytest.raises(ValueError) as e:
            call(messages)
        assert message in str(e.value)


def test_bad_train_on(tok):
    with pytest.raises(ValueError, match="train_on must be 'assistant' or 'all'"):
        ChatEncoder(tok, train_on="user")


def hub_like_folder(path):
    """Tokenizer files laid out like microsoft/Phi-3-mini-4k-instruct's (the tiny vocabulary stands in for the real
    one): tokenizer.json with a post-processor that adds <s>, and tokenizer_config.json as the Hub writes it: the
    template's '<|user|>\\n' is a JSON escape, so the parsed template holds real newlines; legacy false,
    LlamaTokenizer, add_bos_token false, </s> not special."""
    spec = json.loads(tiny_tokenizer_json())
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    spec["post_processor"] = {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos,
                                       {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS], "tokens": ["<s>"]}}}
    (path / "tokenizer.json").write_text(json.dumps(spec))
    added = {t["id"]: t for t in spec["added_tokens"]}
    config = {"add_bos_token": False, "add_eos_token": False, "bos_token": "<s>", "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "unk_token": "<unk>", "legacy": False, "model_max_length": 4096,
              "padding_side": "left", "tokenizer_class": "LlamaTokenizer", "clean_up_tokenization_spaces": False,
              "chat_template": PHI3_CHAT_TEMPLATE.replace("\\n", "\n"),
              "added_tokens_decoder": {str(i): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                   "single_word", "special")}
                                       for i, t in added.items()}}
    text = json.dumps(config, indent=2)
    assert "{{'<|user|>\\n' + message['content']" in text  # the Hub file's spelling
    (path / "tokenizer_config.json").write_text(text)
    return path


def test_hub_layout_loads_without_warning_and_encodes_the_same(tok, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the Hub's own template is Phi-3's: no "not Phi-3's" warning
        real = Tokenizer.from_pretrained(hub_like_folder(tmp_path))
    assert (real.bos_id, real.eos_id, real.pad_id, real.end_id, real.stop_ids) == (1, 32000, 32000, 32007,
                                                                                 (32007, 32000))
    assert real.encode("Hi") == tok.encode("Hi")  # the post-processor's <s> is not added
    real_encoder = ChatEncoder(real)
    for messages in CONVERSATIONS.values():
        for agp in (False, True):
            assert real.encode_chat(messages, add_generation_prompt=agp) == tok.encode_chat(messages, agp)
        assert real_encoder.encode(messages) == chat_encoder(tok).encode(messages)
