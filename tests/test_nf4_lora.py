"""kernels.nf4_lora (the fused GEMM decoding NF4 tiles) against nf4_lora_linear_reference (dense dequant + torch).

On the CPU these run in Triton's interpreter with 32x32x32 tiles, so the odd shapes span several tiles with ragged
edges in M, N and K. Two decodes: K = 72 makes the 64-element scale blocks straddle rows and tiles (the per-element
fallback); K = 128 is a multiple of the blocksize, as Phi-3's projections are (the aligned path)."""
import pytest
import torch

import phi3lora.kernels.nf4_lora as nf4_lora
from phi3lora.kernels.nf4 import NF4Meta, dequantize_nf4, nf4_quant_state, quantize_nf4
from phi3lora.kernels.nf4_lora import nf4_aligned, nf4_lora_linear, nf4_lora_linear_reference, nf4_matmul_lowrank

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
M, K, N, R, S = 37, 72, 100, 8, 2.0
K_ALIGNED, N_ALIGNED = 128, 80  # two 64-blocks per row; N = 80 leaves a ragged 16-wide tile (dX reduces over it)


def make(dtype, lead=(M,), k=K, n=N, r=R, bias=True, seed=0, **quant):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dt).requires_grad_()

    tensors = {k_: v.to(DEVICE) for k_, v in quantize_nf4(torch.randn(n, k, generator=g) * k ** -0.5,
                                                            **quant).items()}
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
@pytest.mark.parametrize("k,n", [(K, N), (K_ALIGNED, N_ALIGNED)], ids=["per-element", "aligned"])
def test_forward_and_grads_match_reference(dtype, tol, lead, k, n):
    tensors, leaves = make(dtype, lead=lead, k=k, n=n)
    assert nf4_aligned(nf4_quant_state(tensors)) == (k == K_ALIGNED)
    dy = torch.randn(*lead, n, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    y, grads = run(nf4_lora_linear, tensors, leaves, dy)
    y_ref, grads_ref = run(nf4_lora_linear_reference, tensors, leaves, dy)
    assert y.dtype == dtype and y.shape == (*lead, n)
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
    return nf4_quant_state(tensors)


# (n, k, blocksize, double quant, interpreter tiles): which decode and which of its branches
DECODES = {
    "aligned": (N_ALIGNED, K_ALIGNED, 64, True, None),           # 32-wide tiles inside one 64-block per row
    "aligned-fp32-absmax": (N_ALIGNED, K_ALIGNED, 64, False, None),
    # 64-wide tiles over two 32-blocks per row; K = 96 and N = 80 are not multiples of 64: the forward's last k
    # tile and the backward's last column tile wrap past K, dX's last reduction tile wraps past N
    "aligned-2-blocks-per-tile": (N_ALIGNED, 96, 32, True, dict(BLOCK_N=64, BLOCK_K=64)),
    "per-element": (N, K, 64, True, None),                         # blocks straddle rows
}


def _tiles(monkeypatch, tiles):
    if tiles:
        monkeypatch.setattr(nf4_lora, "_INTERPRET_META", dict(nf4_lora._INTERPRET_META, **tiles))


@pytest.mark.parametrize("decode", DECODES)
def test_decoded_weight_is_the_reference_bit_for_bit(decode, monkeypatch):
    """I·W' is the decoded tile itself (one product per output, the rest exact zeros): fp32, both directions,
    equal to dequantize_nf4 bit for bit, on each decode path."""
    n, k, blocksize, double_quant, tiles = DECODES[decode]
    _tiles(monkeypatch, tiles)
    tensors, _ = make(torch.float32, k=k, n=n, blocksize=blocksize, double_quant=double_quant)
    meta = _meta(tensors)
    assert nf4_aligned(meta) == decode.startswith("aligned")
    w = dequantize_nf4(tensors, torch.float32)                            # (n, k)
    assert torch.equal(nf4_matmul_lowrank(torch.eye(k, device=DEVICE), tensors, meta, True), w.t())
    assert torch.equal(nf4_matmul_lowrank(torch.eye(n, device=DEVICE), tensors, meta, False), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decode", [d for d in DECODES if d.startswith("aligned")])
def test_aligned_path_equals_the_per_element_one_bitwise(decode, dtype, monkeypatch):
    """The same GEMM (forward with LoRA and bias, dX with LoRA) through both decodes: identical bits on a GPU, since
    both compute the same fp32 value·scale products, round them to the input dtype alike, and the compiled tl.dot
    sums them in an order that does not depend on where its operand came from.

    Not in the interpreter's forward: there tl.dot is numpy.matmul, and the aligned forward's tile is tl.trans of a
    (BLOCK_N, BLOCK_K) one, a transposed numpy view, for which OpenBLAS picks another kernel and summation order
    than for the per-element path's contiguous tile (fp32 32x32x32 tiles: different bits in ~1/3 of the outputs,
    each < 1 ulp of the sum of |terms|). So there the forward is held to what two summation orders of the same
    fp32 terms can differ by, (terms)·eps·Σ|term|: ~2e-5 of Σ|term|, while one wrongly decoded weight moves an
    output by ~Σ|term|/K (1e-2 here). The decode itself is checked bit for bit above; dX (no transpose) is too."""
    n, k, blocksize, double_quant, tiles = DECODES[decode]
    _tiles(monkeypatch, tiles)
    tensors, _ = make(torch.float32, k=k, n=n, blocksize=blocksize, double_quant=double_quant)
    meta = _meta(tensors)
    g = torch.Generator().manual_seed(3)
    x, dy = torch.randn(M, k, generator=g).to(DEVICE, dtype), torch.randn(M, n, generator=g).to(DEVICE, dtype)
    u, bias = torch.randn(M, R, generator=g).to(DEVICE, dtype), torch.randn(n, generator=g).to(DEVICE, dtype)
    vf, vb = torch.randn(R, n, generator=g).to(DEVICE, dtype), torch.randn(R, k, generator=g).to(DEVICE, dtype)
    outs = {}
    for aligned in (True, False):
        monkeypatch.setattr(nf4_lora, "nf4_aligned", lambda meta, aligned=aligned: aligned)
        outs[aligned] = (nf4_matmul_lowrank(x, tensors, meta, True, u, vf, S, bias),
                         nf4_matmul_lowrank(dy, tensors, meta, False, u, vb, S))
    for got, want in zip(outs[True], outs[False]):
        assert got.dtype == dtype
    (fwd, dx), (fwd_want, dx_want) = outs[True], outs[False]
    assert torch.equal(dx, dx_want)
    if torch.cuda.is_available():
        assert torch.equal(fwd, fwd_want)
        return
    w = dequantize_nf4(tensors, dtype).double().abs()                     # (n, k) as the kernel rounds it
    magnitude = x.double().abs() @ w.t() + S * u.double().abs() @ vf.double().abs() + bias.double().abs()
    bound = (k + R + 2) * torch.finfo(torch.float32).eps * magnitude      # (M, n): K + R products, bias, acc
    if dtype != torch.float32:  # then each rounds its fp32 sum to dtype: one ulp more where they straddle a tie
        bound += fwd_want.double().abs() * torch.finfo(dtype).eps
    assert ((fwd.double() - fwd_want.double()).abs() <= bound).all()


def test_launcher_takes_the_aligned_path_for_phi3_shapes(monkeypatch):
    """nf4_aligned says yes for every Phi-3-mini projection (W (N, K), blocksize 64), no where a scale block would
    straddle rows; and the launcher passes its answer to the kernel (ALIGNED), with the direction (TRANSPOSE_W)."""
    for n, k in [(9216, 3072), (3072, 3072), (16384, 3072), (3072, 8192)]:   # qkv, o, gate_up, down
        assert nf4_aligned(NF4Meta(shape=(n, k)))
    assert not nf4_aligned(NF4Meta(shape=(N, K)))                            # 72 % 64
    assert not nf4_aligned(NF4Meta(shape=(64, 96)))
    assert nf4_aligned(NF4Meta(shape=(64, 96), blocksize=32))

    launches = []

    class Spy:  # stands in for the kernel (interpreter) or its autotuner (GPU): records, then launches
        def __init__(self, real):
            self.real = real

        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append((kw["ALIGNED"], kw["TRANSPOSE_W"]))
                assert kw["enable_fp_fusion"] is False  # the scale rounded twice, as the reference does
                return self.real[grid](*args, **kw)
            return launch

    for name in ("_nf4_matmul_lowrank_kernel", "_nf4_matmul_lowrank_tuned", "_nf4_matmul_lowrank_tuned_aligned"):
        monkeypatch.setattr(nf4_lora, name, Spy(getattr(nf4_lora, name)))
    for k, n, aligned in ((K_ALIGNED, N_ALIGNED, True), (K, N, False)):
        tensors, leaves = make(torch.float32, k=k, n=n, r=0, bias=False)
        x = leaves["x"].detach()
        nf4_matmul_lowrank(x[:4], tensors, _meta(tensors), True)
        nf4_matmul_lowrank(torch.ones(4, n, device=DEVICE), tensors, _meta(tensors), False)
        assert launches[-2:] == [(aligned, True), (aligned, False)]


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
