"""NF4 (4-bit NormalFloat) weights in bitsandbytes' exact format: quantize and dequantize, in plain torch.

QLoRA (https://arxiv.org/abs/2305.14314) stores a frozen weight W (N, K) as 4-bit codes into a fixed table of 16
values, one fp32 scale (absmax) per block of 64 consecutive elements of W flattened row-major; double quantization
stores those scales as 8-bit codes too (blocks of 256, bitsandbytes' signed "dynamic" 8-bit map, after subtracting
their mean). The result here is bitsandbytes' (0.50) `quantize_4bit(W, blocksize=64, quant_type="nf4",
compress_statistics=True)` bit for bit, under its state-dict key names, so files interchange with transformers'
`load_in_4bit` checkpoints:

    weight                                  uint8 ((numel + 1) // 2, 1): element 2j in the high nibble, 2j+1 low
    weight.absmax                           uint8 (blocks,) with double quant, else fp32 (blocks,)
    weight.quant_map                        fp32 (16,): NF4_CODE
    weight.nested_absmax                    fp32 (ceil(blocks / 256),)            double quant only
    weight.nested_quant_map                 fp32 (256,): the dynamic map          double quant only
    weight.quant_state.bitsandbytes__nf4    uint8 JSON: quant_type, blocksize, dtype, shape, nested_* and the
                                            offset (the mean subtracted before the nested quantization)

Dequantization, as bitsandbytes computes it (fp32 throughout, one rounding to the output dtype at the end):
    scale[b] = nested_quant_map[absmax[b]] · nested_absmax[b // 256] + offset        (fp32 products and sum)
    W[j]     = quant_map[nibble j] · scale[j // 64]

Layers: `quantize_nf4` / `dequantize_nf4` (plain torch: the contract), `nf4_quant_state` / `NF4Meta` (the JSON
entry). The Triton side is elsewhere, so that loading a checkpoint imports no Triton: nf4_dequant.py
(`dequantize_nf4_triton`, the `decode_nf4` device function) and nf4_lora.py (the fused GEMM, which decodes tiles
with `decode_nf4` when W's rows are not whole 64-blocks, else with its own aligned decode).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch


# The 16 NF4 values (QLoRA appendix E; bitsandbytes' table, index 0..15). Asymmetric: 8 negative levels including
# -1, 7 positive levels plus 0 and 1, so zero is exact. Hard-coded, as bitsandbytes does.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NESTED_BLOCKSIZE = 256  # double quantization: one fp32 scale per 256 absmax values
QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts


def nf4_code(device=None) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def dynamic_map(device=None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" map (https://arxiv.org/abs/1511.04561), sorted, 256 fp32 values.

    Exponent i = 0..6 contributes the midpoints of 2^i + 1 equally spaced points in [0.1, 1], scaled by 10^(i-6),
    with both signs (2 · 127 values); then 0 and 1. Computed in fp32 as bitsandbytes does, so the table is its
    `create_dynamic_map()` exactly (a test checks)."""
    values = [0.0, 1.0]
    for i in range(7):
        points = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        mids = (points[:-1] + points[1:]) / 2.0                          # fp32
        values += (10 ** (i - 6) * mids).tolist() + (-(10 ** (i - 6)) * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


# ----- the JSON quant state ------------------------------------------------------------------------------------
@dataclass
class NF4Meta:
    """The non-tensor part of a 4-bit weight: the `weight.quant_state.bitsandbytes__nf4` JSON entry."""
    shape: tuple
    dtype: str = "bfloat16"            # the dtype the weight had (bitsandbytes dequantizes to it by default)
    blocksize: int = 64
    nested_offset: float | None = None  # None: no double quantization
    nested_blocksize: int = NESTED_BLOCKSIZE
    nested_dtype: str = "float32"

    @property
    def double_quant(self) -> bool:
        return self.nested_offset is not None

    def to_tensor(self) -> torch.Tensor:
        # bitsandbytes' key order and json.dumps defaults, so the bytes equal the ones it writes
        d = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": self.dtype, "shape": list(self.shape)}
        if self.double_quant:
            d.update(nested_blocksize=self.nested_blocksize, nested_dtype=self.nested_dtype,
                     nested_offset=self.nested_offset)
        return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)

    @classmethod
    def from_tensor(cls, t: torch.Tensor, where: str = "quant state") -> "NF4Meta":
        try:
            d = json.loads(bytes(t.to(torch.uint8).cpu().tolist()).decode("utf-8"))
            if d.get("quant_type") != "nf4":
                raise ValueError(f"quant_type {d.get('quant_type')!r} (only nf4 is supported; fp4 is not)")
            meta = cls(shape=tuple(int(s) for s in d["shape"]), dtype=str(d["dtype"]),
                       blocksize=int(d["blocksize"]), nested_offset=d.get("nested_offset"),
                       nested_blocksize=int(d.get("nested_blocksize", NESTED_BLOCKSIZE)),
                       nested_dtype=str(d.get("nested_dtype", "float32")))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"{where}: not a bitsandbytes NF4 quant state ({e})") from None
        if meta.blocksize not in BLOCKSIZES:
            raise ValueError(f"{where}: blocksize {meta.blocksize} is not one of {BLOCKSIZES}")
        if meta.nested_offset is not None:
            meta.nested_offset = float(meta.nested_offset)
        return meta


def nf4_quant_state(tensors: dict) -> NF4Meta:
    return NF4Meta.from_tensor(tensors[f"weight.{QUANT_STATE_KEY}"])


# ----- quantize ------------------------------------------------------------------------------------------------
def _blockwise_absmax_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """absmax per block (fp32) and flat / absmax clamped to [-1, 1], as bitsandbytes rounds them: full blocks
    multiply by the fp32 reciprocal, a trailing partial block divides."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)                              # (full / blocksize, blocksize)
    absmax = blocks.abs().amax(dim=1)                                     # (full / blocksize,)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, (flat[full:] / tail_max).clamp(-1, 1)])
    return absmax, scaled


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value (code sorted): bucketize against the midpoints; a tie goes down.
    bitsandbytes' 4-bit quantizer does exactly this."""
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True)


LUT_SIZE = 65536  # bitsandbytes' CPU 8-bit quantizer: a lookup table over [-1, 1] instead of a search


def _lookup_table(code: torch.Tensor) -> torch.Tensor:
    """(65536,) code index for each point -1 + 2i/65535 (fp32): how many code midpoints lie below the point."""
    mids = 0.5 * (code[:-1] + code[1:])                                   # fp32
    points = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32, device=code.device)) / (LUT_SIZE - 1)
    return torch.searchsorted(mids, points)  # left: the number of midpoints strictly below


def _quantize_nested(absmax: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes (uint8) of the centred scales and their per-256 absmax, rounded as bitsandbytes' CPU
    quantize_blockwise (0.50) rounds them: v = x · (1 / absmax), then a 65536-entry table indexed by
    trunc(((v + 1) · 0.5) · 65535 + 0.5), every step in fp32. Not quite nearest: near a midpoint the table cell
    decides (a test checks against bitsandbytes on ~10⁶ values)."""
    n = absmax.numel()
    pad = -n % NESTED_BLOCKSIZE
    blocks = torch.cat([absmax, absmax.new_zeros(pad)]).view(-1, NESTED_BLOCKSIZE)  # zeros never raise a max
    absmax2 = blocks.abs().amax(dim=1)                                    # (ceil(n / 256),)
    v = (blocks * (1.0 / absmax2)[:, None]).clamp(-1, 1)                  # (.., 256) fp32
    cell = (((v + 1.0) * 0.5) * (LUT_SIZE - 1) + 0.5).to(torch.int64)     # truncation, as the C cast
    q = _lookup_table(code)[cell.clamp(0, LUT_SIZE - 1)]
    q = torch.where((absmax2 == 0)[:, None], 0, q)  # an all-zero block: code 0, as bitsandbytes
    return q.reshape(-1)[:n].to(torch.uint8), absmax2


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> dict[str, torch.Tensor]:
    """weight (any shape, fp32/bf16/fp16) -> bitsandbytes' NF4 state-dict entries (see the module docstring).

    Computed on weight's device in fp32; the packed codes and absmax equal bitsandbytes' quantize_4bit bit for bit.
    Keys are relative to the layer ("weight", "weight.absmax", ...); prefix them with the module name."""
    if not weight.is_floating_point() or weight.dtype == torch.float64:
        raise ValueError(f"quantize_nf4 takes fp32/bf16/fp16 weights, got {weight.dtype}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if weight.numel() == 0:
        raise ValueError("quantize_nf4: the weight is empty")
    flat = weight.detach().reshape(-1).float()                            # (numel,)
    absmax, scaled = _blockwise_absmax_scaled(flat, blocksize)
    if scaled.numel() % 2:  # an odd count: the last byte's low nibble encodes a padding 0.0 (code 7)
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    q = _nearest_code(scaled, nf4_code(flat.device)).to(torch.uint8)     # (numel rounded up to even,)
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)                      # ((numel + 1) // 2, 1)
    meta = NF4Meta(shape=tuple(weight.shape), dtype=str(weight.dtype).removeprefix("torch."), blocksize=blocksize)
    out = {"weight": packed}
    if double_quant:
        offset = absmax.mean()                                            # fp32, as bitsandbytes
        code2 = dynamic_map(flat.device)
        out["weight.absmax"], absmax2 = _quantize_nested(absmax - offset, code2)  # (blocks,), (blocks / 256,)
        out["weight.quant_map"] = nf4_code(flat.device)
        out["weight.nested_absmax"] = absmax2                             # (ceil(blocks / 256),)
        out["weight.nested_quant_map"] = code2
        meta.nested_offset = offset.item()
    else:
        out["weight.absmax"] = absmax
        out["weight.quant_map"] = nf4_code(flat.device)
    out[f"weight.{QUANT_STATE_KEY}"] = meta.to_tensor().to(flat.device)
    return out


# ----- dequantize (torch) --------------------------------------------------------------------------------------
def block_scales(tensors: dict, meta: NF4Meta | None = None) -> torch.Tensor:
    """The fp32 absmax of every 64-block (undoing the double quantization if there is one)."""
    meta = meta or nf4_quant_state(tensors)
    absmax = tensors["weight.absmax"]
    if not meta.double_quant:
        return absmax.float()
    code2, absmax2 = tensors["weight.nested_quant_map"], tensors["weight.nested_absmax"]
    nb = absmax.numel()
    scale2 = absmax2.repeat_interleave(meta.nested_blocksize)[:nb]       # (blocks,)
    # two fp32 roundings, product then sum, as bitsandbytes (dequantize_blockwise, then += offset)
    return code2[absmax.long()] * scale2 + torch.tensor(meta.nested_offset, dtype=torch.float32)


def unpack_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 ((numel + 1) // 2, 1) -> int64 (numel,): nibble indices, high nibble first."""
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:numel].long()


def dequantize_nf4(tensors: dict, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight (shape from the quant state) in dtype (default: the dtype recorded at quantization).

    Equal to bitsandbytes' dequantize_4bit bit for bit: fp32 products, one rounding to dtype."""
    meta = nf4_quant_state(tensors)
    dtype = dtype or getattr(torch, meta.dtype)
    numel = 1
    for s in meta.shape:
        numel *= s
    codes = unpack_codes(tensors["weight"], numel)                       # (numel,)
    scales = block_scales(tensors, meta)                                  # (blocks,)
    values = tensors["weight.quant_map"].float()[codes]                   # (numel,)
    full = numel - numel % meta.blocksize
    w = torch.empty(numel, dtype=torch.float32, device=codes.device)
    w[:full] = (values[:full].view(-1, meta.blocksize) * scales[: full // meta.blocksize, None]).reshape(-1)
    if full < numel:
        w[full:] = values[full:] * scales[-1]
    return w.view(meta.shape).to(dtype)
