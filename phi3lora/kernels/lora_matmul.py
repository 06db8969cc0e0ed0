"""Fused LoRA linear layer: the low-rank update rides in the accumulator of the frozen base GEMM.

    y = x·Wᵀ + s·(x_l·Aᵀ)·Bᵀ + bias

x (..., K) is the input, W (N, K) the frozen base weight (it never gets a gradient), A (R, K) and B (N, R) the
LoRA factors, s = lora_alpha / r (or alpha / sqrt(r) for rsLoRA) and x_l the input of the low-rank path: x after
LoRA dropout, or x itself. peft computes this as three GEMMs and an add (x·Wᵀ, x_l·Aᵀ, (x_l·Aᵀ)·Bᵀ, then y + s·…),
so the (M, N) output is written, read and written again. Here (after LoRAFusion, https://arxiv.org/abs/2510.00206,
which fuses the same way; unsloth gets part of the benefit with an in-place `addmm_`):

  forward   xa = x_l·Aᵀ                                   (M, R)  thin GEMM, torch
            y  = s·xa·Bᵀ ⊕ x·Wᵀ ⊕ bias                    (M, N)  one Triton GEMM; ⊕ = into its one accumulator
  backward  g  = dY·B                                     (M, R)  thin GEMM, torch
            dX = s·g·A ⊕ dY·W                             (M, K)  the same Triton kernel, reducing over N
            dA = s·gᵀ·x_l                                 (R, K)  thin, torch
            dB = s·dYᵀ·xa                                 (N, R)  thin, torch
            dbias = Σ_m dY

R is small (8..192: MergedLinear's qkv at r 64 is 3·64), so the low-rank term is a few extra tile products of
R_CHUNK (32) columns, accumulated BEFORE the K loop into the same fp32 accumulator the loop continues (then scaled
by s): one (BLOCK_M, BLOCK_N) accumulator ever lives in registers, which keeps the 128x256 / 256x128 tiles at the
base GEMM's register count (no spills, no serialized wgmma on sm_90; tests/test_kernels_compile.py). y (or dX) is
written exactly once. With dropout the low-rank path sees a different input, so the
backward returns dX = dY·W and d(x_l) = s·g·A separately and autograd sums them through the dropout.

Every product accumulates in fp32; fp32 inputs use IEEE fp32 products (no TF32) so results match torch to ~1e-6.
The thin factors xa and g are rounded to the input dtype, as torch's own bf16 matmuls round them.

Layers, bottom up: the @triton.jit kernel, the launcher `matmul_lowrank`, the autograd.Function, the public
`lora_linear`; `lora_linear_reference` (kernels/reference.py, plain torch) is the contract the tests check against.
(lora.layers.expand_merged_B turns loralib's MergedLinear, per-slice adapters on a fused qkv, into this form.)
The module is named for its kernel, not for `lora_linear`: a submodule named like a public function would replace
that function on the package once imported (kernels/__init__.py).
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, INTERPRET, device_guard, grouped_tile, guarded, kernel_on, tl, triton
from .reference import lora_linear_reference




# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _matmul_lowrank_kernel(
        a_ptr,     # (M, KR)  left operand: x (forward) or dY (backward)
        b_ptr,     # (KR, NO) right operand, any strides: Wᵀ (a view of W (N, K)) forward, W backward
        u_ptr,     # (M, R)   thin left factor: xa = x_l·Aᵀ forward, g = dY·B backward
        v_ptr,     # (R, NO)  thin right factor, any strides: Bᵀ forward, A backward
        bias_ptr,  # (NO,)    read only when HAS_BIAS
        c_ptr,     # (M, NO)  output, written once
        M, NO, KR, R,
        M_KEY,     # next power of two of M: the autotune key, so each new sequence length does not re-tune
        stride_am, stride_ak, stride_bk, stride_bn,
        stride_um, stride_ur, stride_vr, stride_vn,
        stride_cm, stride_cn,
        scaling,   # python float s, applied to the fp32 low-rank tile
        HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
        PRECISION: tl.constexpr,  # "ieee" for fp32 (no TF32); ignored by tl.dot for 16-bit inputs
        DOT_FP32: tl.constexpr,   # interpreter + bf16 only (see matmul_lowrank): upcast (exact) before tl.dot
        R_CHUNK: tl.constexpr,    # low-rank columns per step (>= 16, tl.dot's minimum); the last step is masked
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # c = a·b + scaling·u·v (+ bias): one program per (BLOCK_M, BLOCK_N) tile of c.
        pid_m, pid_n = grouped_tile(tl.program_id(0), M, NO, BLOCK_M, BLOCK_N, GROUP_M)  # b tiles shared via L2

        # 64-bit rows: offs_m·stride_cm (and ·stride_am) is an int32 product otherwise, which wraps silently on
        # the GPU once M·N reaches 2³¹ (e.g. 131072 tokens through gate_up, N = 16384). One-off address math.
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        offs_k = tl.arange(0, BLOCK_K)                    # (BLOCK_K,)
        # Rows/columns past the edge wrap around to valid ones instead of being masked in the hot loop; the
        # store mask drops them. Only K needs masks inside the loop (zeros there add nothing to the sum).
        rows = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)
        cols = tl.max_contiguous(tl.multiple_of(offs_n % NO, BLOCK_N), BLOCK_N)
        a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn  # (BLOCK_K, BLOCK_N)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_LORA:
            # The rank-R term first, R_CHUNK columns of u (rows of v) at a time, into the one accumulator the K loop
            # then continues: acc = s·u·v + a·b. A whole (BLOCK_M, R) tile next to a second (BLOCK_M, BLOCK_N) fp32
            # accumulator after the loop (the first design) doubled the registers of the cuBLAS-class tiles: 255
            # per thread, spills, wgmma serialized on sm_90 (tests/test_kernels_compile.py measures this).
            offs_r = tl.arange(0, R_CHUNK)
            u_ptrs = u_ptr + rows[:, None] * stride_um + offs_r[None, :] * stride_ur  # (BLOCK_M, R_CHUNK)
            v_ptrs = v_ptr + offs_r[:, None] * stride_vr + cols[None, :] * stride_vn  # (R_CHUNK, BLOCK_N)
            for rb in range(0, tl.cdiv(R, R_CHUNK)):
                r_left = R - rb * R_CHUNK
                u = tl.load(u_ptrs, mask=offs_r[None, :] < r_left, other=0.0)
                v = tl.load(v_ptrs, mask=offs_r[:, None] < r_left, other=0.0)
                if DOT_FP32:
                    u = u.to(tl.float32)
                    v = v.to(tl.float32)
                acc = tl.dot(u, v, acc, input_precision=PRECISION)
                u_ptrs += R_CHUNK * stride_ur
                v_ptrs += R_CHUNK * stride_vr
            acc = acc * scaling

        for kb in range(0, tl.cdiv(KR, BLOCK_K)):
            k_left = KR - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

        # Epilogue: bias, while acc is still in registers.
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols)  # (BLOCK_N,)
            acc += bias.to(tl.float32)[None, :]

        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < NO)
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)

    def _config(bm, bn, bk, warps, stages, r_chunk=32):
        return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, R_CHUNK=r_chunk),
                             num_warps=warps, num_stages=stages)

    # 16-bit inputs (tensor cores: wgmma on sm_90, mma on sm_80). The first three are cuBLAS's H100 tiles (228 KB
    # of shared memory per SM fits 128x256x64 bf16 at 4 stages); the rest keep smaller GPUs and problems sane.
    # Every one compiles for sm_90 and sm_80 without spills or serialized wgmma at R up to 192 (MergedLinear's
    # r 64 x 3): tests/test_kernels_compile.py checks that, bench/RESULTS.md has the numbers.
    CONFIGS_16BIT = [
        _config(128, 256, 64, 8, 3),
        _config(128, 256, 64, 8, 4),
        _config(256, 128, 64, 8, 3),
        _config(128, 128, 64, 8, 4),
        _config(64, 128, 32, 4, 4),
        _config(64, 64, 32, 4, 3),
    ]
    # fp32 inputs (IEEE products, no TF32): FMA, no tensor cores. The 16-bit tiles would need 288-384 KB of shared
    # memory or spill tens of KB; 64x128 and 128x64 (w4) still reach 246-255 registers and spill on sm_80. These two
    # stay under 128 registers on sm_90 and do not spill on either target.
    CONFIGS_FP32 = [
        _config(64, 64, 32, 4, 3),
        _config(32, 64, 32, 4, 3),
    ]
    # The interpreter is slow and has nothing to tune: one small tile, so odd test shapes span several tiles, and
    # R_CHUNK 16 so the test ranks take more than one low-rank step.
    _INTERPRET_META = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, R_CHUNK=16)

    # R and the flags are in the key too: r=64, or the base GEMM alone, is another kernel than r=8 with a bias
    _KEY = ["M_KEY", "NO", "KR", "R", "HAS_LORA", "HAS_BIAS"]
    _matmul_lowrank_16bit = triton.autotune(configs=CONFIGS_16BIT, key=_KEY)(_matmul_lowrank_kernel)
    _matmul_lowrank_fp32 = triton.autotune(configs=CONFIGS_FP32, key=_KEY)(_matmul_lowrank_kernel)


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------

CHECK_ROWS = 8  # rows the runtime guard compares with the reference, the first time the kernel runs on a GPU


def _pad_rank(u, v):
    """u (M, R), v (R, NO) -> zero-padded copies (M, R16), (R16, NO) when a stride is not a multiple of 16.

    Triton vectorizes a load only when it can prove the alignment, i.e. strides divisible by 16; with R = 8 (xa's
    row stride, Bᵀ's column stride) every u/v element gets its own 64-bit address: 255 registers and spills on
    sm_90. The zero columns add nothing to u·v; the copies are thin (M·R16 and R16·NO elements).
    """
    if all(s == 1 or s % 16 == 0 for s in (*u.stride(), *v.stride())):
        return u, v, u.shape[1]
    R = u.shape[1]
    R16 = -(-R // 16) * 16
    u = torch.nn.functional.pad(u, (0, R16 - R))                          # (M, R16), contiguous
    v = torch.nn.functional.pad(v, (0, 0, 0, R16 - R))                    # (R16, NO), contiguous
    return u, v, R16


def matmul_lowrank(a, b, u=None, v=None, scaling=1.0, bias=None):
    """c = a·b + scaling·u·v + bias in one Triton GEMM, output in a's dtype, fp32 accumulation.

    a (M, KR), b (KR, NO), u (M, R), v (R, NO), bias (NO,): any strides (pass W.t() or B.t() views, no copies).
    """
    M, KR = a.shape
    NO = b.shape[1]
    assert b.shape[0] == KR, (a.shape, b.shape)
    # The interpreter mishandles bf16 (numpy has none): tl.dot multiplies raw bf16 bits as integers and fp32->bf16
    # casts truncate instead of rounding to nearest (triton 3.9). There, upcast before each dot (exact) and round
    # the fp32 result in torch, which is what the GPU does in the kernel.
    interpret_bf16 = INTERPRET and a.dtype == torch.bfloat16
    c = torch.empty((M, NO), dtype=torch.float32 if interpret_bf16 else a.dtype, device=a.device)
    if M == 0 or NO == 0:
        return c.to(a.dtype)
    has_lora = u is not None and u.shape[1] > 0
    R = u.shape[1] if has_lora else 0
    if bias is not None:
        bias = bias.contiguous()  # the kernel reads bias_ptr + cols: unit stride assumed (no-op for a Parameter)
    if has_lora:
        assert u.shape == (M, R) and v.shape == (R, NO), (u.shape, v.shape)
        assert u.dtype == v.dtype == a.dtype == b.dtype, (u.dtype, v.dtype, a.dtype, b.dtype)
        u, v, R = _pad_rank(u, v)
    else:
        u = v = c  # never read
    kernel_args = (
        a, b, u, v, bias if bias is not None else c, c,
        M, NO, KR, R, triton.next_power_of_2(M),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        u.stride(0), u.stride(1), v.stride(0), v.stride(1),
        c.stride(0), c.stride(1),
        float(scaling),
    )
    meta = dict(
        HAS_BIAS=bias is not None, HAS_LORA=has_lora,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        DOT_FP32=interpret_bf16,
    )

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(NO, meta["BLOCK_N"]),)

    # Triton launches on the current CUDA device, not the tensors' one (see _triton.device_guard).
    with device_guard(a):
        if INTERPRET:
            _matmul_lowrank_kernel[grid](*kernel_args, **meta, **_INTERPRET_META)
        else:
            tuned = _matmul_lowrank_fp32 if a.dtype == torch.float32 else _matmul_lowrank_16bit
            tuned[grid](*kernel_args, **meta)
    return c.to(a.dtype)


# ----------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------

class LoRALinearFunction(torch.autograd.Function):
    """Inputs as in `lora_linear`; weight gets no gradient; scaling is a python float."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, lora_x):
        K, N = x.shape[-1], weight.shape[0]
        x2 = x.reshape(-1, K)                                         # (M, K)
        lx2 = x2 if lora_x is None else lora_x.reshape(-1, K)         # (M, K)
        A = lora_A.to(x.dtype)                                        # (R, K); no-op when dtypes agree
        B = lora_B.to(x.dtype)                                        # (N, R)
        xa = lx2 @ A.t()                                              # (M, R)
        y2 = matmul_lowrank(x2, weight.t(), xa, B.t(), scaling, bias)  # (M, N)
        ctx.save_for_backward(weight, A, B, lx2, xa)
        ctx.scaling = scaling
        ctx.lora_x_given = lora_x is not None
        ctx.dtypes = (lora_A.dtype, lora_B.dtype, bias.dtype if bias is not None else None)
        return y2.reshape(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        weight, A, B, lx2, xa = ctx.saved_tensors
        s = ctx.scaling
        need_x, _, need_bias, need_A, need_B, _, need_lx = ctx.needs_input_grad
        N, K = weight.shape
        lead = dy.shape[:-1]
        dy2 = dy.reshape(-1, N).contiguous()                          # (M, N)
        dx = dbias = dA = dB = dlx = None

        fused_dx = need_x and not ctx.lora_x_given
        g = dy2 @ B if (fused_dx or need_A or need_lx) else None     # (M, R)
        if need_x:
            if fused_dx:   # dX = dY·W + s·g·A, written once
                def reference(n=None):
                    return torch.addmm(dy2[:n] @ weight, g[:n], A, alpha=s)  # (n, K)
                dx = guarded("lora_linear", dy, lambda: matmul_lowrank(dy2, weight, g, A, s), reference,
                             lambda got: [(got[:CHECK_ROWS], reference(CHECK_ROWS))], stage="backward")  # (M, K)
            else:          # the low-rank part goes to lora_x below; autograd adds it back through the dropout
                dx = dy2 @ weight                                     # (M, K)
            dx = dx.reshape(*lead, K)
        if need_lx:
            dlx = torch.mm(g, A).mul_(s).reshape(*lead, K)            # (M, K)
        if need_A:
            dA = torch.mm(g.t(), lx2).mul_(s).to(ctx.dtypes[0])       # (R, M)·(M, K) -> (R, K)
        if need_B:
            dB = torch.mm(dy2.t(), xa).mul_(s).to(ctx.dtypes[1])      # (N, M)·(M, R) -> (N, R)
        if need_bias:
            dbias = dy2.sum(0).to(ctx.dtypes[2])                      # (N,)
        return dx, None, dbias, dA, dB, None, dlx


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------

def _check(x, weight, bias, lora_A, lora_B, lora_x):
    N, K = weight.shape
    R = lora_A.shape[0]
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {K} (weight {tuple(weight.shape)})")
    if tuple(lora_A.shape) != (R, K) or tuple(lora_B.shape) != (N, R):
        raise ValueError(f"lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} do not fit weight "
                         f"{tuple(weight.shape)}: expected ({R}, {K}) and ({N}, {R})")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({N},)")
    if lora_x is not None and lora_x.shape != x.shape:
        raise ValueError(f"lora_x has shape {tuple(lora_x.shape)}, x has {tuple(x.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight is {weight.dtype} but x is {x.dtype}: cast one of them (the frozen weight is "
                         "never cast here, it is the large tensor)")


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, lora_x=None):
    """y = x·Wᵀ + scaling·(x_l·Aᵀ)·Bᵀ (+ bias), fused: one Triton GEMM forward, one for dX backward.

    x (..., K); weight (N, K), frozen: it never receives a gradient, even if it requires one; bias (N,) or None;
    lora_A (R, K); lora_B (N, R); scaling a python float; lora_x (..., K), the low-rank path's input (x after
    LoRA dropout), or None for x itself. A, B and bias may be in another dtype than x (e.g. fp32 adapters with a
    bf16 model): they are cast to x's dtype for the products and their gradients come back in their own dtype.
    Runs the Triton kernels on CUDA tensors (or anywhere under TRITON_INTERPRET=1), else `lora_linear_reference`.
    """
    _check(x, weight, bias, lora_A, lora_B, lora_x)
    if not kernel_on("lora_linear", x):
        return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, lora_x)
    K, N = x.shape[-1], weight.shape[0]

    def check(y):
        n = CHECK_ROWS
        lx = None if lora_x is None else lora_x.reshape(-1, K)[:n]
        return [(y.reshape(-1, N)[:n], lora_linear_reference(x.reshape(-1, K)[:n], weight, bias, lora_A, lora_B,
                                                             scaling, lx))]

    return guarded("lora_linear", x, lambda: LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B,
                                                                      float(scaling), lora_x),
                   lambda: lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, lora_x), check)
