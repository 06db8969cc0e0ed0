"""kernels.rmsnorm / rope / swiglu / cross_entropy (Triton) against their pure-torch references.

On the CPU these run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) with small blocks, so the
odd shapes below (37 rows, hidden 72 / 100, vocab 131, head_dim 16 with rotary_dim 12, 4 query / 2 key heads)
leave ragged edges. fp32: output and every gradient within 1e-5. Low precision: the interpreter rounds bf16 wrongly
(numpy has no bf16: casts truncate), so the CPU runs the same rounding-order checks in fp16, which it rounds
correctly; on a GPU they run in bf16. GPU tests (marked, skipped without CUDA) use Phi-3-mini's sizes.
"""
import pytest
import torch
import torch.nn.functional as F

from phi3lora.kernels.cross_entropy import (_softmax_ce_grad_torch_, _softmax_ce_grad_triton_,
                                            fused_linear_cross_entropy, fused_linear_cross_entropy_reference)
from phi3lora.kernels.rmsnorm import rms_norm, rms_norm_reference
from phi3lora.kernels.rope import apply_rope, apply_rope_reference
from phi3lora.kernels.silu_mul import swiglu, swiglu_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
LOW = torch.bfloat16 if CUDA else torch.float16  # see the module docstring
TOL32 = dict(atol=1e-5, rtol=1e-5)  # values and gradients are O(1..10); fp32 reorderings differ by ~1e-6
N, H, V, I = 37, 72, 131, 50        # none a multiple of the interpreter's 32-wide blocks
B, HQ, HKV, T, D, R = 2, 4, 2, 5, 16, 12


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rnd(*shape, g, scale=1.0, dtype=torch.float32, grad=True, device=DEVICE):
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(grad)


def leaf(t, dtype=None):
    """An independent leaf with t's values (optionally cast) and t's requires_grad."""
    return t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad)


def ulps(a, b):
    """Per-element distance between two fp16/bf16 tensors in units in the last place (0 = same bits)."""
    assert a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16), (a.dtype, b.dtype)

    def ordered(t):  # sign-magnitude bits -> integers that count representable values
        bits = t.detach().contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()


def assert_rounds_like(ours, ref, max_frac, what=""):
    """Low precision: never more than one ulp from the reference, and the same bits almost everywhere."""
    d = ulps(ours, ref)
    frac = (d > 0).float().mean().item()
    assert d.max().item() <= 1, f"{what}: {d.max().item()} ulps apart"
    assert frac <= max_frac, f"{what}: {frac:.2%} of elements differ (allowed {max_frac:.2%})"
    return frac


def assert_as_accurate(ours, ref, truth, what=""):
    """ours is no further from the fp64 truth than twice autograd's own error through the reference (or an eps of
    the tensor's scale): a tolerance set by the dtype's precision, not picked by hand."""
    err = (ours.double() - truth).abs().max().item()
    err_ref = (ref.double() - truth).abs().max().item()
    floor = torch.finfo(ours.dtype).eps * truth.abs().max().item()
    assert err <= 2 * err_ref + floor, f"{what}: error {err:.3g} vs reference's {err_ref:.3g} (floor {floor:.3g})"


def grads(*tensors):
    return [t.grad for t in tensors]


# ------------------------------------------------------------------------------------------------------- RMSNorm

@pytest.mark.parametrize("shape", [(N, H), (2, 3, 100)])
def test_rms_norm_fp32_output_and_grads(shape):
    g = gen(1)
    x = rnd(*shape, g=g, scale=3.0)
    w = (1 + rnd(shape[-1], g=g, scale=0.3, grad=False)).requires_grad_()
    dy = rnd(*shape, g=g, grad=False)
    x2, w2 = leaf(x), leaf(w)
    y = rms_norm(x, w, 1e-5)
    y.backward(dy)
    y_ref = rms_norm_reference(x2, w2, 1e-5)
    y_ref.backward(dy)
    assert y.shape == shape and y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, **TOL32)
    torch.testing.assert_close(x.grad, x2.grad, **TOL32)
    torch.testing.assert_close(w.grad, w2.grad, **TOL32)


def test_rms_norm_strided_rows_and_frozen_weight():
    g = gen(2)
    big = rnd(N, H + 9, g=g, grad=False)
    x = big[:, :H].requires_grad_()  # row stride H + 9: read in place, no copy needed
    w = rnd(H, g=g, grad=False)       # frozen, as under LoRA
    dy = rnd(N, H, g=g, grad=False)
    x2 = leaf(x)
    rms_norm(x, w, 1e-6).backward(dy)
    rms_norm_reference(x2, w, 1e-6).backward(dy)
    assert w.grad is None
    torch.testing.assert_close(x.grad, x2.grad, **TOL32)


@pytest.mark.parametrize("w_dtype", [LOW, torch.float32])
def test_rms_norm_low_precision_rounding_order(w_dtype):
    g = gen(3)
    x = rnd(N, 100, g=g, scale=3.0, dtype=LOW)
    w = (1 + rnd(100, g=g, scale=0.3, grad=False)).to(w_dtype).requires_grad_()
    dy = rnd(N, 100, g=g, dtype=torch.promote_types(LOW, w_dtype), grad=False)
    x2, w2 = leaf(x), leaf(w)
    y = rms_norm(x, w, 1e-5)
    y.backward(dy)
    y_ref = rms_norm_reference(x2, w2, 1e-5)
    y_ref.backward(dy)
    assert y.dtype == y_ref.dtype == torch.promote_types(w_dtype, LOW)
    # the output: the same roundings as transformers (normalised row rounded to x's dtype, then the product)
    if w_dtype == LOW:
        frac = assert_rounds_like(y, y_ref, max_frac=0.01, what="y")
        # tight enough to see the rounding order: one rounding (weight·x̂ in fp32) is much further off
        xf = x.detach().float()
        once = (w.detach().float() * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(LOW)
        assert (ulps(once, y_ref) > 0).float().mean().item() > max(5 * frac, 0.02)
    else:  # fp32 product of the fp32 weight and the rounded row: only a flipped rounding of the row can differ
        torch.testing.assert_close(y, y_ref, atol=0, rtol=torch.finfo(LOW).eps)
    # gradients: at least as accurate as autograd through the reference, against fp64
    x64, w64 = leaf(x, torch.float64), leaf(w, torch.float64)
    rms_norm_reference(x64, w64, 1e-5).backward(dy.double())
    assert_as_accurate(x.grad, x2.grad, x64.grad, "dx")
    assert_as_accurate(w.grad, w2.grad, w64.grad, "dweight")
    assert x.grad.dtype == LOW and w.grad.dtype == w_dtype


# ---------------------------------------------------------------------------------------------------------- RoPE

def rope_tables(batch, T=T, R=R, factor=1.19, device=DEVICE):
    """cos/sin (batch, T, R) as Phi-3 builds them, different positions per batch row, LongRoPE-style factor."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, R, 2, dtype=torch.float32) / R))   # (R/2,)
    pos = torch.arange(T)[None, :] + 37 * torch.arange(batch)[:, None]                # (batch, T)
    freqs = pos[..., None].float() * inv_freq                                          # (batch, T, R/2)
    emb = torch.cat((freqs, freqs), dim=-1)                                            # (batch, T, R)
    return (emb.cos() * factor).to(device), (emb.sin() * factor).to(device)


def qk_views(qkv, T=T, HQ=HQ, HKV=HKV, D=D):
    """q (B, HQ, T, D), k (B, HKV, T, D) as strided views of a fused qkv projection output (B, T, (HQ+2·HKV)·D)."""
    Bq = qkv.shape[0]
    q, k, _ = qkv.split([HQ * D, HKV * D, HKV * D], dim=-1)
    return q.view(Bq, T, HQ, D).transpose(1, 2), k.view(Bq, T, HKV, D).transpose(1, 2)


def run_rope(fn, qkv, cos, sin, dq, dk):
    q, k = qk_views(qkv)
    q_rot, k_rot = fn(q, k, cos, sin)
    torch.autograd.backward([q_rot, k_rot], [dq, dk])
    return q_rot, k_rot


@pytest.mark.parametrize("tables", ["per_batch", "shared", "random"])
def test_rope_fp32_gqa_partial_strided(tables):
    g = gen(4)
    qkv = rnd(B, T, (HQ + 2 * HKV) * D, g=g)
    if tables == "random":  # halves of cos/sin differ: each half must be read where the reference reads it
        cos, sin = rnd(B, T, R, g=g, grad=False), rnd(B, T, R, g=g, grad=False)
    else:                   # one (1, T, R) table broadcast over the batch, or one per batch row
        cos, sin = rope_tables(B if tables == "per_batch" else 1)
    dq, dk = rnd(B, HQ, T, D, g=g, grad=False), rnd(B, HKV, T, D, g=g, grad=False)
    qkv2 = leaf(qkv)
    q_rot, k_rot = run_rope(apply_rope, qkv, cos, sin, dq, dk)
    q_ref, k_ref = run_rope(apply_rope_reference, qkv2, cos, sin, dq, dk)
    assert q_rot.shape == (B, HQ, T, D) and k_rot.shape == (B, HKV, T, D)
    torch.testing.assert_close(q_rot, q_ref, **TOL32)
    torch.testing.assert_close(k_rot, k_ref, **TOL32)
    torch.testing.assert_close(qkv.grad, qkv2.grad, **TOL32)  # dq, dk; v's slice gets zeros in both


def test_rope_low_precision_bit_exact():
    g = gen(5)
    qkv = rnd(B, T, (HQ + 2 * HKV) * D, g=g, dtype=LOW)
    cos, sin = rope_tables(B)  # fp32 tables: cast to LOW inside, as transformers hands them over
    dq, dk = rnd(B, HQ, T, D, g=g, dtype=LOW, grad=False), rnd(B, HKV, T, D, g=g, dtype=LOW, grad=False)
    qkv2 = leaf(qkv)
    q_rot, k_rot = run_rope(apply_rope, qkv, cos, sin, dq, dk)
    q_ref, k_ref = run_rope(apply_rope_reference, qkv2, cos, sin, dq, dk)
    assert q_rot.dtype == LOW
    assert torch.equal(q_rot, q_ref) and torch.equal(k_rot, k_ref)
    assert torch.equal(qkv.grad, qkv2.grad)


def _rope_interleaved(x, cos, sin):  # GPT-J convention: pairs (x0, x1), (x2, x3), ... rotate together
    Rr = cos.shape[-1]
    c, s = cos[..., : Rr // 2].unsqueeze(1), sin[..., : Rr // 2].unsqueeze(1)
    a, b = x[..., :Rr:2], x[..., 1:Rr:2]
    rot = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    return torch.cat((rot, x[..., Rr:]), dim=-1)


@pytest.mark.parametrize("variant", ["interleaved", "unrotated", "minus_theta", "all_dims_pass"])
def test_rope_tolerance_catches_wrong_conventions(variant):
    g = gen(6)
    qkv = rnd(B, T, (HQ + 2 * HKV) * D, g=g, grad=False)
    q, k = qk_views(qkv)
    cos, sin = rope_tables(B)
    q_rot, _ = apply_rope(q, k, cos, sin)
    wrong = {
        "interleaved": lambda: _rope_interleaved(q, cos, sin),
        "unrotated": lambda: q,
        "minus_theta": lambda: apply_rope_reference(q, k, cos, -sin)[0],
        "all_dims_pass": lambda: apply_rope_reference(q, k, torch.ones_like(cos), torch.zeros_like(sin))[0],
    }[variant]()
    torch.testing.assert_close(q_rot, apply_rope_reference(q, k, cos, sin)[0], **TOL32)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(q_rot, wrong, **TOL32)


def test_rope_rejects_bad_inputs():
    g = gen(7)
    q, k = rnd(B, HQ, T, D, g=g), rnd(B, 3, T, D, g=g)
    cos, sin = rope_tables(B)
    with pytest.raises(ValueError, match="Hkv"):
        apply_rope(q, k, cos, sin)
    with pytest.raises(ValueError, match="no gradient"):
        apply_rope(q, k[:, :2], cos.requires_grad_(), sin)
    with pytest.raises(ValueError, match="even"):
        apply_rope(q, k[:, :2], cos.detach()[..., :11], sin[..., :11])


# -------------------------------------------------------------------------------------------------------- SwiGLU

@pytest.mark.parametrize("lead", [(N,), (3, 5)])
def test_swiglu_fp32_output_and_grad(lead):
    g = gen(8)
    gate_up = rnd(*lead, 2 * I, g=g, scale=2.0)
    dh = rnd(*lead, I, g=g, grad=False)
    gu2 = leaf(gate_up)
    h = swiglu(gate_up)
    h.backward(dh)
    h_ref = swiglu_reference(gu2)
    h_ref.backward(dh)
    assert h.shape == (*lead, I)
    torch.testing.assert_close(h, h_ref, **TOL32)
    torch.testing.assert_close(gate_up.grad, gu2.grad, **TOL32)
    # the gate is the FIRST half: the swapped convention is far outside the tolerance
    up, gate = gate_up.detach().chunk(2, dim=-1)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(h, up * F.silu(gate), **TOL32)


def test_swiglu_low_precision_rounding_order():
    g = gen(9)
    gate_up = rnd(N, 2 * 100, g=g, scale=2.0, dtype=LOW)
    dh = rnd(N, 100, g=g, dtype=LOW, grad=False)
    gu2 = leaf(gate_up)
    h = swiglu(gate_up)
    h.backward(dh)
    h_ref = swiglu_reference(gu2)
    h_ref.backward(dh)
    frac = assert_rounds_like(h, h_ref, max_frac=0.01, what="h")
    assert_rounds_like(gate_up.grad, gu2.grad, max_frac=0.01, what="d(gate_up)")
    # tight enough to see the rounding order: without rounding silu(gate) first, many more elements differ
    gate, up = gate_up.detach().float().chunk(2, dim=-1)
    once = (up * F.silu(gate)).to(LOW)
    assert (ulps(once, h_ref) > 0).float().mean().item() > max(5 * frac, 0.02)


# ----------------------------------------------------------------------------------------- fused cross-entropy

def ce_inputs(seed, lead=(N,), dtype=torch.float32, w_grad=True, logit_scale=3.0, ignore_every=5):
    """hidden (lead, H), W (V, H) giving logits of std ~logit_scale, labels with every 5th one ignored."""
    g = gen(seed)
    hidden = rnd(*lead, H, g=g, dtype=dtype)
    weight = rnd(V, H, g=g, scale=logit_scale * H ** -0.5, dtype=dtype, grad=w_grad)
    labels = torch.randint(0, V, lead, generator=g)
    if ignore_every:
        labels.view(-1)[::ignore_every] = -100
    return hidden, weight, labels.to(DEVICE)


def run_ce(fn, hidden, weight, labels, **kw):
    loss = fn(hidden, weight, labels, **kw)
    loss.backward()
    return loss, hidden.grad, weight.grad


@pytest.mark.parametrize("reduction,chunk_size,w_grad,lead", [
    ("sum", 16, True, (N,)),       # 16 does not divide 37: a ragged last chunk
    ("mean", 16, True, (N,)),
    ("sum", 64, False, (N,)),      # one chunk larger than N; frozen lm_head (the LoRA case)
    ("mean", None, False, (N,)),   # default chunk size
    ("sum", 1, True, (3, 7)),      # one row per chunk; (B, T, H) hidden with (B, T) labels
])
def test_fused_ce_fp32_loss_and_grads(reduction, chunk_size, w_grad, lead):
    hidden, weight, labels = ce_inputs(10, lead=lead, w_grad=w_grad)
    h2, w2 = leaf(hidden), leaf(weight)
    loss, gh, gw = run_ce(fused_linear_cross_entropy, hidden, weight, labels, reduction=reduction,
                          chunk_size=chunk_size)
    loss_ref, gh_ref, gw_ref = run_ce(fused_linear_cross_entropy_reference, h2, w2, labels, reduction=reduction)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, loss_ref, **TOL32)
    torch.testing.assert_close(gh, gh_ref, **TOL32)
    assert gh[labels == -100].abs().max() == 0  # ignored rows get exactly nothing
    if w_grad:
        torch.testing.assert_close(gw, gw_ref, **TOL32)
    else:
        assert gw is None


def test_fused_ce_all_labels_ignored():
    hidden, weight, labels = ce_inputs(11)
    labels[:] = -100
    loss, gh, gw = run_ce(fused_linear_cross_entropy, hidden, weight, labels, reduction="sum", chunk_size=16)
    assert loss.item() == 0 and fused_linear_cross_entropy_reference(hidden, weight, labels, reduction="sum") == 0
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0
    hidden.grad = weight.grad = None
    loss, gh, gw = run_ce(fused_linear_cross_entropy, hidden, weight, labels, reduction="mean", chunk_size=16)
    assert loss.item() == 0 and torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0
    # the deliberate deviation: F.cross_entropy's mean over no targets is 0/0
    assert fused_linear_cross_entropy_reference(hidden, weight, labels, reduction="mean").isnan()


def test_fused_ce_upstream_gradient_and_retain_graph():
    hidden, weight, labels = ce_inputs(12)
    h2, w2 = leaf(hidden), leaf(weight)
    loss = fused_linear_cross_entropy(hidden, weight, labels, reduction="mean", chunk_size=16) * 2.5
    loss.backward(retain_graph=True)
    loss.backward()  # the stored gradients must not have been scaled in place by the first backward
    ref = fused_linear_cross_entropy_reference(h2, w2, labels, reduction="mean") * 2.5
    ref.backward(retain_graph=True)
    ref.backward()
    torch.testing.assert_close(hidden.grad, h2.grad, **TOL32)
    torch.testing.assert_close(weight.grad, w2.grad, **TOL32)


def test_fused_ce_extreme_logits_stay_finite():
    hidden, weight, labels = ce_inputs(13, logit_scale=300.0)  # logits in the thousands: exp overflows unless shifted
    h2, w2 = leaf(hidden), leaf(weight)
    loss, gh, gw = run_ce(fused_linear_cross_entropy, hidden, weight, labels, reduction="sum", chunk_size=16)
    loss_ref, gh_ref, gw_ref = run_ce(fused_linear_cross_entropy_reference, h2, w2, labels, reduction="sum")
    assert torch.isfinite(loss) and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh, gh_ref, atol=1e-3, rtol=1e-5)  # |grad| up to ~1e3 here: 1e-3 is ~1e-6 relative
    torch.testing.assert_close(gw, gw_ref, atol=1e-3, rtol=1e-5)


def test_ce_torch_step_matches_triton_step():
    """The per-chunk step used off CUDA without the interpreter is the same math as the kernel."""
    g = gen(14)
    logits = rnd(N, V, g=g, scale=4.0, grad=False)
    labels = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    labels[::4] = -100
    a, b = logits.clone(), logits.clone()
    loss_a = _softmax_ce_grad_triton_(a, labels, -100, 0.25)
    loss_b = _softmax_ce_grad_torch_(b, labels, -100, 0.25)
    torch.testing.assert_close(loss_a, loss_b, **TOL32)
    torch.testing.assert_close(a, b, **TOL32)
    expected = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(loss_a, expected, **TOL32)


def test_fused_ce_low_precision():
    hidden, weight, labels = ce_inputs(15, dtype=LOW)
    h2, w2 = leaf(hidden), leaf(weight)
    h64, w64 = leaf(hidden, torch.float64), leaf(weight, torch.float64)
    loss, gh, gw = run_ce(fused_linear_cross_entropy, hidden, weight, labels, reduction="sum", chunk_size=16)
    loss_ref, gh_ref, gw_ref = run_ce(fused_linear_cross_entropy_reference, h2, w2, labels, reduction="sum")
    loss64, gh64, gw64 = run_ce(fused_linear_cross_entropy_reference, h64, w64, labels, reduction="sum")
    assert gh.dtype == gw.dtype == LOW
    assert_as_accurate(loss.double(), loss_ref, loss64, "loss")
    assert_as_accurate(gh, gh_ref, gh64, "grad hidden")
    assert_as_accurate(gw, gw_ref, gw64, "grad weight")


def test_fused_ce_rejects_bad_labels():
    hidden, weight, labels = ce_inputs(16)
    labels[3] = V
    with pytest.raises(ValueError, match="outside"):
        fused_linear_cross_entropy(hidden, weight, labels)


# ----------------------------------------------------------------------------- transformers' math (references)

def test_references_match_transformers_bf16():
    """The references reproduce transformers' Phi-3 modules bit for bit (plain torch, no kernels)."""
    modeling = pytest.importorskip("transformers.models.phi3.modeling_phi3")
    g = gen(17)
    x = rnd(N, 100, g=g, scale=3.0, dtype=torch.bfloat16, grad=False, device="cpu")
    norm = modeling.Phi3RMSNorm(100, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(100, generator=g) * 0.3)
        assert torch.equal(rms_norm_reference(x, norm.weight, 1e-5), norm(x))
    qkv = rnd(B, T, (HQ + 2 * HKV) * D, g=g, dtype=torch.bfloat16, grad=False, device="cpu")
    q, k = qk_views(qkv)
    cos, sin = rope_tables(B, device="cpu")
    ours = apply_rope_reference(q, k, cos, sin)
    theirs = modeling.apply_rotary_pos_emb(q, k, cos.to(torch.bfloat16), sin.to(torch.bfloat16))
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


# ------------------------------------------------------------------------------------ GPU, Phi-3-mini's sizes

@pytest.mark.gpu
def test_gpu_rms_norm_bf16_phi3():
    g = gen(20)
    x = rnd(4096, 3072, g=g, dtype=torch.bfloat16)
    w = (1 + rnd(3072, g=g, scale=0.3, grad=False)).to(torch.bfloat16).requires_grad_()
    dy = rnd(4096, 3072, g=g, dtype=torch.bfloat16, grad=False)
    x2, w2 = leaf(x), leaf(w)
    y, y_ref = rms_norm(x, w, 1e-5), rms_norm_reference(x2, w2, 1e-5)
    y.backward(dy)
    y_ref.backward(dy)
    assert_rounds_like(y, y_ref, max_frac=0.001, what="y")
    x32, w32 = leaf(x, torch.float32), leaf(w, torch.float32)  # fp32 is the truth at bf16's precision
    rms_norm_reference(x32, w32, 1e-5).backward(dy.float())
    assert_as_accurate(x.grad, x2.grad, x32.grad.double(), "dx")
    assert_as_accurate(w.grad, w2.grad, w32.grad.double(), "dweight")


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,d,r", [(32, 32, 96, 96), (24, 8, 128, 96)])  # Phi-3-mini; Phi-4-mini (GQA, partial)
def test_gpu_rope_bf16_bit_exact(hq, hkv, d, r):
    g = gen(21)
    Bg, Tg = 2, 2048
    qkv = rnd(Bg, Tg, (hq + 2 * hkv) * d, g=g, dtype=torch.bfloat16)
    q, k = qk_views(qkv, T=Tg, HQ=hq, HKV=hkv, D=d)
    cos, sin = rope_tables(Bg, T=Tg, R=r)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    qkv2 = leaf(qkv)
    q2, k2 = qk_views(qkv2, T=Tg, HQ=hq, HKV=hkv, D=d)
    out, ref = apply_rope(q, k, cos, sin), apply_rope_reference(q2, k2, cos, sin)
    torch.autograd.backward(out, [dq, dk])
    torch.autograd.backward(ref, [dq, dk])
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    assert torch.equal(qkv.grad, qkv2.grad)


@pytest.mark.gpu
def test_gpu_swiglu_bf16_phi3():
    g = gen(22)
    gate_up = rnd(4096, 2 * 8192, g=g, scale=2.0, dtype=torch.bfloat16)
    dh = rnd(4096, 8192, g=g, dtype=torch.bfloat16, grad=False)
    gu2 = leaf(gate_up)
    h, h_ref = swiglu(gate_up), swiglu_reference(gu2)
    h.backward(dh)
    h_ref.backward(dh)
    assert_rounds_like(h, h_ref, max_frac=0.001, what="h")
    assert_rounds_like(gate_up.grad, gu2.grad, max_frac=0.001, what="d(gate_up)")


def _phi3_ce_inputs(w_grad):
    g = gen(23)
    Ng, Hg, Vg = 4096, 3072, 32064
    hidden = rnd(Ng, Hg, g=g, dtype=torch.bfloat16)
    weight = rnd(Vg, Hg, g=g, scale=3.0 * Hg ** -0.5, dtype=torch.bfloat16, grad=w_grad)
    labels = torch.randint(0, Vg, (Ng,), generator=g)
    labels[::3] = -100
    return hidden, weight, labels.to(DEVICE)


@pytest.mark.gpu
def test_gpu_fused_ce_bf16_phi3():
    hidden, weight, labels = _phi3_ce_inputs(w_grad=True)
    h2, w2 = leaf(hidden), leaf(weight)
    h32, w32 = leaf(hidden, torch.float32), leaf(weight, torch.float32)
    loss, gh, gw = run_ce(fused_linear_cross_entropy, hidden, weight, labels, reduction="sum")
    loss_ref, gh_ref, gw_ref = run_ce(fused_linear_cross_entropy_reference, h2, w2, labels, reduction="sum")
    loss32, gh32, gw32 = run_ce(fused_linear_cross_entropy_reference, h32, w32, labels, reduction="sum")
    assert_as_accurate(loss.double(), loss_ref, loss32.double(), "loss")
    assert_as_accurate(gh, gh_ref, gh32.double(), "grad hidden")
    assert_as_accurate(gw, gw_ref, gw32.double(), "grad weight")


@pytest.mark.gpu
def test_gpu_fused_ce_peak_memory_below_fp32_logits():
    hidden, weight, labels = _phi3_ce_inputs(w_grad=False)  # frozen lm_head, as LoRA trains
    logits_fp32 = hidden.shape[0] * weight.shape[0] * 4      # 525 MB

    def peak_extra(fn):
        hidden.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(hidden, weight, labels, reduction="sum").backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    fused, unfused = peak_extra(fused_linear_cross_entropy), peak_extra(fused_linear_cross_entropy_reference)
    assert unfused > logits_fp32, (unfused, logits_fp32)  # the measurement sees the logits when they exist
    assert fused < logits_fp32 / 2, f"fused CE peak {fused / 2**20:.0f} MiB (fp32 logits: {logits_fp32 / 2**20:.0f})"
