"""Gathered multi-adapter LoRA (Punica's BGMV/SGMV, https://arxiv.org/abs/2310.18547): many adapters in one batch.

    delta[n] = s_i · (x[n]·A_iᵀ)·B_iᵀ   with i = adapter_ids[n];  delta[n] = 0 where i == -1 (the base model)

x (N, K) holds one row per token of the batch, lora_A (L, R, K) and lora_B (L, M, R) stack L adapters (ranks
zero-padded to a common R), scaling (L,) fp32. Only the low-rank term is computed (forward only, for serving); the
base GEMM x·Wᵀ is shared by every row and runs as usual. `gathered_lora_reference` (kernels/reference.py) is the
contract: one GEMM pair per adapter present, fp32 accumulation, rounded once.

Shapes that matter (Phi-3-mini, serving): decode has N = running requests (1..256), each usually its own adapter;
prefill has N = prompt tokens (hundreds to thousands) in long runs of one adapter. K = 3072 (8192 for down_proj),
R <= 64, M up to 2·8192 (gate_up). Per adapter present the kernel must read A_i (R·K, 384 KB in bf16 at R 64) and
B_i (M·R, 2 MB for gate_up): in decode those weight bytes dwarf x (N·K) and the output (N·M), so the work is
memory-bound and what counts is reading each adapter's weights once per batch, not once per row.

Design: two kernels, not one fused.
  1. The launcher sorts the rows by adapter (stable, on the device, sync-free) and cuts each run of equal ids
     into tiles of BLOCK_M sorted positions (SGMV's segments): a tile never mixes adapters, so it loads A_i and
     B_i tiles once for all its rows and multiplies them with tl.dot. The tile table's length is bounded without
     looking at the ids (cdiv(N, BLOCK_M) + number of runs <= cdiv(N, BLOCK_M) + min(N, L + 1)); the surplus
     programs find an empty tile and load nothing.
  2. shrink: xa = x·A_iᵀ, (N, R) fp32, over (tile, K split, R chunk) programs. Decode has few tiles, so K is split
     (partial sums (SPLIT_K, N, R) fp32, summed in torch: a few KB) to spread one adapter's A over many SMs.
  3. expand: delta = s_i·xa·B_iᵀ over (tile, BLOCK_N columns) programs, written once in x's dtype at the rows'
     original positions (rows with id -1 get zeros from the same store).
  A fused kernel would recompute x·A_iᵀ (2·K·R per row) for every BLOCK_N column tile of the output: at K 3072,
  M 16384 and BLOCK_N 128 that is 128 times the shrink, 24x the expand's own work; what the split costs instead
  is writing and reading (SPLIT_K + 1)·N·R fp32 values, kilobytes next to B_i's megabytes.
Decode (every row another adapter) uses BLOCK_M 16, tl.dot's minimum: 15 of a 1-row tile's 16 MMA rows are idle,
which should cost little since the kernels wait on A_i and B_i, not on tensor cores (not yet measured on a GPU;
Punica's BGMV uses a per-row reduction instead, one tiled kernel for both cases keeps this file short). N >= 256
(prefill) uses BLOCK_M 64 with 8 warps. Stack adapters with R a multiple of 16: at R = 8 the loads cannot be
vectorized and the expand needs twice the registers (tests/test_kernels_compile.py).

Precision: both products accumulate in fp32 and delta is rounded once, as in the reference. xa stays fp32 between
the kernels; for 16-bit inputs the expand multiplies it as two 16-bit halves (xa = hi + lo, hi = 16-bit(xa),
lo = 16-bit(xa - hi)) on tensor cores, which keeps ~16 mantissa bits of xa where one 16-bit cast keeps 8 (bf16);
fp32 inputs use IEEE fp32 products (no TF32).
The module is named for its kernels, not for `gathered_lora` (see kernels/__init__.py).
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, INTERPRET, device_guard, guarded, kernel_on, tl, triton
from .reference import gathered_lora_reference

# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _tile_rows(ids_ptr, perm_ptr, tiles_ptr, N, L, BLOCK_M: tl.constexpr):
        """This program's tile: sorted positions (BLOCK_M,), original rows (BLOCK_M,), `mine` (BLOCK_M,): the
        positions in this tile's run (not the next run's, not past N), `live`: mine with an adapter in [0, L)
        (a -1 run's rows load nothing and get zeros), and the adapter."""
        start = tl.load(tiles_ptr + tl.program_id(0))                      # N for a surplus (empty) tile
        adapter = tl.load(ids_ptr + start, mask=start < N, other=-1)
        offs = start + tl.arange(0, BLOCK_M)                               # (BLOCK_M,) sorted positions
        ids = tl.load(ids_ptr + offs, mask=offs < N, other=-2)            # -2 matches no run, -1 included
        mine = (ids == adapter) & (offs < N)
        # ids == adapter_or_none rather than `mine & (adapter >= 0)`: a scalar condition and-ed into a vector mask
        # comes out int64 in the interpreter (triton 3.9), which tl.load rejects as a mask
        adapter_or_none = tl.where((adapter >= 0) & (adapter < L), adapter, -3)
        live = (ids == adapter_or_none) & (offs < N)
        rows = tl.load(perm_ptr + offs, mask=mine, other=0)               # (BLOCK_M,) int64 rows of x and out
        return offs, rows, mine, live, adapter

    @triton.jit
    def _gather_shrink_kernel(
        x_ptr,      # (N, K)             input rows, any strides
        a_ptr,      # (L, R, K)          stacked A, any strides
        ids_ptr,    # (N,) int64         adapter ids, sorted ascending
        perm_ptr,   # (N,) int64         original row of each sorted position
        tiles_ptr,  # (T,) int64         first sorted position of each tile; N for an empty tile
        part_ptr,   # (SPLIT_K, N, R)    fp32 partial sums of xa = x·A_iᵀ, sorted order
        N, K, R, L, K_PER_SPLIT,
        stride_xn, stride_xk, stride_al, stride_ar, stride_ak,
        stride_ps, stride_pn,
        PRECISION: tl.constexpr,  # "ieee" for fp32 (no TF32); ignored by tl.dot for 16-bit inputs
        DOT_FP32: tl.constexpr,   # interpreter + bf16 only: upcast (exact) before tl.dot (see gathered_lora)
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # program (tile, K split, R chunk): part[split, tile rows, chunk] = x[rows, split's K]·A_i[chunk, split's K]ᵀ
        offs, rows, mine, live, adapter = _tile_rows(ids_ptr, perm_ptr, tiles_ptr, N, L, BLOCK_M)
        k0 = tl.program_id(1) * K_PER_SPLIT
        offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)        # (BLOCK_R,)
        offs_k = tl.arange(0, BLOCK_K)                                     # (BLOCK_K,)
        a_row = a_ptr + adapter.to(tl.int64) * stride_al
        x_ptrs = x_ptr + rows[:, None] * stride_xn + (k0 + offs_k)[None, :] * stride_xk     # (BLOCK_M, BLOCK_K)
        a_ptrs = a_row + offs_r[:, None] * stride_ar + (k0 + offs_k)[None, :] * stride_ak   # (BLOCK_R, BLOCK_K)
        r_in = offs_r < tl.where(tl.max(live.to(tl.int32), 0) > 0, R, 0)  # an empty (or -1) tile reads no A
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        k_end = tl.minimum(K - k0, K_PER_SPLIT)                            # this split's share of K
        for kb in range(0, tl.cdiv(K_PER_SPLIT, BLOCK_K)):
            k_in = offs_k < k_end - kb * BLOCK_K
            x = tl.load(x_ptrs, mask=live[:, None] & k_in[None, :], other=0.0)
            a = tl.load(a_ptrs, mask=r_in[:, None] & k_in[None, :], other=0.0)
            if DOT_FP32:
                x = x.to(tl.float32)
                a = a.to(tl.float32)
            acc = tl.dot(x, tl.trans(a), acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            a_ptrs += BLOCK_K * stride_ak
        p_ptrs = part_ptr + tl.program_id(1) * stride_ps + offs[:, None].to(tl.int64) * stride_pn + offs_r[None, :]
        tl.store(p_ptrs, acc, mask=live[:, None] & (offs_r < R)[None, :])

    @triton.jit
    def _gather_expand_kernel(
        xa_ptr,     # (N, R) fp32        xa = x·A_iᵀ in sorted order, unit column stride
        b_ptr,      # (L, M, R)          stacked B, any strides
        scale_ptr,  # (L,) fp32          s_i
        ids_ptr, perm_ptr, tiles_ptr,     # as in the shrink
        out_ptr,    # (N, M)             delta, written once (zeros for rows with id -1)
        N, M, R, L,
        stride_xan, stride_bl, stride_bm, stride_br, stride_on, stride_om,
        PRECISION: tl.constexpr,
        HI_LO: tl.constexpr,      # 16-bit inputs: xa·B as (hi + lo)·B, two 16-bit tl.dot (module docstring)
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # program (tile, column block): out[tile rows, cols] = s_i · xa[tile rows]·B_i[cols]ᵀ
        offs, rows, mine, live, adapter = _tile_rows(ids_ptr, perm_ptr, tiles_ptr, N, L, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)       # (BLOCK_N,)
        offs_r = tl.arange(0, BLOCK_R)                                     # (BLOCK_R,)
        any_live = tl.max(live.to(tl.int32), 0) > 0
        r_live = tl.where(any_live, R, 0)                                 # an empty (or -1) tile reads no B
        n_in = offs_n < M
        xa_ptrs = xa_ptr + offs[:, None].to(tl.int64) * stride_xan + offs_r[None, :]        # (BLOCK_M, BLOCK_R)
        b_ptrs = (b_ptr + adapter.to(tl.int64) * stride_bl + offs_r[:, None] * stride_br
                  + offs_n[None, :] * stride_bm)                                           # (BLOCK_R, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for rb in range(0, tl.cdiv(R, BLOCK_R)):
            r_in = offs_r < r_live - rb * BLOCK_R
            xa = tl.load(xa_ptrs, mask=live[:, None] & r_in[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=r_in[:, None] & n_in[None, :], other=0.0)
            if HI_LO:
                hi = xa.to(b.dtype)
                lo = (xa - hi.to(tl.float32)).to(b.dtype)
                acc = tl.dot(hi, b, acc)
                acc = tl.dot(lo, b, acc)
            else:
                acc = tl.dot(xa, b.to(tl.float32), acc, input_precision=PRECISION)
            xa_ptrs += BLOCK_R
            b_ptrs += BLOCK_R * stride_br
        scale = tl.load(scale_ptr + adapter, mask=any_live, other=0.0)
        acc = acc * scale
        o_ptrs = out_ptr + rows[:, None] * stride_on + offs_n[None, :] * stride_om
        # every sorted position is `mine` in exactly one tile, its run's: the -1 run's tiles store the zeros
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mine[:, None] & n_in[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------

SMS_GUESS = 132            # H100/H200 SMs: the shrink's K split aims at ~2 programs per SM
# The interpreter runs one program at a time in numpy: small tiles, so the test shapes span several tiles, K
# splits and R chunks.
_INTERPRET_META = dict(BLOCK_M=16, BLOCK_K=32, BLOCK_N=32, BLOCK_R=16, num_warps=4)
CHECK_ROWS = 8             # rows the runtime guard compares with the reference on a GPU's first run


def block_m_for(n_rows: int) -> int:
    """Rows per tile: 16 (tl.dot's minimum) for decode-sized batches, where runs are short; 64 for prefill."""
    return 16 if n_rows < 256 else 64


def launch_meta(N: int, K: int, R: int, L: int, fp32: bool = False) -> dict:
    """Block sizes and the shrink's K split for a batch of N rows (tests/test_kernels_compile.py compiles these).
    fp32: fp32 inputs (IEEE FMA products, no tensor cores) get smaller K and N blocks (32, 32)."""
    if INTERPRET:
        meta = dict(_INTERPRET_META)
    else:
        block_r = min(64, max(16, 1 << (R - 1).bit_length()))                # rank chunk: 16 (tl.dot's minimum)..64
        bm = block_m_for(N)
        # 8 warps at BLOCK_M 64: the expand's (64, 128) fp32 accumulator next to xa's two halves reached 255
        # registers and spilled on sm_80 at r 64 with 4 (tests/test_kernels_compile.py). fp32 inputs: with
        # BLOCK_K 128 / BLOCK_N 128 the FMA path spilled on sm_80 (shrink at every prefill rank, expand at r 64)
        block_k, block_n = (32, 32) if fp32 else (128, 128)
        meta = dict(BLOCK_M=bm, BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=4 if bm == 16 else 8)
    T = -(-N // meta["BLOCK_M"]) + min(N, L + 1)                             # tiles (plan_tiles' bound)
    r_chunks = -(-R // meta["BLOCK_R"])
    k_blocks = -(-K // meta["BLOCK_K"])
    # K split: enough programs to cover the GPU when there are few tiles (decode), at least 2 K blocks each
    split = max(1, min(-(-2 * SMS_GUESS // (T * r_chunks)), k_blocks // 2))
    if INTERPRET:
        split = min(2, k_blocks)  # exercise the split and the partial sum, keep programs few
    k_per_split = -(-k_blocks // split) * meta["BLOCK_K"]
    return dict(meta, SPLIT_K=-(-K // k_per_split), K_PER_SPLIT=k_per_split)


def plan_tiles(adapter_ids: torch.Tensor, n_adapters: int, block_m: int):
    """Sort rows by adapter and cut each run into tiles of block_m sorted positions, on the device, no sync.

    Returns (sorted ids (N,) int64, perm (N,) int64: original row of each sorted position, tiles (T,) int64:
    first sorted position of each tile, N for the surplus entries). T = cdiv(N, block_m) + min(N, L + 1) bounds
    the number of tiles: each run adds at most one partial tile, and there are at most L + 1 runs (-1 included).
    """
    N = adapter_ids.numel()
    ids, perm = torch.sort(adapter_ids.long(), stable=True)                  # (N,), (N,)
    pos = torch.arange(N, device=ids.device)                                 # (N,)
    new_run = torch.ones(N, dtype=torch.bool, device=ids.device)
    new_run[1:] = ids[1:] != ids[:-1]
    run_start = torch.where(new_run, pos, 0).cummax(0).values                # (N,) first position of each row's run
    head = (pos - run_start) % block_m == 0                                  # (N,) a tile starts here
    T = -(-N // block_m) + min(N, n_adapters + 1)
    slot = torch.where(head, head.cumsum(0) - 1, T)                          # non-heads go to a dropped slot T
    tiles = torch.full((T + 1,), N, dtype=torch.long, device=ids.device).scatter_(0, slot, pos)[:T]
    return ids, perm, tiles


def gathered_lora_triton(x, lora_A, lora_B, adapter_ids, scaling):
    """The two launches (shapes checked by `gathered_lora`): x (N, K), lora_A (L, R, K), lora_B (L, M, R),
    adapter_ids (N,), scaling (L,) fp32 -> (N, M) in x's dtype."""
    N, K = x.shape
    L, M, R = lora_B.shape
    out_dtype = x.dtype
    # The interpreter mishandles bf16 (numpy has none): tl.dot multiplies raw bf16 bits and fp32 -> bf16 casts
    # truncate (triton 3.9). There: upcast before each dot (exact), keep xa fp32 through the expand, and round
    # the fp32 result in torch, as the GPU does in the kernel.
    interpret_bf16 = INTERPRET and x.dtype == torch.bfloat16
    out = torch.empty((N, M), dtype=torch.float32 if interpret_bf16 else out_dtype, device=x.device)
    if N == 0 or M == 0:
        return out.to(out_dtype)
    meta = launch_meta(N, K, R, L, fp32=x.dtype == torch.float32)
    bm, bk, br, split, k_per_split = (meta[k] for k in ("BLOCK_M", "BLOCK_K", "BLOCK_R", "SPLIT_K", "K_PER_SPLIT"))
    ids, perm, tiles = plan_tiles(adapter_ids, L, bm)
    T = tiles.numel()
    r_chunks = triton.cdiv(R, br)
    part = torch.empty((split, N, R), dtype=torch.float32, device=x.device)  # rows of -1 runs: never read
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    scaling = scaling.to(device=x.device, dtype=torch.float32).contiguous()
    with device_guard(x):
        _gather_shrink_kernel[(T, split, r_chunks)](
            x, lora_A, ids, perm, tiles, part,
            N, K, R, L, k_per_split,
            x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), lora_A.stride(2),
            part.stride(0), part.stride(1),
            PRECISION=precision, DOT_FP32=interpret_bf16, BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=br,
            num_warps=meta["num_warps"])
        xa = part[0] if split == 1 else part.sum(0)                            # (N, R) fp32, sorted order
        _gather_expand_kernel[(T, triton.cdiv(M, meta["BLOCK_N"]))](
            xa, lora_B, scaling, ids, perm, tiles, out,
            N, M, R, L,
            xa.stride(0), lora_B.stride(0), lora_B.stride(1), lora_B.stride(2), out.stride(0), out.stride(1),
            PRECISION=precision, HI_LO=x.dtype != torch.float32 and not interpret_bf16,
            BLOCK_M=bm, BLOCK_N=meta["BLOCK_N"], BLOCK_R=br, num_warps=meta["num_warps"])
    return out.to(out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------

def _check(x, lora_A, lora_B, adapter_ids, scaling):
    if x.dim() != 2:
        raise ValueError(f"x must be (N, K), got shape {tuple(x.shape)}")
    N, K = x.shape
    if lora_A.dim() != 3 or lora_A.shape[2] != K:
        raise ValueError(f"lora_A must be (L, R, {K}), got {tuple(lora_A.shape)}")
    L, R, _ = lora_A.shape
    if lora_B.dim() != 3 or lora_B.shape[0] != L or lora_B.shape[2] != R:
        raise ValueError(f"lora_B must be ({L}, M, {R}) to fit lora_A {tuple(lora_A.shape)}, got "
                         f"{tuple(lora_B.shape)}")
    if tuple(adapter_ids.shape) != (N,):
        raise ValueError(f"adapter_ids must be ({N},), one id per row of x, got {tuple(adapter_ids.shape)}")
    if tuple(scaling.shape) != (L,):
        raise ValueError(f"scaling must be ({L},), one per adapter, got {tuple(scaling.shape)}")
    if lora_A.dtype != x.dtype or lora_B.dtype != x.dtype:
        raise ValueError(f"lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) must be in x's dtype {x.dtype}: "
                         "stack the adapters in the model's dtype once, not per call")
    if N and bool(((adapter_ids < -1) | (adapter_ids >= L)).any()):  # one host sync; the kernel also skips them
        bad = adapter_ids[(adapter_ids < -1) | (adapter_ids >= L)][:4].tolist()
        raise ValueError(f"adapter_ids must lie in [-1, {L}) (-1: no adapter), got {bad}")


def gathered_lora(x, lora_A, lora_B, adapter_ids, scaling):
    """Many adapters in one batch: delta[n] = scaling[i]·(x[n]·A[i]ᵀ)·B[i]ᵀ with i = adapter_ids[n], 0 where -1.

    x (N, K) in fp32/fp16/bf16, any strides; lora_A (L, R, K) and lora_B (L, M, R) in x's dtype (ranks zero-padded
    to a common R); adapter_ids (N,) integer in [-1, L); scaling (L,) fp32 tensor. Returns the low-rank term only,
    (N, M) in x's dtype (add it to the base layer's x·Wᵀ). Forward only (no autograd). Runs the Triton kernels on
    CUDA tensors (or anywhere under TRITON_INTERPRET=1), else `gathered_lora_reference`, whose semantics it has.
    Checking that the ids lie in [-1, L) is its one host sync (the kernels themselves also skip other ids).
    """
    _check(x, lora_A, lora_B, adapter_ids, scaling)
    if not kernel_on("gathered_lora", x):
        return gathered_lora_reference(x, lora_A, lora_B, adapter_ids, scaling)

    def check(out):
        n = CHECK_ROWS
        return [(out[:n], gathered_lora_reference(x[:n], lora_A, lora_B, adapter_ids[:n], scaling))]

    with torch.no_grad():
        return guarded("gathered_lora", x, lambda: gathered_lora_triton(x, lora_A, lora_B, adapter_ids, scaling),
                       lambda: gathered_lora_reference(x, lora_A, lora_B, adapter_ids, scaling), check)
