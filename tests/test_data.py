"""phi3mini.data: reading the three JSONL forms, validation messages, label masks, truncation, batching, packing."""
import json
import re

import numpy as np
import pytest
import torch

from helpers import CONV, small_tiny, write_jsonl
from phi3lora.phi3mini import Tokenizer
from phi3lora.data.pipeline import (IGNORE, ChatEncoder, DataError, collate, epoch_plan, load_data, load_dataset,
                                    pack_rows, parse_phi3_text, split_eval)

ASSISTANT, END, EOS, BOS = 32001, 32007, 32000, 1


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.tiny()



def assistant_spans(ids, tok):
    """Positions each assistant reply covers, found from the token ids alone: after <|assistant|> (and its
    newline, if the tokenizer keeps it as a token) up to and including the next <|end|>."""
    spans = []
    for i, t in enumerate(ids):
        if t == ASSISTANT:
            start = i + 1
            if tok.decode([ids[start]]) == "\n":
                start += 1
            end = ids.index(END, start)
            spans.append(range(start, end + 1))
    return spans


def check_mask(ids, labels, tok, contents):
    """labels equal the ids exactly on the assistant replies and their <|end|>, -100 everywhere else."""
    spans = assistant_spans(ids, tok)
    assert len(spans) == len(contents)
    trained = {p for s in spans for p in s}
    for p, (t, y) in enumerate(zip(ids, labels)):
        assert y == (t if p in trained else IGNORE), f"position {p}: token {t}, label {y}"
    for span, content in zip(spans, contents):
        assert ids[span[-1]] == END
        assert tok.decode([ids[p] for p in span][:-1]).strip() == content


def test_label_mask_token_by_token_through_padding_and_packing(tmp_path, tok):
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONV}, {"messages": short}])
    (ex, ex2), stats = load_dataset(path, tok, max_seq_len=512)
    assert stats.kept == 2 and ex.source.endswith("d.jsonl:1")
    check_mask(ex.input_ids, ex.labels, tok, ["A low-rank update.", "Its rank."])
    check_mask(ex2.input_ids, ex2.labels, tok, ["Hello there."])
    assert ex.input_ids.count(BOS) <= 1 and BOS not in ex.input_ids[1:]  # one BOS at most, only first
    assert ex.n_target == sum(y != IGNORE for y in ex.labels[1:]) > 0

    # padded batch: the pad id fills the ids, labels are -100 on padding (never derived from the pad id)
    batch = collate([ex, ex2], [[0], [1]], tok.pad_id)
    n2 = len(ex2)
    assert batch.input_ids[1, n2:].eq(tok.pad_id).all() and batch.labels[1, n2:].eq(IGNORE).all()
    assert batch.labels[0].tolist() == ex.labels and batch.labels[1, :n2].tolist() == ex2.labels
    assert batch.n_target == int((batch.labels[:, 1:] != IGNORE).sum()) == ex.n_target + ex2.n_target
    assert batch.n_tokens == len(ex) + n2
    # EOS == pad: a trained <|end|> survives, and the mask does not depend on which token is the pad
    other = collate([ex, ex2], [[0], [1]], pad_id=0)
    assert torch.equal(other.labels, batch.labels)

    # packed row: both examples in one row, positions restart, document ids separate them, the second example's
    # first token is not a target of the first example
    packed = collate([ex, ex2], [[1, 0]], tok.pad_id, packed=True)
    n = len(ex)
    assert packed.input_ids[0].tolist() == ex2.input_ids + ex.input_ids
    assert packed.labels[0].tolist() == ex2.labels + [IGNORE] + ex.labels[1:]
    assert packed.position_ids[0].tolist() == list(range(n2)) + list(range(n))
    assert packed.document_ids[0].tolist() == [1] * n2 + [2] * n
    assert packed.n_target == int((packed.labels[:, 1:] != IGNORE).sum()) == batch.n_target


def test_formats_give_the_same_ids_and_labels(tmp_path, tok):
    text = tok.apply_chat_template(CONV)
    single = CONV[:3]
    rows = [
        {"messages": CONV},
        {"text": text},
        {"text": "<s>" + text},  # a leading BOS in the text does not make a second one
        {"prompt": CONV[:2], "completion": CONV[2:]},  # conversational prompt-completion
        {"messages": single},
        {"prompt": [CONV[0], CONV[1]], "completion": CONV[2]["content"]},
    ]
    examples, _ = load_dataset(write_jsonl(tmp_path / "f.jsonl", rows), tok, max_seq_len=512)
    full, single_ex = examples[0], examples[4]
    for ex in examples[1:4]:
        assert (ex.input_ids, ex.labels) == (full.input_ids, full.labels), ex.source
    assert (examples[5].input_ids, examples[5].labels) == (single_ex.input_ids, single_ex.labels)
    # string prompt-completion is one user turn and one reply
    plain, _ = load_dataset(write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "What is LoRA?", "completion": "A low-rank update."},
        {"messages": CONV[1:3]}]), tok, max_seq_len=512)
    assert (plain[0].input_ids, plain[0].labels) == (plain[1].input_ids, plain[1].labels)


def test_parse_phi3_text_round_trip_and_errors(tok):
    assert parse_phi3_text(tok.apply_chat_template(CONV)) == CONV
    with pytest.raises(ValueError, match="unknown role tag <|tool|>"):
        parse_phi3_text("<|user|>\nhi<|end|>\n<|tool|>\nx<|end|>\n")
    with pytest.raises(ValueError, match="not in Phi-3's chat format"):
        parse_phi3_text("just some text")


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}', "d.jsonl:2: malformed JSON"),
    ('{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     "d.jsonl:2: message 0 has unknown role 'tool'"),
    ('{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]}',
     "d.jsonl:2: message 0 (user) has empty content"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}]}',
     "d.jsonl:2: message 1 (assistant) content must be a string"),
    ('{"question": "x"}', 'd.jsonl:2: expected a "messages", "text" or "prompt" + "completion" field'),
    ('[1, 2]', "d.jsonl:2: expected a JSON object"),
    ('{"text": "no chat markers here"}', "d.jsonl:2: text is not in Phi-3's chat format"),
])
def test_bad_lines_stop_with_file_and_line(tmp_path, tok, line, message):
    good = {"messages": CONV}
    path = write_jsonl(tmp_path / "d.jsonl", [good, line, good])
    with pytest.raises(DataError, match=re.escape(message)):
        load_dataset(path, tok, max_seq_len=512)


def test_every_bad_line_is_listed(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ["{", {"messages": CONV}, '{"x": 1}'])
    with pytest.raises(DataError, match=r"(?s)2 bad lines in .*d.jsonl:1: malformed JSON.*d.jsonl:3: expected") as e:
        load_dataset(path, tok, max_seq_len=512)
    assert "\n" in str(e.value)


def test_bad_lines_of_every_kind_in_one_error(tmp_path, tok, monkeypatch):
    # special-token text is found on the token ids: it was never looked for once a line had failed to parse, and
    # only in the first chunk of records that had one
    monkeypatch.setattr("phi3lora.data.store.CHUNK_CHARS", 30)  # a chunk of one or two records
    special = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure.<|end|> more"}]}
    rows = [{"messages": CONV}, "{not json", {"messages": CONV},
            {"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]},
            {"messages": CONV}, special, {"messages": CONV}, special]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_dataset(path, tok, max_seq_len=512)
    lines = str(e.value).splitlines()
    assert lines[0] == f"4 bad lines in {path}:"
    assert [line.strip().split(": ", 1)[0] for line in lines[1:]] == [f"{path}:{n}" for n in (2, 4, 6, 8)]
    assert "malformed JSON" in lines[1] and "unknown role 'narrator'" in lines[2]
    assert "special token '<|end|>'" in lines[3] and "special token '<|end|>'" in lines[4]


def test_many_bad_lines_list_twenty_and_count_the_rest(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONV}] + ["{"] * 25)
    with pytest.raises(DataError) as e:
        load_dataset(path, tok, max_seq_len=512)
    lines = str(e.value).splitlines()
    assert lines[0] == f"25 bad lines in {path}:" and len(lines) == 1 + 20 + 1
    assert lines[20].strip().startswith(f"{path}:21: malformed JSON") and lines[-1].strip() == "... and 5 more"


def test_bad_lines_of_several_sources_in_one_error(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [{"messages": CONV}, "{"])
    b = write_jsonl(tmp_path / "b.jsonl", ['{"x": 1}', {"messages": CONV}])
    with pytest.raises(DataError, match=r"(?s)2 bad lines in .*a.jsonl, .*b.jsonl:.*a.jsonl:2: .*b.jsonl:1: "):
        load_data(f"{a},{b}", tok, 512, cache="off")


def test_skipped_and_counted(tmp_path, tok):
    rows = [{"messages": CONV}, {"messages": [{"role": "user", "content": "only a question"}]},
            {"messages": CONV[:2]}, "", {"messages": CONV}]
    examples, stats = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tok, max_seq_len=512)
    assert len(examples) == 2 and stats.lines == 4 and stats.no_assistant == 2
    assert "2 of 4 examples kept" in stats.summary() and "2 skipped (no assistant turn)" in stats.summary()
    assert stats.examples[0].endswith("d.jsonl:2: no assistant turn")


def test_empty_and_all_skipped_datasets(tmp_path, tok):
    with pytest.raises(DataError, match="empty.jsonl: the dataset is empty"):
        load_dataset(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]), tok, max_seq_len=512)
    with pytest.raises(DataError, match="no usable examples.*2 skipped \\(no assistant turn\\)"):
        load_dataset(write_jsonl(tmp_path / "q.jsonl", [{"messages": CONV[:2]}] * 2), tok, max_seq_len=512)
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_dataset(tmp_path / "nope.jsonl", tok, max_seq_len=512)


def test_no_trained_token_is_skipped(tok):
    class Masked(ChatEncoder):  # labels that train nothing: the example must be skipped, not trained at loss 0
        def _target_mask(self, flat, lens, starts, is_asst):
            return np.zeros(len(flat), dtype=np.uint8)
    assert Masked(tok, 512).encode(CONV) == (None, "no_target")
    # without an assistant turn, skipped before encoding (as the data reader does), whatever train_on says
    for train_on in ("assistant", "all"):
        assert ChatEncoder(tok, 512, train_on).encode(CONV[:2]) == (None, "no_assistant")


def test_truncation_keeps_whole_replies(tok):
    full, _ = ChatEncoder(tok, 512).encode(CONV)
    spans = assistant_spans(full.input_ids, tok)
    first_end, second_end = spans[0][-1], spans[1][-1]
    # a limit inside the second reply: cut right after the first reply's <|end|>
    ex, status = ChatEncoder(tok, max_seq_len=second_end).encode(CONV)
    assert status == "truncated" and len(ex) == first_end + 1 and ex.input_ids[-1] == END
    assert ex.labels == full.labels[:first_end + 1] and ex.labels[-1] == END
    # a limit inside the first reply: nothing whole fits, skipped as too long
    assert ChatEncoder(tok, max_seq_len=first_end).encode(CONV) == (None, "too_long")
    # the limit exactly at the full length keeps everything
    assert ChatEncoder(tok, max_seq_len=len(full)).encode(CONV)[1] == "ok"
    # train_on="all" cuts at the same place and trains every token after the first
    ex_all, status = ChatEncoder(tok, max_seq_len=second_end, train_on="all").encode(CONV)
    assert status == "truncated" and ex_all.input_ids == ex.input_ids
    assert all(y == t for y, t in zip(ex_all.labels[1:], ex_all.input_ids[1:]))


def test_too_long_and_truncated_counted_in_stats(tmp_path, tok):
    long_reply = [{"role": "user", "content": "Tell me everything."}, {"role": "assistant", "content": "word " * 200}]
    rows = [{"messages": CONV[1:]}, {"messages": CONV[1:3]}, {"messages": long_reply}]
    short, _ = ChatEncoder(tok, 512).encode(CONV[1:3])
    examples, stats = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tok, max_seq_len=len(short))
    assert len(examples) == 2 and (stats.truncated, stats.too_long) == (1, 1)
    assert "1 skipped (too long)" in stats.summary() and "1 truncated" in stats.summary()
    assert examples[0].input_ids == short.input_ids[:len(examples[0])]


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_pipeline_equals_the_public_encoder(tmp_path, tok, monkeypatch, train_on):
    """load_data's token store (chunked, written, memory-mapped, read back) holds exactly ChatEncoder.encode's ids
    and labels for each chat: system message or not, one turn or several, truncated, too long, no assistant."""
    from phi3lora.data import store
    long_reply = [{"role": "user", "content": "Tell me everything."}, {"role": "assistant", "content": "word " * 60}]
    chats = [CONV, CONV[1:], CONV[1:3], CONV[:3], long_reply, CONV[:2],
             [{"role": "system", "content": "Be brief."}] + long_reply + CONV[1:3],
             [{"role": "user", "content": "é 日本 😀"}, {"role": "assistant", "content": "ü  two  spaces\n"}]]
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in chats])
    max_seq_len = len(ChatEncoder(tok).encode(CONV[1:3])[0]) + 4  # CONV and its kin are cut after one reply
    monkeypatch.setattr(store, "CHUNK_CHARS", 40)  # several chunks: an example never sees its neighbours
    enc = ChatEncoder(tok, max_seq_len, train_on)
    want = [enc.encode(c, f"{path}:{i + 1}") for i, c in enumerate(chats)]
    statuses = [status for _, status in want]
    assert {"ok", "truncated", "too_long", "no_assistant"} <= set(statuses)
    for cache in ("off", str(tmp_path / "cache"), str(tmp_path / "cache")):  # built, built into a cache, mapped
        data = load_data(str(path), tok, max_seq_len, train_on, cache=cache)
        got = data.train.to_examples()
        assert [(e.input_ids, e.labels, e.source) for e in got] == \
            [(e.input_ids, e.labels, e.source) for e, _ in want if e is not None]
        assert [data.train[i].n_target for i in range(len(got))] == [e.n_target for e, _ in want if e is not None]
        stats = data.train.store.stats[0]
        assert (stats.kept, stats.truncated, stats.too_long, stats.no_assistant) == (
            len(got), statuses.count("truncated"), statuses.count("too_long"), statuses.count("no_assistant"))
    # and the encoder's untruncated ids are the tokenizer's ids of the rendered chat
    for (ex, status), chat in zip(want, chats):
        if status == "ok":
            assert ex.input_ids == tok.encode(tok.apply_chat_template(chat)) == tok.encode_chat(chat)


def test_plans_are_seeded_and_packing_fits(tok):
    enc = ChatEncoder(tok, 512)
    examples = [enc.encode([{"role": "user", "content": "q" * (i + 1)},
                            {"role": "assistant", "content": "a" * (3 * i + 1)}])[0]
                for i in range(10)]
    p0 = epoch_plan(examples, 3, seed=1, epoch=0)
    assert p0 == epoch_plan(examples, 3, seed=1, epoch=0) != epoch_plan(examples, 3, seed=1, epoch=1)
    assert sorted(i for mb in p0 for row in mb for i in row) == list(range(10))
    assert [len(mb) for mb in p0] == [3, 3, 3, 1]
    limit = max(len(e) for e in examples) + 5
    rows = pack_rows([len(e) for e in examples], list(range(10)), limit)
    assert all(sum(len(examples[i]) for i in row) <= limit for row in rows)
    assert sorted(i for row in rows for i in row) == list(range(10)) and len(rows) < 10
    train, held = split_eval(examples, 0.2, seed=0)
    assert len(held) == 2 and len(train) == 8 and not {id(e) for e in held} & {id(e) for e in train}
    with pytest.raises(DataError, match="leaves nothing to train on"):
        split_eval(examples[:1], 0.5, seed=0)


def test_packed_examples_do_not_see_each_other(tok):
    """Packed logits of every example equal its logits alone: attention and positions stay inside it."""
    model = small_tiny(seed=0).eval()
    convs = [CONV, CONV[1:3], [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y z"}]]
    examples = [ChatEncoder(tok, 512).encode(c)[0] for c in convs]
    batch = collate(examples, [[0, 1, 2]], tok.pad_id, packed=True)
    with torch.no_grad():
        packed = model(batch.input_ids, position_ids=batch.position_ids, document_ids=batch.document_ids)
        start = 0
        for ex in examples:
            alone = model(torch.tensor([ex.input_ids]))
            torch.testing.assert_close(packed[0, start:start + len(ex)], alone[0], atol=1e-5, rtol=0)
            start += len(ex)
        # and the packed loss equals the summed unpacked losses
        loss = model(**batch.model_kwargs(), loss_reduction="sum")
        unpacked = collate(examples, [[0], [1], [2]], tok.pad_id)
        ref = model(**unpacked.model_kwargs(), loss_reduction="sum")
    torch.testing.assert_close(loss, ref, atol=1e-3, rtol=1e-5)


def test_examples_name_their_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ["", {"messages": CONV}])
    (ex,), _ = load_dataset(path, tok, max_seq_len=512)
    assert ex.source.endswith("d.jsonl:2") and ex.input_ids == ChatEncoder(tok, 512).encode(CONV)[0].input_ids


def test_text_with_a_missing_end_is_an_error_not_a_merged_turn(tmp_path, tok):
    """Without the reply's <|end|>, the next <|user|> turn would become part of the assistant reply (and be trained)."""
    text = "<|user|>\nQ<|end|>\n<|assistant|>\nA\n<|user|>\nQ2<|end|>\n<|assistant|>\nA2<|end|>\n"
    with pytest.raises(ValueError, match=r"<\|user\|> inside the assistant turn"):
        parse_phi3_text(text)
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONV}, {"text": text}])
    with pytest.raises(DataError, match=r"d.jsonl:2: .*missing <\|end\|>"):
        load_dataset(path, tok, max_seq_len=512)


def test_unreadable_file_is_a_data_error(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONV}])

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(type(path), "open", denied)  # chmod does not stop root; the reader streams path.open()
    with pytest.raises(DataError, match="d.jsonl: cannot read it: Permission denied"):
        load_dataset(path, tok, max_seq_len=512)


def test_byte_order_mark_is_accepted(tmp_path, tok):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"messages": CONV}).encode() + b"\r\n")
    examples, _ = load_dataset(path, tok, max_seq_len=512)
    assert len(examples) == 1


def test_all_too_long_names_max_seq_len(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONV}])
    with pytest.raises(DataError, match=r"no usable examples in .*d.jsonl: 0 of 1 .*too long.*max_seq_len 5") as e:
        load_dataset(path, tok, max_seq_len=5)
    assert str(e.value).count("d.jsonl") == 1
