"""kernels.nf4_lora (the fused GEMM decoding NF4 tiles) against nf4_lora_linear_reference (dense dequant + torch).

On the CPU these run in Triton's interpreter with 32x32x32 tiles, so the odd shapes span several tiles with ragged
edges in M, N and K, and K = 72 makes the 64-element scale blocks straddle rows and tiles."""
import pytest
import torch

from kernels.nf4 import dequantize_nf4, quantize_nf4
from kernels.nf4_lora import nf4_lora_linear, nf4_lora_linear_reference, nf4_matmul_lowrank

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
M, K, N, R, S = 37, 72, 100, 8, 2.0


def make(dtype, lead=(M,), k=K, n=N, r=R, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dt).requires_grad_()

    tensors = {k_: v.to(DEVICE) for k_, v in quantize_nf4(torch.randn(n, k, generator=g) * k ** -0.5).items()}
    return tensors, dict(x=rnd(*lead, k), bias=rnd(n) if bias else None,
                         lora_A=rnd(r, k, scale=k ** -0.5, dt=torch.float32),  # fp32 adapters, as train.py
                         lora_B=rnd(n, r, scale=r ** -0.5 if r else 1.0, dt=torch.float32))


def run(fn, tensors, leaves, dy, lora_x=None):
    fresh = {name: None if t is None else t.detach().clone().requires_grad_() for name, t in leaves.items()}
    y = fn(fresh["x"], tensors, fresh["bias"], fresh["lora_A"], fresh["lora_B"], S, lora_x=lora_x)
    y.backward(dy)
    return y, {name: t.grad for name, t in fresh.items() if t is not None}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("lead", [(M,), (3, 13)])
def test_forward_and_grads_match_reference(dtype, tol, lead):
    tensors, leaves = make(dtype, lead=lead)
    dy = torch.randn(*lead, N, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    y, grads = run(nf4_lora_linear, tensors, leaves, dy)
    y_ref, grads_ref = run(nf4_lora_linear_reference, tensors, leaves, dy)
    assert y.dtype == dtype and y.shape == (*lead, N)
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    assert set(grads) == set(grads_ref) == {"x", "bias", "lora_A", "lora_B"}
    for name in grads:
        assert grads[name].dtype == grads_ref[name].dtype, name
        torch.testing.assert_close(grads[name], grads_ref[name], atol=tol, rtol=tol, msg=name)


def test_base_gemm_is_the_dequantized_weight_exactly():
    """fp32, no LoRA, no bias: x·dequant(W4)ᵀ and dY·dequant(W4), both directions of the decode."""
    tensors, leaves = make(torch.float32)
    w = dequantize_nf4(tensors, torch.float32)                            # (N, K)
    x = leaves["x"].detach()
    torch.testing.assert_close(nf4_matmul_lowrank(x, tensors, _meta(tensors), True), x @ w.t(), atol=1e-5, rtol=1e-5)
    dy = torch.randn(M, N, device=DEVICE)
    torch.testing.assert_close(nf4_matmul_lowrank(dy, tensors, _meta(tensors), False), dy @ w, atol=1e-5, rtol=1e-5)


def _meta(tensors):
    from kernels.nf4 import nf4_quant_state
    return nf4_quant_state(tensors)


def test_dropout_input_and_no_bias():
    """A separate low-rank input (LoRA dropout): dX and d(x_l) come back separately, as in the reference."""
    tensors, leaves = make(torch.float32, bias=False)
    lx = (leaves["x"].detach() * 0.5).requires_grad_()
    dy = torch.randn(M, N, device=DEVICE)
    outs = []
    for fn in (nf4_lora_linear, nf4_lora_linear_reference):
        lx_i = lx.detach().clone().requires_grad_()
        y, grads = run(fn, tensors, leaves, dy, lora_x=lx_i)
        outs.append((y, grads, lx_i.grad))
    (y, g, dlx), (y_ref, g_ref, dlx_ref) = outs
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dlx, dlx_ref, atol=1e-4, rtol=1e-4)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-4, rtol=1e-4, msg=name)


def test_rank_zero_and_shape_check():
    tensors, leaves = make(torch.float32, r=0)
    x = leaves["x"].detach()
    y = nf4_lora_linear(x, tensors, None, leaves["lora_A"].detach(), leaves["lora_B"].detach(), S)
    torch.testing.assert_close(y, x @ dequantize_nf4(tensors, torch.float32).t(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="features"):
        nf4_lora_linear(torch.randn(2, K + 1, device=DEVICE), tensors, None, leaves["lora_A"], leaves["lora_B"], S)
