"""NF4 dequantization in Triton: `decode_nf4` (a device function: the fp32 values of weight elements at flat
indices, as kernels/nf4.py's `dequantize_nf4` computes them) and `dequantize_nf4_triton` (one kernel over the whole
weight). nf4_lora.py's fused GEMM inlines `decode_nf4`. The format and its plain-torch contract are in nf4.py.
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, INTERPRET, device_guard, tl, triton
from .nf4 import NF4Meta, nf4_quant_state

# ----- dequantize (Triton) -------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def decode_nf4(flat, mask, packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset,
                    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
        # fp32 values of the weight elements at flat indices `flat` (any shape, int32/int64), masked loads.
        byte = tl.load(packed_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
        nibble = (byte >> ((1 - (flat & 1)) * 4)) & 0xF        # element 2j is the high nibble of byte j
        value = tl.load(code_ptr + nibble)                       # the 16-entry table: a cached gather
        block = flat // BLOCKSIZE
        if DOUBLE_QUANT:
            q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // 256, mask=mask, other=0.0) + offset
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        return value * scale

    @triton.jit
    def _dequant_kernel(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, out_ptr, offset, numel,
                        BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr):
        # one program per BLOCK elements of the flat weight; out (numel,) in its own dtype
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        w = decode_nf4(offs, mask, packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset,
                        BLOCKSIZE, DOUBLE_QUANT)
        tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=mask)


# Launch option of every kernel that decodes NF4: bitsandbytes and dequantize_nf4 round the double-quantized scale
# twice (code2[q]·absmax2, then + offset), which the GPU compiler would contract into one fma (one rounding, so a
# scale an fp32 ulp off; 4 fma.rn.f32 per thread per K step in the PTX of the 64x64x64 GEMM). Off, the decode gives
# the reference's bits on the GPU as in the interpreter; nothing else in these kernels is a multiply-add.
EXACT_DECODE = dict(enable_fp_fusion=False)


def kernel_args(tensors: dict, meta: NF4Meta) -> tuple:
    """(packed, absmax, code, absmax2, code2, offset) as the Triton kernels take them (unused ones: stand-ins)."""
    packed, absmax, code = tensors["weight"], tensors["weight.absmax"], tensors["weight.quant_map"]
    if meta.double_quant:
        return (packed, absmax, code, tensors["weight.nested_absmax"], tensors["weight.nested_quant_map"],
                float(meta.nested_offset))
    return packed, absmax, code, code, code, 0.0


def dequantize_nf4_triton(tensors: dict, dtype: torch.dtype | None = None, block: int = 1024) -> torch.Tensor:
    """dequantize_nf4 in one Triton kernel (CUDA tensors, or anywhere under TRITON_INTERPRET=1)."""
    meta = nf4_quant_state(tensors)
    dtype = dtype or getattr(torch, meta.dtype)
    packed = tensors["weight"]
    out = torch.empty(meta.shape, dtype=dtype, device=packed.device)
    numel = out.numel()
    interpret_bf16 = INTERPRET and dtype == torch.bfloat16  # the interpreter truncates fp32 -> bf16: round in torch
    target = torch.empty(meta.shape, dtype=torch.float32, device=packed.device) if interpret_bf16 else out
    with device_guard(packed):
        _dequant_kernel[(triton.cdiv(numel, block),)](
            *kernel_args(tensors, meta)[:5], target, kernel_args(tensors, meta)[5], numel,
            BLOCKSIZE=meta.blocksize, DOUBLE_QUANT=meta.double_quant, BLOCK=block, **EXACT_DECODE)
    return target.to(dtype) if interpret_bf16 else out
