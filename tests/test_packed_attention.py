"""Structured attention (phi3mini/attention.py): packed rows and rows past the sliding window attend exactly as the
dense mask says, without ever allocating a (B, 1, T, T) tensor."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import TINY_HF, make_hf_model, save_hf_checkpoint
from phi3lora import lora
from phi3lora.phi3mini import Phi3, Phi3Config, generate
from phi3lora.phi3mini.attention import SegmentPlan, make_plan

ATOL_HF = 1e-4  # ours vs transformers (DESIGN.md's numerical contract)
ATOL_SELF = 1e-5  # packed vs each document alone, same weights, fp32
LONGROPE = dict(max_position_embeddings=512, original_max_position_embeddings=32,
                rope_scaling={"type": "longrope",
                              "short_factor": [1.0 + 0.1 * i for i in range(8)],
                              "long_factor": [1.0 + 0.7 * i for i in range(8)]})
# document lengths per config; "window" has documents longer than its 16-token window (run in query chunks)
CONFIGS = {
    "mha": (dict(), (37, 5, 60, 18)),
    "gqa": (dict(num_key_value_heads=2), (23, 41, 9)),
    "longrope_short": (LONGROPE, (12, 30, 7)),  # every document below original_max (32): short factors
    "longrope_long": (LONGROPE, (40, 70, 33)),  # every document above: long factors, packed and alone
    "window": (dict(num_key_value_heads=2, sliding_window=16), (150, 9, 290, 31)),
}


def pair(tmp_path, **overrides):
    hf = make_hf_model(seed=0, max_position_embeddings=overrides.pop("max_position_embeddings", 512), **overrides)
    return hf, Phi3.from_pretrained(save_hf_checkpoint(hf, tmp_path / "ckpt"))


def packed_batch(lengths, seed=0, pad=5):
    """Documents of the given lengths packed into one row, right-padded by `pad` slots (document id 0)."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, 320, (n,), generator=g) for n in lengths]
    ids = torch.cat(docs + [torch.full((pad,), 2)])[None]  # (1, T)
    pos = torch.cat([torch.arange(n) for n in lengths] + [torch.zeros(pad, dtype=torch.long)])[None]
    doc = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)] + [torch.zeros(pad, dtype=torch.long)])
    labels = ids.clone()
    starts = torch.tensor([0] + list(lengths)).cumsum(0)
    labels[0, starts[:-1]] = -100  # an example's first token is never a target (collate does the same)
    labels[0, starts[-1]:] = -100
    return docs, ids, pos, doc[None], labels


def with_lora(model, seed=1):
    lora.inject(model, lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B != 0, so the adapters change the output and get gradients through attention
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", CONFIGS)
def test_packed_row_equals_each_document_alone_and_transformers(tmp_path, name):
    overrides, lengths = CONFIGS[name]
    hf, ours = pair(tmp_path, **overrides)
    docs, ids, pos, doc, labels = packed_batch(lengths)
    assert ours.attention_backend == "auto"
    plan = make_plan("auto", ids.shape[1], 0, ours.config.sliding_window, None, doc, 1, ids.device)
    assert isinstance(plan, SegmentPlan)  # the CPU path: no dense mask
    with torch.no_grad():
        packed = ours(ids, position_ids=pos, document_ids=doc)
        ours.attention_backend = "dense"  # the (B, 1, T, T) mask path, kept for comparison
        dense = ours(ids, position_ids=pos, document_ids=doc)
        ours.attention_backend = "auto"
        start = 0
        for d in docs:
            ref = hf(d[None]).logits[0]
            torch.testing.assert_close(packed[0, start:start + len(d)], ref, atol=ATOL_HF, rtol=0)
            torch.testing.assert_close(packed[0, start:start + len(d)], ours(d[None])[0], atol=ATOL_SELF, rtol=0)
            start += len(d)
    torch.testing.assert_close(packed[0, :start], dense[0, :start], atol=ATOL_SELF, rtol=0)

    # LoRA: the packed summed loss has the gradients of the documents' losses run one by one
    with_lora(ours).train()
    ours(ids, labels=labels, position_ids=pos, document_ids=doc, loss_reduction="sum").backward()
    packed_grads = lora_grads(ours)
    ours.zero_grad(set_to_none=True)
    start = 0
    for d in docs:
        ours(d[None], labels=labels[:, start:start + len(d)], loss_reduction="sum").backward()
        start += len(d)
    alone_grads = lora_grads(ours)
    assert len(packed_grads) == 4 * 2 * 2  # 4 projections, A and B, 2 layers: every adapter is checked
    for n, g in packed_grads.items():
        assert g.abs().max() > 0, n
        torch.testing.assert_close(g, alone_grads[n], atol=ATOL_SELF, rtol=ATOL_SELF, msg=n)


LONG = {
    "window": dict(sliding_window=16),
    "gqa_window": dict(num_key_value_heads=2, sliding_window=40),
    "longrope_window": dict(sliding_window=24, **LONGROPE),  # 300 > original_max: long factors
}


@pytest.mark.parametrize("name", LONG)
def test_sequence_past_the_window_matches_transformers(tmp_path, name):
    hf, ours = pair(tmp_path, **LONG[name])
    ids = torch.randint(3, 320, (2, 300), generator=torch.Generator().manual_seed(2))  # > 128: several chunks
    plan = make_plan("auto", 300, 0, ours.config.sliding_window, None, None, 2, ids.device)
    assert isinstance(plan, SegmentPlan)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=ATOL_HF, rtol=0)


def test_gradients_past_the_window_equal_the_dense_path(tmp_path):
    _, ours = pair(tmp_path, num_key_value_heads=2, sliding_window=20)
    ids = torch.randint(3, 320, (1, 200), generator=torch.Generator().manual_seed(4))
    grads = {}
    for backend in ("segments", "dense"):
        ours.attention_backend = backend
        ours.zero_grad(set_to_none=True)
        ours(ids, labels=ids).backward()
        grads[backend] = {n: p.grad.clone() for n, p in ours.named_parameters()}
    for n, g in grads["segments"].items():
        torch.testing.assert_close(g, grads["dense"][n], atol=ATOL_SELF, rtol=ATOL_SELF, msg=n)


def test_generation_across_the_window_edge_is_unchanged(tmp_path):
    hf, ours = pair(tmp_path, sliding_window=12)
    prompt = torch.randint(3, 320, (1, 9), generator=torch.Generator().manual_seed(5))
    cached = generate(ours, prompt[0], max_new_tokens=30, stop_ids=[])  # KV cache: prefill + decode
    ref = hf.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0,
                      min_new_tokens=30)[0, 9:].tolist()
    assert cached == ref
    recompute, ids = [], prompt[0].tolist()
    with torch.no_grad():  # without a cache: every call past 12 tokens goes through the windowed segments path
        for _ in range(30):
            ids.append(int(ours(torch.tensor([ids]))[0, -1].argmax()))
            recompute.append(ids[-1])
    assert recompute == ref


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) any op allocates, and its shape."""

    def __init__(self):
        super().__init__()
        self.numel, self.shape = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.shape = t.numel(), tuple(t.shape)
        return out


def tiny_model(**overrides):
    # transformers' tiny test sizes (vocab 320: the logits stay small next to a T×T tensor at T = 8192)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "pad_token_id")
    model = Phi3(Phi3Config(**{**{k: TINY_HF[k] for k in keys}, **overrides}))
    model.init_weights(0)
    return model


def test_no_T_by_T_tensor_for_a_packed_batch():
    """T = 8192 packed with chat-sized documents and one longer than Phi-3-mini-4k's window (2047): forward and
    LoRA backward never allocate anything near T² elements (the dense mask alone would be 67M)."""
    T = 8192
    lengths = [2600] + [300, 120, 450, 610, 90, 330, 280] * 2
    lengths.append(T - sum(lengths) - 40)  # 40 slots of padding
    model = with_lora(tiny_model(sliding_window=2047, num_key_value_heads=2)).train()
    _, ids, pos, doc, labels = packed_batch(lengths, pad=40)
    assert ids.shape == (1, T)
    with LargestTensor() as rec:
        model(ids, labels=labels, position_ids=pos, document_ids=doc).backward()
    assert rec.numel < T * T // 16, f"a {rec.shape} tensor was allocated"

    # the check can fail: the dense path allocates the (1, 1, T, T) mask (at a smaller T, to stay fast)
    T = 1024
    model.attention_backend = "dense"
    _, ids, pos, doc, labels = packed_batch([300, 500, T - 840], pad=40)
    with LargestTensor() as rec, torch.no_grad():
        model(ids, position_ids=pos, document_ids=doc)
    assert rec.numel >= T * T


def test_a_document_split_in_two_is_refused():
    model = tiny_model(sliding_window=None)
    ids = torch.randint(3, 320, (1, 6))
    with pytest.raises(ValueError, match="contiguous"):
        model(ids, document_ids=torch.tensor([[1, 1, 2, 2, 1, 1]]))


def test_plans_keep_generation_and_short_rows_on_their_paths():
    W = 8
    assert make_plan("auto", 8, 0, W, None, None, 2, "cpu").name == "causal"  # within the window: is_causal
    assert make_plan("auto", 1, 20, W, None, None, 2, "cpu").name == "dense"  # decoding with a cache
    left_pad = torch.ones(2, 5, dtype=torch.long)
    assert make_plan("auto", 5, 0, W, left_pad, None, 2, "cpu").name == "dense"  # attention_mask: as before
    assert make_plan("auto", 9, 0, W, None, None, 2, "cpu").name == "segments"  # past the window
    with pytest.raises(ValueError, match="backend"):
        make_plan("fast", 9, 0, W, None, None, 2, "cpu")


def test_bench_counts_skipped_tiles_and_runs(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from packed_attention import pack, tiles_skipped

    # two 128-token documents: of the 2×2 tiles only the diagonal is computed (half the square, 2 of 3 causal)
    assert tiles_skipped([128, 128], None) == {"of_square": 0.5, "of_causal": round(1 - 2 / 3, 4)}
    assert sum(pack([19, 148, 57], 1000)) == 1000
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "bench/packed_attention.py", "--seq", "256", "--steps", "1",
                           "--json-out", str(tmp_path / "p.json")], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {r["path"] for r in result["rows"]} == {"dense", "segments"}
    assert all(r["step_s"] > 0 and r["peak_mb"] >= 0 for r in result["rows"])
    # two tiles a side: at least the one above the diagonal is skipped
    assert json.loads((tmp_path / "p.json").read_text())["tiles_skipped"]["256"]["of_square"] >= 0.25


@pytest.mark.parametrize("window", [None, 40])
def test_flex_plan_masks_like_the_dense_path(monkeypatch, window):
    """The CUDA plan's mask_mods (document, causal, window; padded slots, GQA), checked on the CPU with eager
    FlexAttention: the same output as per-document SDPA and as the dense mask."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    import phi3lora.phi3mini.attention as attention
    monkeypatch.setattr(attention, "_FLEX", flex.flex_attention)
    T = 300  # padded to 384 inside: three 128-token tiles a side
    doc = torch.repeat_interleave(torch.tensor([1, 2, 3, 0]), torch.tensor([100, 120, 70, 10]))[None].repeat(2, 1)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, T, 16, generator=g)
    k, v = torch.randn(2, 2, T, 16, generator=g), torch.randn(2, 2, T, 16, generator=g)  # GQA: 2 kv heads
    # tiles of 128 over 384 padded slots: documents [0, 100) [100, 220) [220, 290), padding [290, 384). Computed:
    # the 3 diagonal tiles, (1, 0) (document 2 crosses it) and (2, 1) (document 3); without documents, causal
    # computes all 6 lower tiles, and a 40-key window empties (2, 0)
    skipped = {(True, None): 4 / 9, (True, 40): 4 / 9, (False, None): 3 / 9, (False, 40): 4 / 9}
    for d in (doc, None):
        args = (T, T, 0, window, None, d, "cpu")
        plan = attention.FlexPlan(args, 2, T, d, window, "cpu")
        assert plan.Tp == 384
        assert plan.skipped_fraction() == pytest.approx(skipped[d is not None, window])
        got = plan.attend(q, k, v)
        torch.testing.assert_close(got, attention.DensePlan(args).attend(q, k, v), atol=1e-5, rtol=0)
        torch.testing.assert_close(got, attention.SegmentPlan(args, 2, T, d, window, "cpu").attend(q, k, v),
                                   atol=1e-5, rtol=0)


def test_gradient_checkpointing_recomputes_the_same_packed_plan():
    model = with_lora(tiny_model(sliding_window=32, num_key_value_heads=2)).train()
    _, ids, pos, doc, labels = packed_batch([50, 20, 70], pad=3)
    grads = []
    for on in (False, True):
        model.gradient_checkpointing = on
        model.zero_grad(set_to_none=True)
        model(ids, labels=labels, position_ids=pos, document_ids=doc).backward()
        grads.append(lora_grads(model))
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 16
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=1e-6, msg=n)
