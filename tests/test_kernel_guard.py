"""The runtime guard (kernels/_triton.py): the first run of each kernel on a device is compared with its torch
reference on a small slice; a compile error or a mismatch warns once and the kernel falls back to torch for the rest
of the process; PHI3LORA_STRICT_KERNELS=1 raises instead. On the CPU the kernels run in Triton's interpreter and
the guard is switched on for it (CHECK_ON_CPU); failures are forced by replacing a launcher."""
import warnings

import pytest
import torch

from phi3lora.kernels import _triton, cross_entropy, lora_matmul, rmsnorm, rope, silu_mul
from phi3lora.kernels.reference import (apply_rope_reference, fused_linear_cross_entropy_reference,
                                        lora_linear_reference, rms_norm_reference, swiglu_reference)

pytestmark = pytest.mark.skipif(not (_triton.HAS_TRITON and (_triton.INTERPRET or torch.cuda.is_available())),
                                reason="needs Triton's interpreter or CUDA")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def fresh_guard(monkeypatch):
    """A process that has not run any kernel yet, with the guard on for the interpreter too."""
    monkeypatch.setattr(_triton, "FAILED", {})
    monkeypatch.setattr(_triton, "CHECKED", set())
    monkeypatch.setattr(_triton, "CHECK_ON_CPU", True)
    monkeypatch.delenv("PHI3LORA_STRICT_KERNELS", raising=False)


def rms_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 24, generator=g).to(DEVICE).requires_grad_()
    w = (1 + 0.2 * torch.randn(24, generator=g)).to(DEVICE).requires_grad_()
    return x, w


def grads_of(fn, *inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.pow(2).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def test_good_kernels_pass_the_check_silently():
    x, w = rms_inputs()
    gate_up = torch.randn(4, 6, 2 * 40, device=DEVICE)
    q, k = torch.randn(2, 4, 6, 16, device=DEVICE), torch.randn(2, 2, 6, 16, device=DEVICE)
    cos, sin = torch.randn(1, 6, 16, device=DEVICE), torch.randn(1, 6, 16, device=DEVICE)
    W, A, B = (torch.randn(33, 20, device=DEVICE), torch.randn(4, 20, device=DEVICE),
               torch.randn(33, 4, device=DEVICE))
    hidden, lm = torch.randn(10, 16, device=DEVICE), torch.randn(50, 16, device=DEVICE)
    labels = torch.randint(0, 50, (10,), device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads_of(lambda a, b: rmsnorm.rms_norm(a, b, 1e-5), x, w)
        grads_of(silu_mul.swiglu, gate_up)
        grads_of(lambda a, b: torch.cat([t.flatten() for t in rope.apply_rope(a, b, cos, sin)]), q, k)
        grads_of(lambda a: lora_matmul.lora_linear(a, W, None, A, B, 2.0), torch.randn(3, 7, 20, device=DEVICE))
        grads_of(lambda h: cross_entropy.fused_linear_cross_entropy(h, lm, labels), hidden)
    assert _triton.FAILED == {}
    assert {name for name, _ in _triton.CHECKED} == {
        "rmsnorm", "rmsnorm backward", "swiglu", "swiglu backward", "rope", "rope backward", "lora_linear",
        "lora_linear backward", "fused_ce"}


def test_compile_error_warns_once_and_falls_back(monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("PTXASError: ptxas fatal : (a compile error, forced by the test)")

    monkeypatch.setattr(rmsnorm, "rms_norm_forward", broken)
    x, w = rms_inputs()
    want, want_grads = grads_of(lambda a, b: rms_norm_reference(a, b, 1e-5), x, w)
    with pytest.warns(RuntimeWarning, match=r"Triton kernel rmsnorm failed on cpu .*PTXASError"):
        got, got_grads = grads_of(lambda a, b: rmsnorm.rms_norm(a, b, 1e-5), x, w)
    torch.testing.assert_close(got, want)
    for g, h in zip(got_grads, want_grads):
        torch.testing.assert_close(g, h)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, and the kernel is not tried again
        rmsnorm.rms_norm(x, w, 1e-5)
    assert len(calls) == 1 and "rmsnorm" in _triton.FAILED


def test_mismatch_falls_back(monkeypatch):
    monkeypatch.setattr(silu_mul, "swiglu_forward", lambda gu2: torch.zeros_like(gu2[:, : gu2.shape[1] // 2]))
    gate_up = torch.randn(4, 2 * 40, device=DEVICE)
    with pytest.warns(RuntimeWarning, match=r"swiglu failed .*relative error"):
        h = silu_mul.swiglu(gate_up)
    torch.testing.assert_close(h, swiglu_reference(gate_up))
    assert "swiglu" in _triton.FAILED


def test_backward_failure_falls_back_to_the_reference_gradient(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access (forced by the test)")

    monkeypatch.setattr(rmsnorm, "rms_norm_backward", broken)
    x, w = rms_inputs()
    _, want = grads_of(lambda a, b: rms_norm_reference(a, b, 1e-5), x, w)
    with pytest.warns(RuntimeWarning, match="rmsnorm failed"):
        _, got = grads_of(lambda a, b: rmsnorm.rms_norm(a, b, 1e-5), x, w)
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-6)


def test_lora_linear_mismatch_in_backward(monkeypatch):
    real = lora_matmul.matmul_lowrank

    def wrong_dx(a, b, u=None, v=None, scaling=1.0, bias=None):
        out = real(a, b, u, v, scaling, bias)
        return out if b.shape[1] != 20 else out * 2  # the forward is right, dX (K = 20 columns) is not

    monkeypatch.setattr(lora_matmul, "matmul_lowrank", wrong_dx)
    W, A, B = torch.randn(33, 20, device=DEVICE), torch.randn(4, 20, device=DEVICE), torch.randn(33, 4, device=DEVICE)
    x = torch.randn(3, 7, 20, device=DEVICE)
    want, want_grads = grads_of(lambda a, b, c: lora_linear_reference(a, W, None, b, c, 2.0), x, A, B)
    with pytest.warns(RuntimeWarning, match="lora_linear failed"):
        got, got_grads = grads_of(lambda a, b, c: lora_matmul.lora_linear(a, W, None, b, c, 2.0), x, A, B)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, h in zip(got_grads, want_grads):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-5)


def test_fused_ce_mismatch_recomputes_the_chunk(monkeypatch):
    def wrong(logits, labels, ignore_index, scale):
        logits.fill_(0.5)  # the kernel scribbled over the chunk before the check caught it
        return torch.zeros(logits.shape[0], device=logits.device)

    monkeypatch.setattr(cross_entropy, "_softmax_ce_grad_triton_", wrong)
    hidden, lm = torch.randn(10, 16, device=DEVICE), torch.randn(50, 16, device=DEVICE)
    labels = torch.randint(0, 50, (10,), device=DEVICE)
    want, (want_grad,) = grads_of(lambda h: fused_linear_cross_entropy_reference(h, lm, labels), hidden)
    with pytest.warns(RuntimeWarning, match="fused_ce failed"):
        got, (got_grad,) = grads_of(lambda h: cross_entropy.fused_linear_cross_entropy(h, lm, labels, chunk_size=4),
                                    hidden)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


def test_strict_mode_raises(monkeypatch):
    monkeypatch.setenv("PHI3LORA_STRICT_KERNELS", "1")
    monkeypatch.setattr(rope, "rope_launch", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("forced")))
    q, k = torch.randn(1, 2, 3, 8, device=DEVICE), torch.randn(1, 2, 3, 8, device=DEVICE)
    cos, sin = torch.randn(1, 3, 8, device=DEVICE), torch.randn(1, 3, 8, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"Triton kernel rope failed on .*PHI3LORA_STRICT_KERNELS"):
        rope.apply_rope(q, k, cos, sin)
    monkeypatch.delenv("PHI3LORA_STRICT_KERNELS")
    with pytest.warns(RuntimeWarning, match="rope failed"):
        out = rope.apply_rope(q, k, cos, sin)
    want = apply_rope_reference(q, k, cos, sin)
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
