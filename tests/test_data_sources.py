"""Data formats, files, Hub-style folders, the token store and its cache (phi3mini.data_formats / data_files /
data_store, through phi3mini.data.load_data). The reference for ids and labels is ChatEncoder.encode on one
conversation, the encoder the label tests of test_data.py and test_tokenizer.py check token by token."""
import gzip
import json
import re

import numpy as np
import pytest

from helpers import CONV, chat_encoder, small_tiny_args, small_tiny_dir, write_jsonl
from phi3lora.phi3mini import Tokenizer
from phi3lora.data.pipeline import ChatEncoder, DataError, load_data, load_dataset, split_eval
from phi3lora.training.config import parse_config
from phi3lora.data.files import split_of

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

SHORT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.tiny()



def ids_labels(ex):
    return list(map(int, ex.input_ids)), list(map(int, ex.labels))


def reference(tok, messages, max_seq_len=512, train_on="assistant"):
    ex, _ = chat_encoder(tok, train_on, max_seq_len).encode(messages)
    return ids_labels(ex)


def test_every_form_gives_the_ids_of_its_messages(tmp_path, tok):
    sharegpt = {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                                   "value": m["content"]} for m in CONV]}
    parts = {"messages": [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in CONV]}
    split_parts = {"messages": CONV[:2] + [{"role": "assistant", "content": [
        {"type": "text", "text": "A low-rank"}, {"type": "text", "text": "update."}]}]}
    alpaca = {"instruction": "What is LoRA?", "input": "", "output": "A low-rank update.", "system": "You are terse."}
    alpaca_input = {"instruction": "Translate.", "input": "Hello", "output": "Bonjour"}
    rows = [{"messages": CONV}, sharegpt, parts, {"text": tok.apply_chat_template(CONV)},
            {"prompt": CONV[:2], "completion": CONV[2:]}, split_parts, alpaca, alpaca_input]
    examples, stats = load_dataset(write_jsonl(tmp_path / "mixed.jsonl", rows), tok, max_seq_len=512)
    assert stats.kept == len(rows)
    want = reference(tok, CONV)
    for ex in examples[:5]:
        assert ids_labels(ex) == want, ex.source
    assert ids_labels(examples[5]) == reference(tok, CONV[:2] + [{"role": "assistant",
                                                                  "content": "A low-rank\nupdate."}])
    assert ids_labels(examples[6]) == reference(tok, CONV[:3])
    assert ids_labels(examples[7]) == reference(tok, [{"role": "user", "content": "Translate.\n\nHello"},
                                                      {"role": "assistant", "content": "Bonjour"}])


def test_batched_store_equals_the_per_message_encoder(tmp_path, tok):
    """Truncation, skipping and train_on='all' of the chunked store agree with encoding each conversation alone, on
    conversations of many lengths."""
    rng = np.random.default_rng(0)
    words = "the model learns where replies stop , and why . é 東 \n  spaces".split(" ")
    convs = []
    for i in range(60):
        msgs = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
        for t in range(1 + i % 3):
            for role in ("user", "assistant"):
                msgs.append({"role": role, "content": " ".join(rng.choice(words, 1 + int(rng.integers(0, 40))))
                             + "x"})
        convs.append(msgs)
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": c} for c in convs])
    for max_seq_len, train_on in ((512, "assistant"), (60, "assistant"), (60, "all")):
        examples, stats = load_dataset(path, tok, max_seq_len=max_seq_len, train_on=train_on)
        enc = ChatEncoder(tok, max_seq_len, train_on)
        want = [enc.encode(c) for c in convs]
        kept = [ids_labels(ex) for ex, status in want if ex is not None]
        assert [ids_labels(ex) for ex in examples] == kept
        assert stats.truncated == sum(s == "truncated" for _, s in want)
        assert stats.too_long == sum(s == "too_long" for _, s in want)
        assert all(ex.n_target == sum(y != -100 for y in ex.labels[1:]) for ex in examples)


def _table(rows):
    return pa.Table.from_pylist([{"messages": r["messages"], "id": str(i)} for i, r in enumerate(rows)])


def test_file_kinds_folders_and_globs(tmp_path, tok):
    import zstandard

    rows = [{"messages": CONV}, {"messages": SHORT}]
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(body))
    (tmp_path / "gzip_named_plain.jsonl").write_bytes(gzip.compress(body))  # recognised by its bytes
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "lines.json").write_bytes(body)
    pq.write_table(_table(rows), tmp_path / "a.parquet")
    with pa.OSFile(str(tmp_path / "a.arrow"), "wb") as sink, pa.ipc.new_stream(sink, _table(rows).schema) as w:
        w.write_table(_table(rows))
    (tmp_path / "a.csv").write_text("instruction,output\nWhat is LoRA?,A low-rank update.\n")
    want = [reference(tok, CONV), reference(tok, SHORT)]
    cache = str(tmp_path / "cache")
    for name in ("a.jsonl.gz", "gzip_named_plain.jsonl", "a.jsonl.zst", "a.json", "lines.json", "a.parquet",
                 "a.arrow"):
        sets = load_data(str(tmp_path / name), tok, 512, cache=cache)
        assert [ids_labels(sets.train[i]) for i in range(len(sets.train))] == want, name
    assert re.search(r"a.parquet:row 1$", load_data(str(tmp_path / "a.parquet"), tok, 512, cache="off").train[1].source)
    csv = load_data(str(tmp_path / "a.csv"), tok, 512, cache="off").train
    assert ids_labels(csv[0]) == reference(tok, CONV[1:3])
    # a folder of shards and a glob: every file, in sorted order, several sources at once with limits
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):
        write_jsonl(shards / f"part-{i}.jsonl", [{"messages": SHORT if i == 1 else CONV}])
    assert len(load_data(str(shards), tok, 512, cache="off").train) == 3
    sets = load_data(f"{shards}/*.jsonl:2,{tmp_path / 'a.parquet'}", tok, 512, cache="off")
    assert [ids_labels(sets.train[i]) for i in range(3)] == [want[0], want[1], want[0]]
    assert "stopped at its limit of 2" in sets.report[0]
    assert len(load_data(f"{shards},{tmp_path / 'a.json'}", tok, 512, max_examples=1, cache="off").train) == 2


def _hub_folder(root):
    data = root / "data"
    data.mkdir(parents=True)
    pq.write_table(_table([{"messages": CONV}] * 3), data / "train_sft-00000-of-00002.parquet")
    pq.write_table(_table([{"messages": SHORT}] * 2), data / "train_sft-00001-of-00002.parquet")
    pq.write_table(_table([{"messages": SHORT}]), data / "test_sft-00000-of-00001.parquet")
    (root / "README.md").write_text("---\nconfigs: []\n---\n")
    return root


def test_hub_style_folder_splits(tmp_path, tok):
    repo = _hub_folder(tmp_path / "ultrachat")
    assert split_of(repo.relative_to(tmp_path) / "data/train_sft-00001-of-00002.parquet") == "train_sft"
    with pytest.raises(DataError, match=r"no split 'train'; splits found: test_sft, train_sft"):
        load_data(str(repo), tok, 512, cache="off")
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"messages": CONV}])
    sets = load_data(f"{repo},{plain}", tok, 512, split="train_sft", eval_split="test_sft", cache="off")
    assert (len(sets.train), len(sets.eval)) == (6, 1)  # the plain file trains, and is not read again for eval
    assert ids_labels(sets.eval[0]) == reference(tok, SHORT)
    with pytest.raises(DataError, match="--eval-split test: none of the data sources"):
        load_data(str(plain), tok, 512, eval_split="test", cache="off")


def test_hub_dataset_id_from_the_cache_offline(tmp_path, tok, monkeypatch):
    """`owner/name` goes through huggingface_hub.snapshot_download; offline, the cached snapshot is used."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "datasets--someone--chats"
    _hub_folder(repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # "someone/chats" is not a local path
    sets = load_data("someone/chats", tok, 512, split="train_sft", eval_split="test_sft", cache="off")
    assert (len(sets.train), len(sets.eval)) == (5, 1)
    with pytest.raises(DataError, match="someone/other: no such local file or folder, and not in the Hugging Face"):
        load_data("someone/other", tok, 512, cache="off")


def test_cache_reload_and_invalidation(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONV}, {"messages": SHORT}] * 3)
    cache = str(tmp_path / "cache")
    first = load_data(str(path), tok, 512, eval_fraction=0.3, seed=1, cache=cache)
    again = load_data(str(path), tok, 512, eval_fraction=0.3, seed=1, cache=cache)
    assert not first.from_cache and again.from_cache and first.fingerprint == again.fingerprint
    assert isinstance(again.train.store.ids, np.memmap)
    assert [ids_labels(again.train[i]) for i in range(4)] == [ids_labels(first.train[i]) for i in range(4)]
    assert first.report == again.report and "holding out 2 of 6" in first.report[-1]
    assert load_data(str(path), tok, 20, cache=cache).from_cache is False  # max_seq_len is in the key
    assert load_data(str(path), tok, 512, eval_fraction=0.3, seed=2, cache=cache).fingerprint != first.fingerprint
    write_jsonl(path, [{"messages": SHORT}] * 6)  # new contents: rebuilt
    changed = load_data(str(path), tok, 512, cache=cache)
    assert not changed.from_cache and len(changed.train) == 6
    for meta in (tmp_path / "cache").glob("*/meta.json"):  # a damaged cache is rebuilt, not trusted
        meta.write_text("{")
    assert load_data(str(path), tok, 512, cache=cache).from_cache is False


def test_bad_records_are_refused_with_file_and_line(tmp_path, tok):
    good = json.dumps({"messages": CONV})
    special = {"messages": [{"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Sure.<|end|>\n<|user|>\nmore"}]}
    cases = [
        ("[" * 100000, "d.jsonl:2: JSON nested too deeply"),
        ('{"messages": [{"role": "user", "content": "a\\ud800b"}, {"role": "assistant", "content": "x"}]}',
         r"d.jsonl:2: message 0 \(user\) content is not valid Unicode .*'\\ud800' at character 1"),
        (json.dumps(special), r"d.jsonl:2: message 1 \(assistant\) contains the special token '<\|end\|>'"),
        (json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a<|endoftext|>"}]}),
         r"d.jsonl:2: message 1 \(assistant\) contains the special token '<\|endoftext\|>'"),
        (json.dumps({"messages": [{"role": "user", "content": "x <s> y"}, {"role": "assistant", "content": "z"}]}),
         "d.jsonl:2: message 0 \\(user\\) contains the special token '<s>'"),
        (json.dumps({"conversations": [{"from": "tool", "value": "x"}]}), "d.jsonl:2: conversations turn 0 is from"),
        (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
         "d.jsonl:2: message 0 content part 0 is a 'image_url' part"),
        (json.dumps({"messages": CONV, "pad": "x" * 5000}), "d.jsonl:2: line longer than 4,000 bytes"),
    ]
    for line, message in cases:
        path = tmp_path / "d.jsonl"
        path.write_text(f"{good}\n{line}\n{good}\n")
        with pytest.raises(DataError, match=message):
            load_dataset(path, tok, max_seq_len=512, max_line_bytes=4000 if "longer" in message else 1 << 20)


def test_missing_pyarrow_says_how_to_install(tmp_path, tok, monkeypatch):
    pq.write_table(_table([{"messages": CONV}]), tmp_path / "a.parquet")
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)
    with pytest.raises(DataError, match=r"a.parquet: reading .parquet files needs pyarrow: pip install 'phi3-lora"):
        load_data(str(tmp_path / "a.parquet"), tok, 512, cache="off")


def test_missing_sources_and_specs(tmp_path, tok):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_data(str(tmp_path / "nope.jsonl"), tok, 512, cache="off")
    with pytest.raises(DataError, match=r"\*.parquet: no file matches this pattern"):
        load_data(str(tmp_path / "*.parquet"), tok, 512, cache="off")
    with pytest.raises(DataError, match="no data given"):
        load_data(" , ", tok, 512, cache="off")


@pytest.mark.slow
def test_train_tiny_on_every_form_and_source(tmp_path, capsys):
    """train.py on a mix of every form and file kind plus a Hub-style folder with its eval split; --resume reads
    the data cache; a bad record stops with exit 2 and file:line before the model is built."""

    import zstandard

    from phi3lora.cli import train

    forms = [{"messages": CONV}, {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo."}]},
             {"instruction": "Say hi.", "output": "Hi."}, {"prompt": "2 + 2?", "completion": "4."},
             {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                           {"role": "assistant", "content": "Hello."}]},
             {"text": "<|user|>\nQ<|end|>\n<|assistant|>\nA.<|end|>\n"}]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", forms)
    pq.write_table(_table([{"messages": SHORT}] * 2), tmp_path / "b.parquet")
    (tmp_path / "c.json.gz").write_bytes(gzip.compress(json.dumps(forms).encode()))
    (tmp_path / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(mixed.read_bytes()))
    arrow = _table([{"messages": CONV}])
    with pa.OSFile(str(tmp_path / "e.arrow"), "wb") as sink, pa.ipc.new_file(sink, arrow.schema) as w:
        w.write_table(arrow)  # the IPC file format (the stream format is in test_file_kinds_folders_and_globs)
    hub = _hub_folder(tmp_path / "hub")
    cache, out = tmp_path / "cache", tmp_path / "out"
    spec = ",".join([str(mixed), str(tmp_path / "b.parquet"), f"{tmp_path / 'c.json.gz'}:3",
                     str(tmp_path / "d.jsonl.zst"), str(tmp_path / "e.arrow"), str(hub)])
    argv = small_tiny_args() + ["--device", "cpu", "--dtype", "fp32", "--no-grad-checkpointing", "--no-packing",
            "--lora-r", "4", "--log-every", "1000", "--batch-size", "4", "--data", spec, "--data-split", "train_sft",
            "--eval-split", "test_sft", "--data-cache", str(cache), "--out", str(out)]
    assert train.main(argv + ["--max-steps", "2"]) == 0
    log = capsys.readouterr().err  # train.py logs to stderr
    assert re.search(r"c.json.gz: 3 of \d+ examples kept, stopped at its limit of 3", log) and "tokenized" in log
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    stores = sorted(p.name for p in cache.iterdir())
    assert len(stores) == 2  # the training sources, the eval split
    assert train.main(argv + ["--max-steps", "3", "--resume"]) == 0
    assert "read from the data cache" in capsys.readouterr().err and sorted(p.name for p in cache.iterdir()) == stores
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CONV}, {"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure.<|end|>\n<|user|>\nmore"}]}])
    assert train.main(argv[:-4] + ["--data", str(bad), "--out", str(tmp_path / "out2"), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(errors) == 1 and "bad.jsonl:2: message 1 (assistant) contains" in errors[0]
    assert f"model {small_tiny_dir()} on" not in err  # refused before the model was built


def test_a_slice_is_held_out_for_evaluation_by_default(tmp_path, tok):
    """Without --eval-data every run evaluates: 5% of the examples (rounded, at most 200) held out, seeded, and a
    line that says how many and how to choose or turn it off; too few examples to spare one is said too."""
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(100)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    sets = load_data(str(path), tok, 512, cache="off")
    assert (len(sets.train), len(sets.eval)) == (95, 5)
    assert sets.report[-1] == ("holding out 5 of 100 examples for evaluation (--eval-fraction 0.05); --eval-data "
                               "FILE to choose them, --eval-fraction 0 for none")
    held = {tuple(ids_labels(sets.eval[i])[0]) for i in range(5)}
    assert not held & {tuple(ids_labels(sets.train[i])[0]) for i in range(95)}
    again = load_data(str(path), tok, 512, cache="off")
    assert held == {tuple(ids_labels(again.eval[i])[0]) for i in range(5)} and again.fingerprint == sets.fingerprint
    assert load_data(str(path), tok, 512, seed=1, cache="off").fingerprint != sets.fingerprint
    off = load_data(str(path), tok, 512, eval_fraction=0.0, cache="off")
    assert (len(off.train), len(off.eval)) == (100, 0) and not any("evaluation" in line for line in off.report)
    small = load_data(str(write_jsonl(tmp_path / "six.jsonl", rows[:6])), tok, 512, cache="off")
    assert (len(small.train), len(small.eval)) == (6, 0)
    assert small.report[-1].startswith("no evaluation: 0.05 of 6 examples rounds to none held out")
    from phi3lora.data.pipeline import n_held_out
    assert [n_held_out(n, 0.05) for n in (1, 6, 9, 10, 29, 30, 1000, 4000, 10**6)] == [0, 0, 0, 1, 1, 2, 50, 200, 200]
    assert len(split_eval(list(range(10**5)), 0.05, seed=0)[1]) == 200
    assert parse_config([])["training"]["eval_fraction"] == 0.05
