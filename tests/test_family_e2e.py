"""A Phi-4-mini-shaped folder (tied 200064-token embedding, partial rotary, GQA 3:1, LongRoPE, Phi-4-mini's
tokenizer layout and chat format) goes through train.py and chat.py with nothing but --model FOLDER."""
import io
import json

import pytest
import safetensors.torch
import torch

from phi3lora.cli import chat
from phi3lora.cli import train
from family import PHI4_SPECIAL, write_phi4_tokenizer
from phi3lora.phi3mini import Phi3, Phi3Config, Tokenizer

END, EOS = PHI4_SPECIAL["<|end|>"], PHI4_SPECIAL["<|endoftext|>"]
TOOLS = '[{"name": "add", "parameters": {"a": {"type": "int"}, "b": {"type": "int"}}}]'


@pytest.fixture(scope="module")
def phi4_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi4-mini-tiny")
    config = Phi3Config(vocab_size=200064, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=3, num_key_value_heads=1, partial_rotary_factor=0.75,
                        max_position_embeddings=512, original_max_position_embeddings=128, sliding_window=262144,
                        rope_scaling={"type": "longrope", "short_factor": [1.0] * 6,
                                      "long_factor": [1.0 + 0.5 * i for i in range(6)]},
                        tie_word_embeddings=True, bos_token_id=199999, eos_token_id=199999, pad_token_id=199999)
    model = Phi3(config)
    model.init_weights(seed=0)
    model.generation_config = {"eos_token_id": [END, EOS]}  # as Phi-4-mini's generation_config.json
    model.save_pretrained(folder)
    write_phi4_tokenizer(folder)
    return folder


def write_data(path):
    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": f"{a + b}."}]} for a in range(4) for b in range(3)]
    rows.append({"messages": [{"role": "system", "content": "You can add.", "tools": TOOLS},
                              {"role": "user", "content": "Add 2 and 3."},
                              {"role": "assistant", "content": '{"name": "add", "arguments": {"a": 2, "b": 3}}'},
                              {"role": "tool", "content": "5"},
                              {"role": "assistant", "content": "It is 5."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.slow  # about 30 s on 2 busy cores: training, export, merge, and three chat runs
def test_phi4_shaped_folder_trains_exports_merges_and_chats(phi4_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    data = write_data(tmp_path / "chats.jsonl")
    rc = train.main(["--model", str(phi4_folder), "--data", data, "--out", str(out), "--max-steps", "4",
                     "--batch-size", "4", "--device", "cpu", "--dtype", "fp32", "--no-grad-checkpointing",
                     "--lora-r", "4", "--lora-alpha", "8", "--log-every", "1000", "--save-every", "0",
                     "--export-peft", "--merge"])
    assert rc == 0
    assert "(r 12; vLLM needs --max-lora-rank 16)" in capsys.readouterr().err
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(0 < x < 20 for x in losses)
    # the merged model stays tied (no adapter on lm_head / embed_tokens) and keeps its format and stop ids
    merged_cfg = json.loads((out / "merged" / "config.json").read_text())
    assert merged_cfg["tie_word_embeddings"] is True and merged_cfg["partial_rotary_factor"] == 0.75
    assert "lm_head.weight" not in safetensors.torch.load_file(out / "merged" / "model.safetensors")
    assert Tokenizer.from_pretrained(out / "merged").chat_format.name == "phi4"
    assert json.loads((out / "adapter-peft" / "adapter_config.json").read_text())["r"] == 12  # q, k, v: 3 x 4

    # chat.py: the prompt is rendered in Phi-4-mini's format and the stop ids are Phi-4-mini's
    seen = {}

    def fake_generate(model, input_ids, max_new_tokens, stop_ids=None, on_token=None, **kw):
        seen.update(ids=list(input_ids), stop_ids=list(stop_ids))
        for t in [61, END]:  # a byte-level piece, then <|end|>
            on_token(t)
        return [61, END]

    monkeypatch.setattr(chat, "generate", fake_generate)
    stdout, stderr = io.StringIO(), io.StringIO()
    assert chat.main(["--model", str(phi4_folder), "--adapter", str(out / "adapter"), "--prompt", "What is 2 plus 1?",
                      "--device", "cpu", "--max-new-tokens", "8"], stdout=stdout, stderr=stderr) == 0, stderr.getvalue()
    tok = Tokenizer.from_pretrained(phi4_folder)
    assert seen["ids"] == tok.encode("<|user|>What is 2 plus 1?<|end|><|assistant|>")
    assert seen["stop_ids"] == [END, EOS] and 32007 not in seen["stop_ids"]
    monkeypatch.undo()

    # and for real: greedy replies from the adapter and from the merged folder are the same tokens
    replies = []
    for argv in (["--model", str(phi4_folder), "--adapter", str(out / "adapter")], ["--model", str(out / "merged")]):
        stdout, stderr = io.StringIO(), io.StringIO()
        assert chat.main(argv + ["--prompt", "What is 2 plus 1?", "--max-new-tokens", "6", "--device", "cpu"],
                         stdout=stdout, stderr=stderr) == 0, stderr.getvalue()
        replies.append(stdout.getvalue())
    assert replies[0] == replies[1]


@pytest.mark.slow  # about 15 s on 2 busy cores (tests/test_family.py checks the same merge without train.py)
def test_adapter_on_the_tied_head_trains_and_merges_untied(phi4_folder, tmp_path):
    out = tmp_path / "run"
    data = write_data(tmp_path / "chats.jsonl")
    with pytest.warns(UserWarning, match="tied embeddings"):
        rc = train.main(["--model", str(phi4_folder), "--data", data, "--out", str(out), "--max-steps", "2",
                         "--batch-size", "4", "--device", "cpu", "--dtype", "fp32", "--no-grad-checkpointing",
                         "--lora-target-modules", "qkv_proj,lm_head", "--lora-r", "2", "--log-every", "1000",
                         "--save-every", "0", "--merge"])
    assert rc == 0
    assert json.loads((out / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    merged = Phi3.from_pretrained(out / "merged")
    base = Phi3.from_pretrained(phi4_folder)
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)  # the input side as it was
    assert not torch.equal(merged.lm_head.weight, base.lm_head.weight)  # the head took the adapter
