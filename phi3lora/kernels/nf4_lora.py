"""QLoRA's fused linear: the frozen base weight is NF4 (kernels/nf4.py), dequantized tile by tile inside the GEMM.

    y = x·dequant(W4)ᵀ + s·(x_l·Aᵀ)·Bᵀ + bias

The same fusion as kernels/lora_matmul.py (the low-rank term in the epilogue, y and dX written once), with the
base weight's tiles decoded from 4-bit codes in registers instead of loaded in 16 bits: W is read at ~0.53 bytes
per element (4 bits + the double-quantized scales) and never exists densely in memory. bitsandbytes (and unsloth,
which calls it) dequantizes the whole W into a temporary bf16 matrix and then runs a cuBLAS GEMM; torchao's NF4 is
not bitsandbytes' format.

  forward   xa = x_l·Aᵀ                                  (M, R)  thin GEMM, torch
            y  = x·Wᵀ ⊕ s·xa·Bᵀ ⊕ bias                   (M, N)  one Triton GEMM over K, W decoded per tile
  backward  g  = dY·B                                    (M, R)  thin GEMM, torch
            dX = dY·W ⊕ s·g·A                            (M, K)  the same kernel, reducing over N
            dA = s·gᵀ·x_l,  dB = s·dYᵀ·xa,  dbias = Σ_m dY         thin, torch

The decoded W tile is rounded to the input dtype before tl.dot, exactly as `dequantize_nf4(tensors, x.dtype)`
rounds it, so the contract is `nf4_lora_linear_reference`: F.linear with the dequantized weight (the adapter is
trained against dequant(W4), which is also what a merge must fold into).

Two decodes of the right operand's (BLOCK_K, BLOCK_N) tile per K step, chosen by the launcher (`nf4_aligned`, the
ALIGNED constexpr) and both giving the same fp32 value·scale products, so the same bits (the tests compare them):

- Aligned (W's row length K a multiple of the blocksize: Phi-3's K 3072 / 8192 with blocksize 64). No 64-block
  and no byte straddles two rows of W, so a tile that runs along a row (k in the forward's Wᵀ, the output column
  in the backward's W) is C/2 consecutive bytes per row: one coalesced (rows, C/2) uint8 load, split into high
  nibble (element 2j) and low nibble (2j + 1) and interleaved back with tl.join + tl.reshape, then a gather from
  the 16-entry code table (64 bytes: it should hit L1). The scale is loaded and double-dequantized once per row
  and 64-block (BLOCK_N scales per K step forward, BLOCK_K backward; two per row when a 128-wide tile spans two
  blocks) and broadcast. `_decode_nf4_rows` builds the tile with W's rows first, so the forward transposes its
  (BLOCK_N, BLOCK_K) tile after rounding to 16 bits. Compiled for sm_90 / sm_80 it needs 17-85 KB of shared
  memory and spills in no config (bench/RESULTS.md, "NF4 GEMM decode"); its speed is not measured yet.
- Per element (any other shape: blocks that straddle rows, odd K). The kernel sees W through "virtual strides"
  into its flat row-major index j = n·K + k (the forward's Wᵀ (K, N) has strides (1, K), the backward's W (N, K)
  has (K, 1)), and `decode_nf4` gathers each element's byte (each byte twice), its code and its scale (2-3
  gathers with double quantization): ~5 scattered loads per weight element, 60-152 KB of shared memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, INTERPRET, device_guard, grouped_tile, tl, triton, use_triton
from .nf4 import dequantize_nf4, nf4_quant_state
from .nf4_dequant import EXACT_DECODE, kernel_args

if HAS_TRITON:
    from .nf4_dequant import decode_nf4

    @triton.jit
    def _decode_nf4_rows(rows, c0, K, packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset,
                         BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, C: tl.constexpr):
        # The aligned fast path: fp32 W[rows, c0 : c0 + C] as a (len(rows), C) tile, columns wrapped mod K.
        # Needs K % BLOCKSIZE == 0 (the launcher's `nf4_aligned`), c0 a multiple of min(C, BLOCKSIZE), rows
        # valid (< N). Then a row's scale blocks start at column multiples of BLOCKSIZE (64 for Phi-3) and never
        # straddle two rows, and a byte never holds elements of two rows (K even): the tile's C/2 bytes per row
        # are consecutive in memory (one coalesced load instead of C per-element gathers, each byte once), and
        # there are only max(1, C / BLOCKSIZE) scales per row to load and double-dequantize, not C.
        HALF: tl.constexpr = C // 2
        NB: tl.constexpr = C // BLOCKSIZE if C > BLOCKSIZE else 1      # scale blocks per row in the tile
        RUN: tl.constexpr = HALF if HALF < BLOCKSIZE // 2 else BLOCKSIZE // 2  # bytes surely consecutive
        row_bytes = tl.multiple_of(rows * (K // 2), BLOCKSIZE // 2)    # (R,) each row's first byte
        # (HALF,) byte columns; the wrap (K / 2, a multiple of BLOCKSIZE / 2) falls between runs of RUN bytes,
        # so the hints are true and the loads vectorize (the `%` alone would hide the contiguity)
        byte_col = tl.max_contiguous(tl.multiple_of((c0 // 2 + tl.arange(0, HALF)) % (K // 2), RUN), RUN)
        packed = tl.load(packed_ptr + row_bytes[:, None] + byte_col[None, :])  # (R, HALF) uint8
        # element 2j is byte j's high nibble, 2j + 1 its low one: join on a new last axis and fold it into the
        # columns (row-major), which interleaves them: (R, HALF, 2) -> (R, C)
        nibble = tl.reshape(tl.join(packed >> 4, packed & 0xF), (rows.shape[0], C)).to(tl.int32)
        value = tl.load(code_ptr + nibble)                             # (R, C) 16-entry table: 64 B, L1
        first = (c0 + tl.arange(0, NB) * BLOCKSIZE) % K                # (NB,) each scale block's first column
        block = rows[:, None] * (K // BLOCKSIZE) + (first // BLOCKSIZE)[None, :]  # (R, NB)
        if DOUBLE_QUANT:  # the same fp32 expression as decode_nf4, so the same products and sums
            q = tl.load(absmax_ptr + block).to(tl.int32)
            scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // 256) + offset
        else:
            scale = tl.load(absmax_ptr + block)
        if NB == 1:
            w = value * scale                                          # (R, C) * (R, 1)
        else:  # the tile spans NB blocks of a row: (R, NB, BLOCKSIZE) * (R, NB, 1)
            w = tl.reshape(tl.reshape(value, (rows.shape[0], NB, BLOCKSIZE)) * scale[:, :, None],
                           (rows.shape[0], C))
        return w

    @triton.jit
    def _nf4_matmul_lowrank_kernel(
        a_ptr,        # (M, KR)  left operand: x (forward) or dY (backward)
        packed_ptr,   # uint8 ((N·K + 1) // 2,): the NF4 codes of W (N, K), two per byte, high nibble first
        absmax_ptr,   # (blocks,) uint8 codes of the scales (double quant) or fp32 scales
        code_ptr,     # (16,) fp32 NF4 table
        absmax2_ptr,  # (ceil(blocks / 256),) fp32 nested scales (double quant)
        code2_ptr,    # (256,) fp32 dynamic map (double quant)
        u_ptr,        # (M, R)   thin left factor: xa forward, g backward
        v_ptr,        # (R, NO)  thin right factor, any strides: Bᵀ forward, A backward
        bias_ptr,     # (NO,)    read only when HAS_BIAS
        c_ptr,        # (M, NO)  output, written once
        M, NO, KR, R, M_KEY,
        stride_am, stride_ak,
        stride_wk, stride_wn,  # virtual strides of the right operand into W's flat index: (1, K) or (K, 1)
        stride_um, stride_ur, stride_vr, stride_vn, stride_cm, stride_cn,
        offset, scaling,
        BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ALIGNED: tl.constexpr, TRANSPOSE_W: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # c = a·W' + scaling·u·v (+ bias), W' = Wᵀ or W decoded from NF4: one program per (BLOCK_M, BLOCK_N) tile.
        pid_m, pid_n = grouped_tile(tl.program_id(0), M, NO, BLOCK_M, BLOCK_N, GROUP_M)  # W tiles shared via L2

        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,), 64-bit row offsets
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                # (BLOCK_N,)
        offs_k = tl.arange(0, BLOCK_K)                                  # (BLOCK_K,)
        rows = offs_m % M  # past-the-edge rows/columns wrap to valid ones; the store mask drops them
        cols = offs_n % NO
        a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak   # (BLOCK_M, BLOCK_K)
        # flat index into W of the (BLOCK_K, BLOCK_N) right-operand tile; int64: N·K may pass 2³¹ one day
        w_idx = offs_k[:, None].to(tl.int64) * stride_wk + cols[None, :].to(tl.int64) * stride_wn

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(KR, BLOCK_K)):
            k_left = KR - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            if ALIGNED:
                # rows of W past the reduction's end (backward, N % BLOCK_K != 0) or columns past K (forward,
                # BLOCK_K > BLOCKSIZE) wrap to valid weights of the same output column, which a's masked zeros
                # cancel exactly: no load mask, and nothing the reference does not already multiply in
                if TRANSPOSE_W:  # forward: W's rows are the output columns, the tile runs along them over k
                    w = _decode_nf4_rows(cols.to(tl.int64), kb * BLOCK_K, stride_wn, packed_ptr, absmax_ptr,
                                         code_ptr, absmax2_ptr, code2_ptr, offset,
                                         BLOCKSIZE, DOUBLE_QUANT, BLOCK_K)  # (BLOCK_N, BLOCK_K) fp32
                else:            # backward: W's rows are the reduction index, the tile runs along the output
                    w_rows = (kb * BLOCK_K + offs_k) % KR
                    w = _decode_nf4_rows(w_rows.to(tl.int64), pid_n * BLOCK_N, stride_wk, packed_ptr, absmax_ptr,
                                         code_ptr, absmax2_ptr, code2_ptr, offset,
                                         BLOCKSIZE, DOUBLE_QUANT, BLOCK_N)  # (BLOCK_K, BLOCK_N) fp32
            else:  # any shape: every element gathers its byte and its scale
                w_mask = offs_k[:, None] < k_left
                w = decode_nf4(w_idx, w_mask, packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset,
                                BLOCKSIZE, DOUBLE_QUANT)                # (BLOCK_K, BLOCK_N) fp32
                w = tl.where(w_mask, w, 0.0)
            if DOT_FP32:  # interpreter: round W to the input dtype (as the GPU path does), then dot in fp32
                a = a.to(tl.float32)
                w = w.to(a_ptr.dtype.element_ty).to(tl.float32)
            else:
                w = w.to(a_ptr.dtype.element_ty)
            if ALIGNED:
                if TRANSPOSE_W:  # transposed after the rounding: a 16-bit tile to move, not an fp32 one
                    w = tl.trans(w)                                     # (BLOCK_K, BLOCK_N)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            w_idx += BLOCK_K * stride_wk

        if HAS_LORA:  # one accumulator, (acc/s + u·v)·s: a second (BLOCK_M, BLOCK_N) fp32 tile spills
            # on sm_90 (shared/KERNELS-COMPILED.md); exact for power-of-two s, else ~1 fp32 ulp
            offs_r = tl.arange(0, BLOCK_R)
            r_ok = offs_r < R
            u = tl.load(u_ptr + rows[:, None] * stride_um + offs_r[None, :] * stride_ur,
                        mask=r_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_R)
            v = tl.load(v_ptr + offs_r[:, None] * stride_vr + cols[None, :] * stride_vn,
                        mask=r_ok[:, None], other=0.0)  # (BLOCK_R, BLOCK_N)
            if DOT_FP32:
                u = u.to(tl.float32)
                v = v.to(tl.float32)
            acc = tl.dot(u, v, acc * (1.0 / scaling), input_precision=PRECISION) * scaling
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]

        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < NO)
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)

    def _config(bm, bn, bk, warps, stages):
        return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=warps, num_stages=stages)

    # Compiled ahead of time (tests/test_kernels_compile.py, triton 3.9, bf16, Phi-3-mini o_proj and gate_up, M 4096
    # and 8192, r 16; bench/RESULTS.md "NF4 GEMM decode"). The per-element decode gathers a byte and a scale per
    # element, and the pipeline buffers those gathers: 128x64x64 s3 needs 136-152 KB of shared memory and spills
    # in the backward (140 B on sm_90, 1.1 KB on sm_80), 16x128x64 spills 168-312 B backward, 64x64x64 s2 8 B
    # backward on sm_80; 64x64x32 is clean everywhere; 128x128 and 64x128 tiles needed 232-256 KB (cannot
    # launch). The aligned decode (Phi-3's shapes) loads C/2 bytes and C/64 scales per row instead: the same four
    # configs take 17-58 KB and 84-252 registers with no spill on sm_90 or sm_80, and 128x128x64 w8 s3 is clean
    # too (132-237 registers, 69-85 KB), so the aligned launches also try that one (each x tile serves 128
    # columns, as in the bf16 LoRA GEMM's clean 128x128x64 w8). Tried and left out: 128x128x64 w4 s3 (spills 96 B
    # backward on sm_90, 7.6 KB on sm_80) and 128x256x64 w8 s3 (16-60 B on sm_90, 6.7 KB on sm_80).
    _GPU_CONFIGS = [  # both decodes
        _config(128, 64, 64, 4, 3),
        _config(64, 64, 64, 4, 2),
        _config(64, 64, 32, 4, 3),
        _config(16, 128, 64, 4, 2),  # decode-sized M (chat): a few rows, wide N
    ]
    _GPU_CONFIGS_ALIGNED = _GPU_CONFIGS + [  # the aligned decode only: the per-element one cannot launch these
        _config(128, 128, 64, 8, 3),
    ]
    _INTERPRET_META = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8)
    _TUNE_KEY = ["M_KEY", "NO", "KR", "R", "HAS_LORA", "HAS_BIAS", "stride_wk"]
    # two autotuners over the one kernel, so each decode tunes over the configs it can launch
    _nf4_matmul_lowrank_tuned = triton.autotune(configs=_GPU_CONFIGS, key=_TUNE_KEY)(_nf4_matmul_lowrank_kernel)
    _nf4_matmul_lowrank_tuned_aligned = triton.autotune(configs=_GPU_CONFIGS_ALIGNED, key=_TUNE_KEY)(
        _nf4_matmul_lowrank_kernel)


def nf4_aligned(meta) -> bool:
    """Whether the GEMM takes the aligned decode (`_decode_nf4_rows`): W's row length K a multiple of the
    blocksize, so no scale block straddles two rows (and K is even: no byte does). Phi-3's projections qualify
    (K 3072 or 8192, blocksize 64); other shapes take the per-element decode (`decode_nf4`)."""
    return len(meta.shape) == 2 and meta.shape[1] % meta.blocksize == 0


def nf4_matmul_lowrank(a, tensors, meta, transpose_w, u=None, v=None, scaling=1.0, bias=None):
    """c = a·W' + scaling·u·v + bias, W' = dequant(W4)ᵀ (transpose_w, the forward) or dequant(W4) (the backward).

    a (M, KR); W (N, K) from its NF4 tensors; u (M, R), v (R, NO) any strides; output in a's dtype."""
    N, K = meta.shape
    M, KR = a.shape
    NO = N if transpose_w else K
    assert KR == (K if transpose_w else N), (a.shape, meta.shape, transpose_w)
    interpret_bf16 = INTERPRET and a.dtype == torch.bfloat16  # see lora_matmul.matmul_lowrank
    c = torch.empty((M, NO), dtype=torch.float32 if interpret_bf16 else a.dtype, device=a.device)
    if M == 0 or NO == 0:
        return c.to(a.dtype)
    has_lora = u is not None and u.shape[1] > 0
    R = u.shape[1] if has_lora else 0
    if has_lora:
        assert u.shape == (M, R) and v.shape == (R, NO) and u.dtype == v.dtype == a.dtype, (u.shape, v.shape)
    else:
        u = v = c
    if bias is not None:
        bias = bias.contiguous()
    packed, absmax, code, absmax2, code2, offset = kernel_args(tensors, meta)
    args = (a, packed, absmax, code, absmax2, code2, u, v, bias if bias is not None else c, c,
            M, NO, KR, R, triton.next_power_of_2(M), a.stride(0), a.stride(1),
            *((1, K) if transpose_w else (K, 1)),
            u.stride(0), u.stride(1), v.stride(0), v.stride(1), c.stride(0), c.stride(1),
            offset, float(scaling))
    aligned = nf4_aligned(meta)
    meta_kw = dict(BLOCKSIZE=meta.blocksize, DOUBLE_QUANT=meta.double_quant, ALIGNED=aligned,
                   TRANSPOSE_W=bool(transpose_w), HAS_BIAS=bias is not None,
                   HAS_LORA=has_lora, PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
                   DOT_FP32=interpret_bf16, BLOCK_R=max(16, triton.next_power_of_2(R)), **EXACT_DECODE)

    def grid(m):
        return (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(NO, m["BLOCK_N"]),)

    with device_guard(a):
        if INTERPRET:
            _nf4_matmul_lowrank_kernel[grid](*args, **meta_kw, **_INTERPRET_META)
        else:
            (_nf4_matmul_lowrank_tuned_aligned if aligned else _nf4_matmul_lowrank_tuned)[grid](*args, **meta_kw)
    return c.to(a.dtype)


class NF4LoRALinearFunction(torch.autograd.Function):
    """Inputs as in `nf4_lora_linear`; the NF4 tensors are constants (no gradient)."""

    @staticmethod
    def forward(ctx, x, tensors, meta, bias, lora_A, lora_B, scaling, lora_x):
        N, K = meta.shape
        x2 = x.reshape(-1, K)                                          # (M, K)
        lx2 = x2 if lora_x is None else lora_x.reshape(-1, K)          # (M, K)
        A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)                  # (R, K), (N, R)
        xa = lx2 @ A.t()                                               # (M, R)
        y2 = nf4_matmul_lowrank(x2, tensors, meta, True, xa, B.t(), scaling, bias)  # (M, N)
        ctx.save_for_backward(A, B, lx2, xa)
        ctx.tensors, ctx.meta, ctx.scaling = tensors, meta, scaling  # buffers of a frozen module: not copied
        ctx.lora_x_given = lora_x is not None
        ctx.dtypes = (lora_A.dtype, lora_B.dtype, bias.dtype if bias is not None else None)
        return y2.reshape(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        A, B, lx2, xa = ctx.saved_tensors
        s, meta = ctx.scaling, ctx.meta
        need_x, _, _, need_bias, need_A, need_B, _, need_lx = ctx.needs_input_grad
        N, K = meta.shape
        lead = dy.shape[:-1]
        dy2 = dy.reshape(-1, N).contiguous()                           # (M, N)
        dx = dbias = dA = dB = dlx = None
        fused_dx = need_x and not ctx.lora_x_given
        g = dy2 @ B if (fused_dx or need_A or need_lx) else None      # (M, R)
        if need_x:  # dX = dY·W (+ s·g·A when the low-rank path saw x itself)
            dx = nf4_matmul_lowrank(dy2, ctx.tensors, meta, False, g if fused_dx else None, A, s)
            dx = dx.reshape(*lead, K)
        if need_lx:
            dlx = torch.mm(g, A).mul_(s).reshape(*lead, K)             # (M, K)
        if need_A:
            dA = torch.mm(g.t(), lx2).mul_(s).to(ctx.dtypes[0])       # (R, K)
        if need_B:
            dB = torch.mm(dy2.t(), xa).mul_(s).to(ctx.dtypes[1])      # (N, R)
        if need_bias:
            dbias = dy2.sum(0).to(ctx.dtypes[2])                       # (N,)
        return dx, None, None, dbias, dA, dB, None, dlx


def nf4_lora_linear(x, tensors, bias, lora_A, lora_B, scaling, lora_x=None, meta=None):
    """y = x·dequant(W4)ᵀ + scaling·(x_l·Aᵀ)·Bᵀ (+ bias): one Triton GEMM forward, one for dX backward.

    tensors: the weight's NF4 entries (kernels.nf4.quantize_nf4's dict) on x's device; lora_A (R, K), lora_B
    (N, R) (R may be 0: the base GEMM alone); bias (N,) or None. Triton on CUDA tensors (or anywhere under
    TRITON_INTERPRET=1; not under PHI3LORA_NO_TRITON=1), else `nf4_lora_linear_reference`. On a GPU only 16-bit
    x takes the fused kernel (QLoRA computes in bf16): its fp32 FMA tiles spill on sm_90 and sm_80 (the compile
    test), so fp32 x goes through the reference there; the interpreter still runs the kernel in fp32, where its
    arithmetic is checked exactly. meta: the decoded quant state when the caller holds it (saves parsing the JSON
    entry on every call)."""
    meta = meta or nf4_quant_state(tensors)
    if len(meta.shape) != 2 or x.shape[-1] != meta.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the 4-bit weight has shape {meta.shape}")
    if not use_triton(x) or (x.dtype == torch.float32 and not INTERPRET):
        return nf4_lora_linear_reference(x, tensors, bias, lora_A, lora_B, scaling, lora_x)
    return NF4LoRALinearFunction.apply(x, tensors, meta, bias, lora_A, lora_B, float(scaling), lora_x)


def nf4_lora_linear_reference(x, tensors, bias, lora_A, lora_B, scaling, lora_x=None):
    """The contract in plain torch: the dense dequant(W4) in x's dtype, then peft's unfused formula."""
    weight = dequantize_nf4(tensors, x.dtype)                          # (N, K)
    y = F.linear(x, weight, bias.to(x.dtype) if bias is not None else None)
    if lora_A.shape[0] == 0:
        return y
    lx = x if lora_x is None else lora_x
    return y + scaling * F.linear(F.linear(lx, lora_A.to(x.dtype)), lora_B.to(x.dtype))
