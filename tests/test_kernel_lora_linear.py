"""kernels.lora_linear (Triton, fused) against kernels.lora_linear_reference (plain torch).

On the CPU these run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) with 32x32x32 tiles, so
the odd shapes below span several tiles with ragged edges in M, N and K. GPU tests run the compiled, autotuned
kernel at Phi-3-mini's shapes.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from phi3lora.kernels import lora_linear, lora_linear_reference
from phi3lora.kernels.lora_matmul import matmul_lowrank
from phi3lora.lora.layers import expand_merged_B

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL32 = dict(atol=1e-4, rtol=1e-4)  # fp32: outputs and gradients are O(1..50), fp32 differences ~1e-6
M, K, N, R, S = 37, 72, 100, 8, 2.0  # none a multiple of the 32-wide interpreter tiles


def make(lead=(M,), k=K, n=N, r=R, dtype=torch.float32, bias=True, seed=0, device=DEVICE):
    """Leaf tensors scaled so y, and each term of it, is O(1): a wrong term cannot hide under the tolerance."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, grad=True):
        t = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    return dict(
        x=rnd(*lead, k),
        weight=rnd(n, k, scale=k ** -0.5, grad=False),
        bias=rnd(n) if bias else None,
        lora_A=rnd(r, k, scale=k ** -0.5),
        lora_B=rnd(n, r, scale=r ** -0.5),  # nonzero (unlike a fresh init) so the low-rank path is exercised
    )


def clone(inputs, dtype=None):
    """Independent leaves with the same values (optionally upcast), same requires_grad."""
    out = {}
    for name, t in inputs.items():
        out[name] = None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad)
    return out


def run(fn, inputs, dy, scaling=S, lora_x=None):
    """Output and the gradient of every input that asks for one (None for those that got none)."""
    y = fn(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_A"], inputs["lora_B"], scaling, lora_x=lora_x)
    y.backward(dy)
    grads = {name: t.grad for name, t in inputs.items() if t is not None and t.requires_grad}
    return y, grads


def assert_all_close(ours, ref, **tol):
    (y, grads), (y_ref, grads_ref) = ours, ref
    torch.testing.assert_close(y, y_ref, **tol)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert grads[name] is not None, name
        torch.testing.assert_close(grads[name], grads_ref[name], **tol, msg=lambda m: f"grad of {name}: {m}")


# ------------------------------------------------------------------------------------------------ fp32 exactness

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(M,), (2, 19)])
def test_fp32_output_and_grads_match_reference(lead, bias):
    inputs = make(lead=lead, bias=bias)
    dy = torch.randn(*lead, N, device=DEVICE)
    ref_inputs = clone(inputs)
    ours = run(lora_linear, inputs, dy)
    assert ours[0].shape == (*lead, N) and ours[0].dtype == torch.float32
    assert_all_close(ours, run(lora_linear_reference, ref_inputs, dy), **TOL32)


def test_weight_never_gets_a_gradient():
    inputs = make()
    inputs["weight"].requires_grad_(True)  # even when asked for: W is frozen
    y = lora_linear(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_A"], inputs["lora_B"], S)
    y.sum().backward()
    assert inputs["weight"].grad is None
    assert inputs["x"].grad is not None and inputs["lora_B"].grad is not None


def test_only_requested_grads():
    inputs = make(bias=True)
    inputs["x"].requires_grad_(False)
    inputs["bias"].requires_grad_(False)
    inputs["lora_A"].requires_grad_(False)
    ref_inputs = clone(inputs)
    dy = torch.randn(M, N, device=DEVICE)
    ours = run(lora_linear, inputs, dy)
    assert set(ours[1]) == {"lora_B"}
    assert_all_close(ours, run(lora_linear_reference, ref_inputs, dy), **TOL32)


def test_wrong_scaling_is_caught():
    """The fp32 tolerance is tight enough to see a 0.1% error in the scaling of the low-rank term."""
    inputs = make()
    dy = torch.randn(M, N, device=DEVICE)
    ref = run(lora_linear_reference, clone(inputs), dy)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(run(lora_linear, inputs, dy, scaling=S * 1.001)[0], ref[0], **TOL32)


def test_dropout_grad_of_x_end_to_end():
    """lora_x = dropout(x): dX = dY·W plus the low-rank part routed back through the dropout mask."""
    inputs = make()
    ref_inputs = clone(inputs)
    dy = torch.randn(M, N, device=DEVICE)

    def with_dropout(fn, tensors):
        torch.manual_seed(1234)
        lora_x = F.dropout(tensors["x"], p=0.3, training=True)
        return run(fn, tensors, dy, lora_x=lora_x), lora_x

    ours, lx = with_dropout(lora_linear, inputs)
    ref, lx_ref = with_dropout(lora_linear_reference, ref_inputs)
    assert torch.equal(lx, lx_ref) and (lx == 0).any()  # same mask, and it dropped something
    assert_all_close(ours, ref, **TOL32)
    # The mask matters: without it dX would be different (so the check above can fail).
    no_dropout = run(lora_linear_reference, clone(inputs), dy)
    assert (no_dropout[1]["x"] - ours[1]["x"]).abs().max() > 1e-2


def test_lora_x_leaf_gets_its_own_gradient():
    inputs = make(lead=(2, 19))
    ref_inputs = clone(inputs)
    lora_x = torch.randn(2, 19, K, device=DEVICE, requires_grad=True)
    lora_x_ref = lora_x.detach().clone().requires_grad_(True)
    dy = torch.randn(2, 19, N, device=DEVICE)
    ours = run(lora_linear, inputs, dy, lora_x=lora_x)
    ref = run(lora_linear_reference, ref_inputs, dy, lora_x=lora_x_ref)
    assert_all_close(ours, ref, **TOL32)
    torch.testing.assert_close(lora_x.grad, lora_x_ref.grad, **TOL32)
    # x itself only sees the base GEMM: dX = dY·W exactly as torch computes it
    torch.testing.assert_close(inputs["x"].grad, dy @ inputs["weight"], **TOL32)


def test_shape_errors_are_reported():
    inputs = make()
    with pytest.raises(ValueError, match="lora_A"):
        lora_linear(inputs["x"], inputs["weight"], None, inputs["lora_A"][:, :5], inputs["lora_B"], S)
    with pytest.raises(ValueError, match="weight is"):
        lora_linear(inputs["x"], inputs["weight"].double(), None, inputs["lora_A"], inputs["lora_B"], S)


# ------------------------------------------------------------------------------------------- MergedLinear slices

SLICES, ENABLE, RS = [48, 16, 16], (True, False, True), 4  # q, k, v under GQA; k has no adapter


def loop_B_full(lora_B, slice_sizes, enable_lora, r):
    n_enabled = sum(enable_lora)
    full = lora_B.new_zeros(sum(slice_sizes), r * n_enabled)
    row, b_row, e = 0, 0, 0
    for size, on in zip(slice_sizes, enable_lora):
        if on:
            full[row:row + size, e * r:(e + 1) * r] = lora_B[b_row:b_row + size]
            b_row, e = b_row + size, e + 1
        row += size
    return full


@pytest.mark.parametrize("slices,enable", [(SLICES, ENABLE), ([16, 16, 16], (True, True, True)),
                                           ([8, 24], (False, True)), ([8, 24], (False, False))])
def test_expand_merged_B_matches_loop(slices, enable):
    n_b = sum(s for s, on in zip(slices, enable) if on)
    lora_B = torch.randn(n_b, RS)
    torch.testing.assert_close(expand_merged_B(lora_B, slices, enable, RS), loop_B_full(lora_B, slices, enable, RS),
                               atol=0, rtol=0)
    with pytest.raises(ValueError):
        expand_merged_B(torch.randn(n_b + 1, RS), slices, enable, RS)


def test_expand_merged_B_matches_loralib_conv1d():
    """loralib: delta_W rows of enabled slices = conv1d(A, B, groups=n_enabled), scattered into those rows."""
    out, enable, r = 48, (True, False, True), RS
    lora_A, lora_B = torch.randn(r * 2, K), torch.randn(out // 3 * 2, r)
    delta = F.conv1d(lora_A.unsqueeze(0), lora_B.unsqueeze(-1), groups=2).squeeze(0)  # (32, K)
    lora_ind = torch.tensor([True] * 16 + [False] * 16 + [True] * 16)
    expected = torch.zeros(out, K)
    expected[lora_ind] = delta
    torch.testing.assert_close(expand_merged_B(lora_B, [16] * 3, enable, r) @ lora_A, expected)


def test_merged_slices_through_the_kernel():
    n_b = sum(s for s, on in zip(SLICES, ENABLE) if on)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, K, generator=g).to(DEVICE).requires_grad_(True)
    weight = (torch.randn(sum(SLICES), K, generator=g) * K ** -0.5).to(DEVICE)
    lora_A = (torch.randn(RS * 2, K, generator=g) * K ** -0.5).to(DEVICE).requires_grad_(True)
    lora_B = (torch.randn(n_b, RS, generator=g) * RS ** -0.5).to(DEVICE).requires_grad_(True)
    dy = torch.randn(M, sum(SLICES), generator=g).to(DEVICE)
    leaves = (x, lora_A, lora_B)

    y = lora_linear(x, weight, None, lora_A, expand_merged_B(lora_B, SLICES, ENABLE, RS), S)
    y.backward(dy)
    grads = [t.grad for t in leaves]

    # Reference: one explicit adapter per enabled slice, in plain torch.
    xr, Ar, Br = (t.detach().clone().requires_grad_(True) for t in leaves)
    q = xr @ weight.t()                                               # (M, 80) = [q | k | v]
    y_ref = torch.cat([q[:, :48] + S * (xr @ Ar[:RS].t()) @ Br[:48].t(),  # q: first adapter
                       q[:, 48:64],                                      # k: none
                       q[:, 64:] + S * (xr @ Ar[RS:].t()) @ Br[48:].t()], 1)  # v: second adapter
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, **TOL32)
    for ours, ref, name in zip(grads, (xr.grad, Ar.grad, Br.grad), ("x", "A", "B")):
        torch.testing.assert_close(ours, ref, **TOL32, msg=lambda m: f"grad of {name}: {m}")

    # The disabled slice is the base GEMM bit for bit (its B_full rows are zero, adding an exact 0) ...
    base = matmul_lowrank(x.detach(), weight.t())
    assert torch.equal(y[:, 48:64].detach(), base[:, 48:64])
    # ... while the enabled ones do move.
    assert (y[:, :48].detach() - base[:, :48]).abs().max() > 0.1


# ---------------------------------------------------------------------------------------- half precision (CPU too)

def relative_error(a, ref):
    """Max abs error over the output's scale (max abs): what bf16/fp16 rounding bounds."""
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def check_half(dtype, lead, k, n, r, seed=0):
    """Ours and torch's unfused path, both in `dtype`, against an fp32 reference on the same `dtype` inputs.

    Inputs are identical, so the error is rounding: the output to the format costs up to eps/2 of the output's
    max (eps = 2^-7 bf16, 2^-10 fp16), rounding the thin xa / g to the format a little more; fp32 accumulation
    adds ~sqrt(K)·2^-24, nothing. Bound: eps of the output's scale, and never more than twice the error of torch
    computing the same unfused in the same format (which lands near eps/2: the bound is not loose).
    """
    eps = torch.finfo(dtype).eps
    inputs = make(lead=lead, k=k, n=n, r=r, dtype=dtype, seed=seed)
    dy = torch.randn(*lead, n, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    unfused_inputs, ref_inputs = clone(inputs), clone(inputs, torch.float32)
    ours = run(lora_linear, inputs, dy)
    unfused = run(lora_linear_reference, unfused_inputs, dy)
    ref = run(lora_linear_reference, ref_inputs, dy.float())
    assert ours[0].dtype == dtype
    report = {}
    for name in ["y", *ref[1]]:
        a, u, rf = ((o[0] if name == "y" else o[1][name]) for o in (ours, unfused, ref))
        assert a.dtype == dtype, name
        err, err_unfused = relative_error(a, rf), relative_error(u, rf)
        report[name] = (err, err_unfused)
        assert err < eps, (name, report)
        assert err <= 2 * err_unfused + eps / 8, (name, report)
    return inputs, dy, ref, report


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_interpreter_sized(dtype):
    check_half(dtype, (M,), K, N, R)


def test_fp32_adapters_on_a_bf16_model():
    """A, B and bias kept in fp32 while x and W are bf16: gradients come back in fp32, values as in bf16."""
    inputs = make(dtype=torch.float32)
    inputs["x"] = inputs["x"].detach().bfloat16().requires_grad_(True)
    inputs["weight"] = inputs["weight"].bfloat16()
    ref_inputs = clone(inputs, torch.float32)
    ref_inputs["x"] = ref_inputs["x"].detach().bfloat16().float().requires_grad_(True)
    dy = torch.randn(M, N, device=DEVICE).bfloat16()
    ours = run(lora_linear, inputs, dy)
    ref = run(lora_linear_reference, ref_inputs, dy.float())
    assert ours[0].dtype == torch.bfloat16 and inputs["x"].grad.dtype == torch.bfloat16
    for name in ("lora_A", "lora_B", "bias"):
        assert ours[1][name].dtype == torch.float32, name
    eps = torch.finfo(torch.bfloat16).eps
    for name in ["y", *ref[1]]:  # adapters rounded to bf16 for the products: a few bf16 ulps of the scale
        err = relative_error(ours[0] if name == "y" else ours[1][name], ref[0] if name == "y" else ref[1][name])
        assert err < 2 * eps, (name, err)


# ---------------------------------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_odd_shapes_compiled(dtype):
    """The compiled kernel (autotuned tiles up to 256 wide) on ragged shapes."""
    for lead, k, n, r in [((37,), 72, 100, 8), ((3, 333), 520, 1000, 16), ((1,), 3072, 9216, 64)]:
        if dtype == torch.float32:
            inputs = make(lead=lead, k=k, n=n, r=r)
            dy = torch.randn(*lead, n, device=DEVICE)
            assert_all_close(run(lora_linear, inputs, dy), run(lora_linear_reference, clone(inputs), dy), **TOL32)
        else:
            check_half(dtype, lead, k, n, r)


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(3072, 9216), (8192, 3072)], ids=["qkv", "down"])
def test_gpu_phi3_shapes_bf16(k, n):
    inputs, dy, ref, report = check_half(torch.bfloat16, (4096,), k, n, 16)
    print(report)
    # Teeth: a 5% scaling error in the low-rank term (about 2/3 of y here) lands well outside the bound.
    wrong = lora_linear(*(inputs[name].detach() if inputs[name] is not None else None
                          for name in ("x", "weight", "bias", "lora_A", "lora_B")), S * 1.05)
    assert relative_error(wrong, ref[0]) > 2 * report["y"][0]


# ------------------------------------------------------------------------------------------------ the benchmark

def test_bench_cpu_smoke_run():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "lora_matmul.py"), "--quick"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bench"] == "lora_matmul" and result["cpu_smoke"] is True
    assert {"device", "dtype", "rows", "summary"} <= result.keys()
    row = result["rows"][0]
    assert {"shape", "M", "K", "N", "r", "pass", "ms", "tflops", "vs_base", "max_rel_err"} <= row.keys()
    assert set(row["ms"]) == {"base", "peft", "addmm", "ours"}
    assert row["max_rel_err"] < 1e-4  # fp32 smoke run: ours agrees with the unfused path
