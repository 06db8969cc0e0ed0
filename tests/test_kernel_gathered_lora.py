"""kernels.gathered_lora (Triton, many adapters in one batch) against kernels.gathered_lora_reference (plain torch).

On the CPU these run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) with 16-row tiles, 32-wide
K and output blocks, 16-wide rank chunks and a 2-way K split, so the odd shapes below (K 70, R 20, M 50) span
several tiles, splits and rank chunks with ragged edges. PHI3LORA_STRICT_KERNELS=1 here: a kernel failure raises
instead of quietly returning the reference (which would make every comparison pass).
"""
import warnings

import pytest
import torch

from phi3lora.kernels import _triton, gathered_lora, gathered_lora_reference, lora_gather
from phi3lora.kernels.lora_gather import plan_tiles

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, K, R, M, L = 37, 70, 20, 50, 4  # none a multiple of the interpreter's blocks
TOL32 = dict(atol=1e-5, rtol=1e-5)  # outputs are O(1): fp32 summation order moves ~1e-7
# 16-bit: kernel and reference both accumulate in fp32 and round once, so they differ by at most one ulp of the
# output (2^-8 relative in bf16, 2^-11 in fp16), from summation order; rounding xa to bf16 first (what a plain
# bf16 x·Aᵀ·Bᵀ does) is off by several ulps and fails this
TOL16 = {torch.bfloat16: dict(atol=1e-5, rtol=2 ** -8), torch.float16: dict(atol=1e-6, rtol=2 ** -11)}


@pytest.fixture(autouse=True)
def strict(monkeypatch):
    monkeypatch.setenv("PHI3LORA_STRICT_KERNELS", "1")
    failed = _triton.FAILED  # the process's record (the guard test below swaps in its own)
    yield
    assert "gathered_lora" not in failed


def make(n=N, k=K, r=R, m=M, n_adapters=L, dtype=torch.float32, seed=0):
    """x, A, B scaled so every row's delta is O(1) (a wrong adapter or a lost term cannot hide), scaling (L,)
    all different (a wrong s_i shows)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    A = torch.randn(n_adapters, r, k, generator=g) * k ** -0.5
    B = torch.randn(n_adapters, m, r, generator=g) * r ** -0.5
    scaling = torch.arange(1, n_adapters + 1, dtype=torch.float32) * 0.5
    return [t.to(DEVICE, dtype) for t in (x, A, B)] + [scaling.to(DEVICE)]


def ids_of(values):
    return torch.tensor(values, dtype=torch.long, device=DEVICE)


def mixed_ids(n=N, n_adapters=L, seed=1):
    """Every adapter and -1, shuffled: runs of one adapter are not contiguous in the batch."""
    g = torch.Generator().manual_seed(seed)
    return (torch.arange(n) % (n_adapters + 1) - 1)[torch.randperm(n, generator=g)].to(DEVICE)


def check(x, A, B, ids, scaling, **tol):
    got = gathered_lora(x, A, B, ids, scaling)
    want = gathered_lora_reference(x, A, B, ids, scaling)
    assert got.dtype == x.dtype and got.shape == (x.shape[0], B.shape[1])
    torch.testing.assert_close(got, want, **(tol or TOL32))
    assert want.abs().amax(1)[ids >= 0].min() > 0.05  # the rows with an adapter are not trivially zero
    return got


def test_fp32_mixed_adapters_and_no_adapter_rows():
    x, A, B, s = make()
    ids = mixed_ids()
    got = check(x, A, B, ids, s)
    assert torch.equal(got[ids == -1], torch.zeros_like(got[ids == -1]))  # base-model rows: exactly 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_within_one_ulp(dtype):
    x, A, B, s = make(dtype=dtype)
    check(x, A, B, mixed_ids(), s, **TOL16[dtype])


def test_all_rows_one_adapter():
    x, A, B, s = make()
    check(x, A, B, torch.full((N,), 2, device=DEVICE), s)


def test_every_row_a_different_adapter():
    n = 12  # decode: one row per request, each request its own adapter (and one base-model request)
    x, A, B, s = make(n=n, n_adapters=n - 1)
    check(x, A, B, torch.arange(n, device=DEVICE).flip(0) - 1, s)


@pytest.mark.parametrize("n", [1, 40])
def test_one_row_and_a_few_dozen(n):
    x, A, B, s = make(n=n)
    ids = ids_of([3]) if n == 1 else mixed_ids(n=n, seed=n)
    check(x, A, B, ids, s)


def test_rank_padding():
    """Adapter 1 has rank 5, zero-padded to the stack's R = 20: its delta is its own rank-5 LoRA's."""
    x, A, B, s = make()
    A[1, 5:], B[1, :, 5:] = 0, 0
    ids = mixed_ids()
    got = check(x, A, B, ids, s)
    rows = ids == 1
    own = (x[rows] @ A[1, :5].t()) @ B[1, :, :5].t() * s[1]
    torch.testing.assert_close(got[rows], own, **TOL32)


def test_non_contiguous_x():
    x, A, B, s = make()
    wide = torch.randn(2 * K, N, device=DEVICE)
    x_t = wide[::2].t()  # (N, K) with strides (1, 2 N): neither unit column stride nor row-major
    x_t.copy_(x)
    assert not x_t.is_contiguous() and x_t.stride(1) != 1
    check(x_t, A, B, mixed_ids(), s)


def test_wrong_adapter_id_changes_the_answer():
    """The per-row gather is real: shifting every id to the next adapter changes every adapter row's delta."""
    x, A, B, s = make()
    ids = mixed_ids()
    right = gathered_lora(x, A, B, ids, s)
    shifted = torch.where(ids >= 0, (ids + 1) % L, ids)
    wrong = gathered_lora(x, A, B, shifted, s)
    has = ids >= 0
    diff = (right[has] - wrong[has]).abs().amax(1)
    assert (diff > 0.05).all(), diff


def test_tile_plan_covers_each_row_once():
    """Each sorted position is in exactly one tile of its own run, and the tile table's bound holds."""
    ids = ids_of([2, -1, 0, 2, 2, 0, -1, 2] * 5 + [1])
    for block in (1, 2, 16):
        srt, perm, tiles = plan_tiles(ids, n_adapters=3, block_m=block)
        assert torch.equal(ids[perm], srt) and torch.equal(perm.sort().values, torch.arange(len(ids)))
        starts = tiles[tiles < len(ids)].tolist()
        covered = []
        for start in starts:
            run = [p for p in range(start, min(start + block, len(ids))) if srt[p] == srt[start]]
            covered += run
        assert sorted(covered) == list(range(len(ids)))


def test_bad_inputs_are_refused():
    x, A, B, s = make()
    with pytest.raises(ValueError, match=r"\[-1, 4\)"):
        gathered_lora(x, A, B, torch.full((N,), L, device=DEVICE), s)
    with pytest.raises(ValueError, match="lora_B"):
        gathered_lora(x, A, B[:, :, :3], mixed_ids(), s)
    with pytest.raises(ValueError, match="dtype"):
        gathered_lora(x, A.half(), B, mixed_ids(), s)


def test_runtime_guard(monkeypatch):
    """The first run on a device is checked against the reference on a slice: the real kernel passes silently;
    a wrong one warns once and the reference's answer is returned."""
    monkeypatch.setattr(_triton, "FAILED", {})
    monkeypatch.setattr(_triton, "CHECKED", set())
    monkeypatch.setattr(_triton, "CHECK_ON_CPU", True)
    monkeypatch.delenv("PHI3LORA_STRICT_KERNELS")
    x, A, B, s = make(n=20)
    ids = mixed_ids(n=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gathered_lora(x, A, B, ids, s)
    assert {name for name, _ in _triton.CHECKED} == {"gathered_lora"} and _triton.FAILED == {}
    monkeypatch.setattr(_triton, "CHECKED", set())
    monkeypatch.setattr(lora_gather, "gathered_lora_triton", lambda x, A, B, ids, s: torch.zeros(len(x), B.shape[1]))
    with pytest.warns(RuntimeWarning, match="gathered_lora failed"):
        got = gathered_lora(x, A, B, ids, s)
    torch.testing.assert_close(got, gathered_lora_reference(x, A, B, ids, s), atol=0, rtol=0)
    assert "gathered_lora" in _triton.FAILED


@pytest.mark.gpu
@pytest.mark.parametrize("n", [64, 2048])  # decode (64 requests) and prefill (2048 tokens, BLOCK_M 64)
def test_phi3_qkv_shape_bf16(n):
    """Phi-3-mini's qkv (K 3072, M 9216) at r 64, 16 adapters and base rows, compiled kernel."""
    g = torch.Generator().manual_seed(0)
    n_adapters, r, k, m = 16, 64, 3072, 9216
    x = torch.randn(n, k, generator=g).to(DEVICE, torch.bfloat16)
    A = (torch.randn(n_adapters, r, k, generator=g) * k ** -0.5).to(DEVICE, torch.bfloat16)
    B = (torch.randn(n_adapters, m, r, generator=g) * r ** -0.5).to(DEVICE, torch.bfloat16)
    s = torch.linspace(0.5, 2.0, n_adapters).to(DEVICE)
    ids = (torch.randint(-1, n_adapters, (n,), generator=g) if n == 64 else
           torch.arange(n).div(n // 8, rounding_mode="floor") * 2 - 1).to(DEVICE)  # prefill: 8 long runs
    got = gathered_lora(x, A, B, ids, s)
    want = gathered_lora_reference(x, A, B, ids, s)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=2 ** -7)  # compiled rounding: a ulp, rarely two
