"""Data users have beyond chat records: plain text for continued pre-training (.txt/.md files and folders), and
chats of several MB on one line (--max-line-mb)."""
import json

import numpy as np
import pytest

from helpers import CONV, small_tiny_args, write_jsonl
from phi3lora.cli import train
from phi3lora.data.files import MAX_LINE_BYTES, BadRecord, iter_json_lines
from phi3lora.data.pipeline import IGNORE, DataError, load_data
from phi3lora.phi3mini import Tokenizer

NOTES = "".join(f"Note {i}: the adapter is a low-rank update of the frozen weights.\n" for i in range(40))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.tiny()


def stream(tokens):
    """Every token of a TokenSet, in order, and whether each is a target."""
    ids = np.concatenate([np.asarray(tokens[i].input_ids) for i in range(len(tokens))])
    labels = np.concatenate([np.asarray(tokens[i].labels) for i in range(len(tokens))])
    return ids, labels


def test_a_text_file_is_cut_into_max_seq_len_pieces_with_loss_on_every_token(tmp_path, tok):
    path = tmp_path / "notes.txt"
    path.write_text(NOTES)
    sets = load_data(str(path), tok, 64, cache="off", eval_fraction=0)  # train_on "assistant" has no say on plain text
    ids, labels = stream(sets.train)
    assert ids.tolist() == tok.encode(NOTES) + [tok.eos_id]  # the whole file, then the eos that ends the document
    assert (labels == ids).all() and IGNORE not in labels.tolist()
    lengths = sets.train.lengths.tolist()
    assert len(lengths) == -(-len(ids) // 64) > 5 and set(lengths[:-1]) == {64} and 2 <= lengths[-1] <= 64
    assert sets.train[0].source == f"{path}:1"
    line_of_piece = int(sets.train[3].source.rsplit(":", 1)[1])  # the line its first token comes from
    assert tok.decode(sets.train[3].input_ids[:8]).strip().split()[0] in NOTES.splitlines()[line_of_piece - 1]
    assert sets.report[0] == f"{path}: {len(lengths)} of {len(lengths)} examples kept"


def test_a_folder_of_text_and_a_text_file_beside_chats(tmp_path, tok):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.md").write_text("# Title\n\nSome markdown.\n")
    (docs / "sub" / "b.txt").write_text(NOTES)
    (docs / "skip.py").write_text("print('not data')\n")
    folder = load_data(str(docs), tok, 64, cache="off", eval_fraction=0).train
    ids, _ = stream(folder)
    assert ids.tolist() == tok.encode("# Title\n\nSome markdown.\n") + [tok.eos_id] + tok.encode(NOTES) + [tok.eos_id]
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CONV}] * 3)
    mixed = load_data(f"{chats},{docs / 'a.md'}", tok, 64, cache="off", eval_fraction=0).train
    assert len(mixed) == 4 and mixed[3].source == f"{docs / 'a.md'}:1"
    assert (np.asarray(mixed[0].labels) == IGNORE).any()  # the chats keep their assistant-only labels
    shards = tmp_path / "shards"  # a folder of record files: its README.md is not training data
    shards.mkdir()
    write_jsonl(shards / "part-0.jsonl", [{"messages": CONV}] * 2)
    (shards / "README.md").write_text("About these shards.\n")
    assert len(load_data(str(shards), tok, 64, cache="off", eval_fraction=0).train) == 2


def test_text_errors_name_the_line(tmp_path, tok):
    path = tmp_path / "notes.txt"
    path.write_text("fine\nalso fine\nhere <|end|> sneaks in\nok\n")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("line one\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError) as e:
        load_data(f"{path},{bad}", tok, 64, cache="off")
    lines = str(e.value).splitlines()
    assert lines[0].startswith("2 bad lines in")
    assert lines[1].strip().startswith(f"{path}:3: the special token '<|end|>' in plain text")
    assert lines[2].strip().startswith(f"{bad}:2: not UTF-8")


def test_a_chat_of_several_mb_on_one_line_is_read(tmp_path):
    long = {"messages": [{"role": "user", "content": "x" * (10 << 20)}, {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [long])
    (where, rec), = list(iter_json_lines(path))  # the default limit
    assert not isinstance(rec, BadRecord) and len(rec["messages"][0]["content"]) == 10 << 20
    assert MAX_LINE_BYTES >= 64 << 20
    (where, rec), = list(iter_json_lines(path, 8 << 20))
    assert rec.reason.startswith("line longer than 8 MB: over --max-line-mb 8")


def test_max_line_mb_is_a_setting_named_in_its_error(tmp_path, capsys):
    long = {"messages": [{"role": "user", "content": "x" * (3 << 20)}, {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONV}, long, {"messages": CONV}])
    argv = small_tiny_args() + ["--device", "cpu", "--dtype", "fp32", "--data", str(path), "--data-cache", "off",
                                "--max-steps", "1", "--out", str(tmp_path / "out")]
    assert train.main(argv + ["--max-line-mb", "2"]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}:2: line longer than 2 MB: over --max-line-mb 2" in err, err
    assert train.main(argv) == 0  # the default reads it
    config = (tmp_path / "out" / "config.toml").read_text()
    assert "max_line_mb = 64" in config
    assert json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1
