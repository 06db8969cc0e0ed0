"""probe.py, the command line: a report for the (small) tiny model, one with an adapter, and its errors."""
import html
import re
import sys
from pathlib import Path

import pytest
import torch

from phi3lora import lora
from phi3lora.phi3mini import Tokenizer
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


def top_k_row(page: str, layer: int) -> list[str]:
    """The cells of one layer's row of the page's top-k table."""
    row = re.search(rf"<tr><td>layer {layer}</td>(.*?)</tr>", page.split('id="top-k"', 1)[1]).group(1)
    return re.findall(r"<td>(.*?)</td>", row)


@pytest.mark.parametrize("extra, position", [
    (["--chat", "--reply", "A low-rank update."], "prompt end"),  # was read after an appended <|endoftext|>
    (["--chat"], "prompt end"), ([], "prompt end"), (["--chat", "--reply", "A low-rank update.", "--position", "3"], 3),
    (["--chat", "--reply", "A low-rank update.", "--position", "-1"], -1)])
def test_top_k_table_is_at_the_position_asked_about(tmp_path, extra, position):
    from phi3lora.interp import viz

    model, tok = small_tiny(), Tokenizer.tiny()
    out = tmp_path / "report"
    assert cli.main(["--model", small_tiny_dir(), "--prompt", "What is LoRA?", "--layers", "0", "--heads", "0",
                     "--out", str(out), *extra]) == 0
    page = (out / "index.html").read_text(encoding="utf-8")
    user = [{"role": "user", "content": "What is LoRA?"}]
    if "--chat" in extra:
        prompt = tok.encode_chat(user, add_generation_prompt=True)
        ids = tok.encode_chat(user + [{"role": "assistant", "content": "A low-rank update."}])[:-1] \
            if "--reply" in extra else prompt
        assert tok.id_to_token(ids[-1]) == ("<|end|>" if "--reply" in extra else "<|assistant|>")  # no eos run
    else:
        prompt = ids = tok.encode("What is LoRA?")
    at = len(prompt) - 1 if position == "prompt end" else position % len(ids)
    assert f"{len(ids)} tokens" in page
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids]))[0, at].float(), -1)  # the model's own prediction there
    p, top = probs.topk(5)
    want = [f"{html.escape(t)} {q:.2f}" for t, q in zip(viz.token_labels(tok, top.tolist()), p.tolist())]
    assert top_k_row(page, model.config.num_hidden_layers - 1) == want
    assert f"after token {at} <code>{html.escape(viz.token_labels(tok, [ids[at]])[0])}</code>" in page


def test_position_out_of_range_is_an_error(tmp_path, capsys):
    assert cli.main(["--model", small_tiny_dir(), "--prompt", "hi", "--position", "99", "--out",
                     str(tmp_path / "r")]) == 2
    assert "--position 99: choose from 0.." in capsys.readouterr().err


def test_page_says_how_to_read_each_panel(tmp_path):
    model = small_tiny()
    lora.inject(model, lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=("qkv_proj",)))
    lora.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "report"
    assert cli.main(["--model", small_tiny_dir(), "--adapter", str(tmp_path / "adapter"), "--prompt", "hi there",
                     "--layers", "0", "--heads", "0", "--out", str(out)]) == 0
    page = (out / "index.html").read_text(encoding="utf-8")
    sections = page.split("<h2>")[1:]
    assert [s.split("</h2>")[0] for s in sections] == ["Attention", "Logit lens", "What the adapter changed"]
    for section in sections:  # every picture comes with a few lines on how to read it
        notes = re.findall(r'<p class="how">(.*?)</p>', section)
        assert len(notes) == section.count("<img ") and all(len(n.split()) >= 20 for n in notes), section[:200]
    assert "query" in sections[0] and "final prediction" in sections[1] and "KL" in sections[2]


def attention_fig(monkeypatch, T: int, H: int = 8):
    """The figure attention_figure draws for T tokens and H heads, drawn (not saved)."""
    from phi3lora.interp import viz

    pytest.importorskip("matplotlib")
    figs = []
    monkeypatch.setattr(viz, "_save", lambda fig, plt, path: figs.append(fig) or path)
    labels = [f"␣word{i}" if i % 3 else "<|assistant|>" for i in range(T)]  # long ones, as token_labels cuts them
    probs = torch.softmax(torch.randn(H, T, T), -1)
    viz.attention_figure(probs, viz.token_labels(type("T", (), {"id_to_token": lambda self, i: labels[i]})(),
                                                 range(T)), 1, list(range(H)), "unused.png")
    fig = figs[0]
    fig.canvas.draw()
    return fig


@pytest.mark.parametrize("T", [10, 40, 64])
def test_attention_labels_are_legible(monkeypatch, T):
    # a 40-token prompt drew 4 maps of 7 inches side by side at 6 pt, shown shrunk to the page's width
    from phi3lora.interp import viz

    fig = attention_fig(monkeypatch, T)
    renderer = fig.canvas.get_renderer()
    width_in = fig.get_size_inches()[0]
    labelled = 0
    for ax in [ax for ax in fig.axes if ax.images]:  # the maps (not the colour bar, nor the empty places)
        for ticks, axis in ((ax.get_xticklabels(), 0), (ax.get_yticklabels(), 1)):
            texts = [t for t in ticks if t.get_text()]
            if not texts:
                continue
            labelled += 1
            assert len(texts) == T  # every token labelled
            assert min(t.get_fontsize() for t in texts) >= 8
            boxes = sorted((t.get_window_extent(renderer) for t in texts), key=lambda b: b.extents[axis])
            gaps = [b.extents[axis] - a.extents[axis + 2] for a, b in zip(boxes, boxes[1:])]
            assert min(gaps) >= 0, f"tick labels overlap by {-min(gaps):.1f} px"
    assert labelled >= 2
    if T <= 40:  # shown at full size on the page (a longer prompt scrolls sideways)
        assert width_in <= viz.PAGE_INCHES


def test_attention_figure_grows_with_the_prompt(monkeypatch):
    small, large = attention_fig(monkeypatch, 10, H=1), attention_fig(monkeypatch, 40, H=1)
    assert large.get_size_inches()[0] > 2 * small.get_size_inches()[0] / 1.5
    assert large.get_size_inches()[1] > 2 * small.get_size_inches()[1]
