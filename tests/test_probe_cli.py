"""probe.py, the command line: a report for the (small) tiny model, one with an adapter, and its errors."""
import sys
from pathlib import Path

import torch

from phi3lora import lora
from helpers import small_tiny, small_tiny_dir, training_ids

ROOT = Path(__file__).resolve().parents[1]
from phi3lora.cli import probe as cli  # noqa: E402  (phi3lora.interp is the library it drives)

PNG = b"\x89PNG\r\n\x1a\n"


def check_pngs(out: Path, names: list[str]) -> str:
    page = (out / "index.html").read_text(encoding="utf-8")
    for name in names:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5_000, name  # a real picture, not an empty canvas
        assert f'src="{name}"' in page
    assert not list(out.glob("*.tmp-*"))
    return page


def test_report_for_tiny(tmp_path, capsys):
    out = tmp_path / "report"
    assert cli.main(["--model", small_tiny_dir(), "--prompt", "the cat sat on the mat", "--out", str(out)]) == 0
    n = small_tiny().config.num_hidden_layers
    layers = sorted({0, n // 2, n - 1})
    page = check_pngs(out, [f"attention_layer{i}.png" for i in layers] + ["logit_lens.png"])
    assert not (out / "adapter_norms.png").exists()
    assert "Logit lens" in page and "<code>␣the</code>" in page
    assert "wrote" in capsys.readouterr().err


def test_report_with_an_adapter(tmp_path):
    model = small_tiny()
    lora.inject(model, lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=("qkv_proj", "lm_head")))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    lora.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "report"
    argv = ["--model", small_tiny_dir(), "--adapter", str(tmp_path / "adapter"), "--chat", "--prompt", "What is LoRA?",
            "--reply", "A low-rank update.", "--layers", "1", "--heads", "0,3", "--out", str(out)]
    assert cli.main(argv) == 0
    page = check_pngs(out, ["attention_layer1.png", "logit_lens.png", "adapter_norms.png", "adapter_effect.png"])
    assert "model.layers.1.self_attn.qkv_proj" in page and "lm_head" in page
    assert "&lt;|user|&gt;" in page  # the chat markers are shown, escaped
    assert not (out / "attention_layer0.png").exists()


def test_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "r")
    cases = [(["--layers", "7"], "--layers '7': choose from 0.."),
             (["--heads", "x"], "expected comma-separated integers"),
             (["--adapter", str(tmp_path / "missing")], "--adapter")]
    for extra, message in cases:
        assert cli.main(["--model", small_tiny_dir(), "--prompt", "hi", "--out", out, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    (tmp_path / "file").write_text("x")
    assert cli.main(["--model", small_tiny_dir(), "--prompt", "hi", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert cli.main(["--model", small_tiny_dir(), "--prompt", "hi", "--out", out]) == 2
    assert "pip install 'phi3-lora[viz]'" in capsys.readouterr().err


def test_report_for_a_trained_adapter(tmp_path):
    # a few Adam steps on one chat: the report must show the reply's tokens made likelier by the adapter
    from phi3lora.phi3mini import Tokenizer
    from phi3lora.lora import footprint

    tok = Tokenizer.tiny()
    chat = [{"role": "user", "content": "What is LoRA?"}, {"role": "assistant", "content": "A low-rank update."}]
    ids, labels = (torch.tensor([x]) for x in training_ids(tok, chat))
    model = small_tiny()
    cfg = lora.LoraConfig(r=8, lora_alpha=64, lora_dropout=0.0, target_modules=("qkv_proj", "lm_head"))
    lora.inject(model, cfg)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(15):
        opt.zero_grad()
        model(ids, labels=labels).backward()
        opt.step()
    lora.save_adapter(model, tmp_path / "adapter", cfg)
    out = tmp_path / "report"
    argv = ["--model", small_tiny_dir(), "--adapter", str(tmp_path / "adapter"), "--chat", "--prompt", "What is LoRA?",
            "--reply", "A low-rank update.", "--layers", "1", "--heads", "0", "--out", str(out)]
    assert cli.main(argv) == 0
    check_pngs(out, ["logit_lens.png", "adapter_norms.png", "adapter_effect.png"])
    effect = footprint.adapter_effect(model.eval(), ids)
    reply = labels[0, 1:] != -100  # positions whose next token is a trained reply token
    assert effect.logprob_change[0][reply].min() > 1.0
