"""kernels.nf4 against bitsandbytes (0.50, on the CPU): the packed codes, scales, nested scales, quant-state JSON and
the dequantized weight equal bitsandbytes' bit for bit; the Triton dequant kernel equals the torch one."""
import json

import pytest
import torch

from phi3lora.kernels.nf4 import NF4_CODE, NF4Meta, dequantize_nf4, dynamic_map, quantize_nf4, unpack_codes
from phi3lora.kernels.nf4_dequant import dequantize_nf4_triton

bnb_functional = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(autouse=True)
def eager_bitsandbytes():
    """bitsandbytes wraps its fallback dequantizer in torch.compile (one compile per shape, seconds each on the
    CPU); the eager function is the same computation. The config's own patch(), not monkeypatch: pytest 9.2's
    monkeypatch undoes an attribute of torch's config module by deleting it, which breaks every later test."""
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield

# odd sizes: a partial last 64-block, an odd element count (a padding nibble), more than 256 blocks (several nested
# blocks, the last partial), a vector
SHAPES = [(64, 128), (37, 50), (300, 333), (3,), (129, 257)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def weight(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w = w * torch.rand(shape, generator=g).pow(3) * 4  # uneven block scales: the nested codes spread out
    return w.to(dtype)


def bnb_quantize(w, double_quant=True):
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=double_quant,
                                                 quant_type="nf4")
    return packed, state, {"weight." + k: v for k, v in state.as_dict(packed=True).items()}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_equals_bitsandbytes(shape, dtype):
    w = weight(shape, dtype, seed=sum(shape))
    packed, state, theirs = bnb_quantize(w)
    ours = quantize_nf4(w)
    assert torch.equal(ours["weight"], packed)
    assert set(ours) == {"weight", *theirs}
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    assert ours["weight.absmax"].dtype == torch.uint8  # double quantized
    dense = dequantize_nf4(ours, dtype)
    assert dense.dtype == dtype and dense.shape == w.shape
    assert torch.equal(dense, bnb_dequantize(packed, state))


def bnb_dequantize(packed, state):
    """bitsandbytes' dequantize_4bit; for rows of an even length that is no multiple of 64, its torch (= CUDA)
    path: 0.50.2's CPU C kernel disagrees with both there (e.g. (40, 96)), while Phi-3's rows are multiples of 64."""
    if state.shape[-1] % 64 == 0 or state.shape[-1] % 2:
        return bnb_functional.dequantize_4bit(packed, state)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    scales = state.absmax
    if state.nested:
        scales = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return _dequantize_4bit_compute(packed.reshape(-1), scales, state.code, 64, state.shape, state.dtype)


def test_nested_rounding_on_many_scales():
    """~10⁶ scales: bitsandbytes' CPU 8-bit quantizer is a lookup table, not nearest; the near-midpoint cases
    (a few hundred here) must round its way."""
    w = torch.randn(2048, 4096) * torch.rand(2048, 1)  # 131072 blocks of 64, 512 nested blocks
    packed, state, theirs = bnb_quantize(w)
    ours = quantize_nf4(w)
    assert torch.equal(ours["weight.absmax"], theirs["weight.absmax"])
    assert torch.equal(ours["weight.nested_absmax"], theirs["weight.nested_absmax"])


def test_without_double_quant_equals_bitsandbytes():
    w = weight((37, 50), torch.bfloat16, seed=1)
    packed, state, theirs = bnb_quantize(w, double_quant=False)
    ours = quantize_nf4(w, double_quant=False)
    assert set(ours) == {"weight", *theirs}
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    assert ours["weight.absmax"].dtype == torch.float32
    assert torch.equal(dequantize_nf4(ours), bnb_dequantize(packed, state))


def test_tables_and_quant_state():
    assert torch.equal(dynamic_map(), bnb_functional.create_dynamic_map())
    assert torch.equal(torch.tensor(NF4_CODE), bnb_functional.get_4bit_type("nf4", device="cpu"))
    t = quantize_nf4(torch.randn(8, 64))
    meta = NF4Meta.from_tensor(t["weight.quant_state.bitsandbytes__nf4"])
    assert meta.shape == (8, 64) and meta.dtype == "float32" and meta.double_quant
    bad = torch.tensor(list(json.dumps({"quant_type": "fp4", "blocksize": 64}).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="only nf4"):
        NF4Meta.from_tensor(bad, "x.weight")


def test_dequantize_reads_bitsandbytes_state_dict():
    """A bitsandbytes Linear4bit's own state dict (what a "-bnb-4bit" checkpoint holds) dequantizes here as there."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(128, 40, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(torch.randn(40, 128) * 0.05, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    layer = layer.to("cpu")  # quantizes
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    assert "weight.quant_state.bitsandbytes__nf4" in state
    qs = bnb_functional.QuantState.from_dict({k[len("weight."):]: v for k, v in state.items() if k != "weight"},
                                             device="cpu")
    assert torch.equal(dequantize_nf4(state, torch.float32), bnb_functional.dequantize_4bit(state["weight"], qs))


def test_round_trip_error_is_nf4_sized():
    """Quantization error bounded by half the widest NF4 gap (0.304 → 0.152) times the block's absmax."""
    w = torch.randn(64, 256)
    dense = dequantize_nf4(quantize_nf4(w), torch.float32)
    absmax = w.view(-1, 64).abs().amax(1, keepdim=True)
    err = (dense - w).view(-1, 64).abs() / absmax
    assert err.max() < 0.16 + 0.01  # + the 8-bit nested scale error
    assert 0.01 < err.mean() < 0.06


def test_unpack_order():
    packed = torch.tensor([[0x1F], [0xA2]], dtype=torch.uint8)
    assert unpack_codes(packed, 3).tolist() == [1, 15, 10]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [True, False])
def test_triton_dequant_equals_torch(dtype, double_quant):
    w = weight((129, 257), torch.float32, seed=3)  # odd numel, 518 blocks: 3 nested blocks
    t = quantize_nf4(w, double_quant=double_quant)
    assert torch.equal(dequantize_nf4_triton(t, dtype, block=4096), dequantize_nf4(t, dtype))


def test_bad_input():
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(4, 64), blocksize=48)
    with pytest.raises(ValueError, match="fp32"):
        quantize_nf4(torch.ones(4, 64, dtype=torch.int32))
