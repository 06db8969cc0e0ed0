"""train.py --quantize nf4 end to end (4-bit tiny base, adapter, merge into dense), chat.py --quantize, and
--quantize fixed on --resume."""
import json

import pytest

from phi3lora.cli import chat
from phi3lora.cli import train
from phi3lora.phi3mini.quant import Linear4bit
from helpers import small_tiny_dir
from test_train import QA, TINY, conv, write_jsonl


@pytest.mark.slow  # ~30 s on 2 shared cores (two short runs)
def test_train_quantize_nf4_merge_and_chat(tmp_path, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", [conv(q, a) for q, a in QA])
    out = tmp_path / "out"
    args = TINY + ["--data", data, "--out", str(out), "--max-steps", "3", "--lr", "1e-2", "--quantize", "nf4"]
    with pytest.warns(UserWarning, match="trained against dequant"):
        assert train.main(args + ["--merge"]) == 0
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(losses) == 3 and losses[-1] < losses[0]
    merged = json.loads((out / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged  # merged: dense weights, never re-quantized
    # the adapter runs on a 4-bit base in chat
    model, _ = chat.load(chat.parse_args(["--model", small_tiny_dir(), "--quantize", "nf4",
                                          "--adapter", str(out / "adapter"), "--prompt", "hi"]))
    assert any(isinstance(m, Linear4bit) or hasattr(m, "nf4_tensors") for m in model.modules())
    # --quantize cannot change on --resume (the adapter was trained against dequant(W4)); left out, it is the run's
    assert train.main(TINY + ["--data", data, "--out", str(out), "--max-steps", "4", "--resume", "--quantize", ""]) == 2
    assert "quantize" in capsys.readouterr().err
