"""lora layers against pip's loralib 0.1.2: same init, same keys, same outputs and gradients, train and eval."""
import importlib
import math
from collections import OrderedDict

import loralib
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from phi3lora import lora

TOL = dict(atol=1e-6, rtol=1e-5)


def randomize(module, seed=0):
    """Every parameter random and non-zero (B included), so the low-rank path counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def pair(ref_cls, our_cls, *args, **kw):
    """The same layer from loralib and from lora, built from one seed; ours loads the reference's (randomized)
    state strictly, so names and shapes agree."""
    torch.manual_seed(0)
    ref = ref_cls(*args, **kw)
    torch.manual_seed(0)
    ours = our_cls(*args, **kw)
    # same constructor, same RNG draws: identical initial parameters (A Kaiming, B zeros / Embedding A 0, B normal)
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    assert list(our_state) == list(ref_state)
    for k in ref_state:
        assert torch.equal(our_state[k], ref_state[k]), k
    randomize(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def compare(ref, ours, x, dropout_seed=None):
    """Outputs, input gradients and LoRA gradients in train mode; outputs and merged weights in eval mode; the
    weights again after train() unmerges."""
    ref.train(), ours.train()
    for net in (ref, ours):
        net.zero_grad()
    outs, grads = [], []
    for net in (ref, ours):
        xi = x.clone().requires_grad_(x.is_floating_point())
        if dropout_seed is not None:
            torch.manual_seed(dropout_seed)
        y = net(xi)
        y.pow(2).sum().backward()
        outs.append(y.detach())
        grads.append({"x": xi.grad, "lora_A": net.lora_A.grad, "lora_B": net.lora_B.grad})
    torch.testing.assert_close(outs[1], outs[0], **TOL)
    for k, g in grads[0].items():
        if g is not None:
            assert g.abs().max() > 0, k  # the check below means something
            torch.testing.assert_close(grads[1][k], g, **TOL)
    # eval(): both merge ΔW into the weight
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ref.eval(), ours.eval()
    assert ref.merged and ours.merged
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), **TOL)
    weight = "conv.weight" if "conv.weight" in before else "weight"
    torch.testing.assert_close(ours.state_dict()[weight], ref.state_dict()[weight], **TOL)
    assert not torch.allclose(ours.state_dict()[weight], before[weight])
    ref.train(), ours.train()
    assert not ours.merged
    torch.testing.assert_close(ours.state_dict()[weight], before[weight], **TOL)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_loralib(fan_in_fan_out, bias):
    ref, ours = pair(loralib.Linear, lora.Linear, 12, 7, r=3, lora_alpha=5, fan_in_fan_out=fan_in_fan_out, bias=bias)
    compare(ref, ours, torch.randn(2, 5, 12))


def test_linear_with_dropout_matches_loralib():
    ref, ours = pair(loralib.Linear, lora.Linear, 12, 7, r=3, lora_alpha=5, lora_dropout=0.3)
    compare(ref, ours, torch.randn(4, 12), dropout_seed=11)


@pytest.mark.parametrize("enable_lora", [[True, True, True], [True, False, True], [False, True, False]])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merged_linear_matches_loralib(enable_lora, fan_in_fan_out):
    ref, ours = pair(loralib.MergedLinear, lora.MergedLinear, 10, 18, r=2, lora_alpha=3, enable_lora=enable_lora,
                     fan_in_fan_out=fan_in_fan_out, bias=True)
    compare(ref, ours, torch.randn(3, 4, 10))


def test_merged_linear_with_dropout_matches_loralib():
    ref, ours = pair(loralib.MergedLinear, lora.MergedLinear, 10, 18, r=2, lora_alpha=3, lora_dropout=0.4,
                     enable_lora=[True, False, True])
    compare(ref, ours, torch.randn(6, 10), dropout_seed=5)


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_matches_loralib(padding_idx):
    ref, ours = pair(loralib.Embedding, lora.Embedding, 20, 6, r=4, lora_alpha=2, padding_idx=padding_idx)
    compare(ref, ours, torch.randint(0, 20, (3, 7)))


@pytest.mark.parametrize("groups", [1, 2])
def test_conv2d_matches_loralib(groups):
    ref, ours = pair(loralib.Conv2d, lora.Conv2d, 4, 6, 3, r=2, lora_alpha=4, groups=groups, padding=1)
    compare(ref, ours, torch.randn(2, 4, 5, 5))


@pytest.mark.parametrize("cls, x", [(lora.Conv1d, torch.randn(2, 4, 9)), (lora.Conv3d, torch.randn(1, 4, 5, 5, 5))])
def test_conv1d_conv3d_work_for_kernel_size_above_one(cls, x):
    # loralib's Conv1d / Conv3d fail here (B·A cannot be viewed as the weight); ours size A to fit
    layer = cls(4, 6, 3, r=2, lora_alpha=4)
    randomize(layer)
    y = layer(x)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y.detach(), **TOL)
    base = layer.conv._conv_forward(x, layer.conv.weight - layer.delta_weight(), layer.conv.bias)
    assert not torch.allclose(base, y)


def module_tree(lib):
    return nn.Sequential(OrderedDict(
        emb=lib.Embedding(10, 8, r=2),
        lin=lib.Linear(8, 8, r=2, bias=True),
        merged=lib.MergedLinear(8, 12, r=2, enable_lora=[True, False, True], bias=True),
        plain=nn.Linear(12, 8, bias=True),
        nolora=lib.Linear(8, 4, r=0, bias=True),
        conv=lib.Conv2d(3, 4, 3, r=1),
        inner=nn.Sequential(OrderedDict(lin_nobias=lib.Linear(4, 4, r=1, bias=False), norm=nn.LayerNorm(4))),
    ))


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_trainable_sets_and_state_dict_keys_match_loralib(bias):
    ref, ours = module_tree(loralib), module_tree(lora)
    assert list(ours.state_dict()) == list(ref.state_dict())
    loralib.mark_only_lora_as_trainable(ref, bias=bias)
    lora.mark_only_lora_as_trainable(ours, bias=bias)
    ref_trainable = {n for n, p in ref.named_parameters() if p.requires_grad}
    our_trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert our_trainable == ref_trainable
    assert {"lin.lora_A", "merged.lora_B", "conv.lora_A"} <= our_trainable
    assert list(lora.lora_state_dict(ours, bias=bias)) == list(loralib.lora_state_dict(ref, bias=bias))
    with pytest.raises(ValueError, match="bias must be one of"):
        lora.mark_only_lora_as_trainable(ours, bias="some")


def test_readme_examples_run(tmp_path):
    # microsoft/LoRA README, with `import lora` instead of `import loralib as lora`
    d = 16
    layer = lora.Linear(d, d, r=16)
    qkv = lora.MergedLinear(d, 3 * d, r=8, enable_lora=[True, False, True])
    model = nn.Sequential(layer, nn.ReLU(), qkv)
    lora.mark_only_lora_as_trainable(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}
    with torch.no_grad():
        model[2].lora_B.normal_()
    torch.save(lora.lora_state_dict(model), tmp_path / "ckpt_lora.pt")
    fresh = nn.Sequential(lora.Linear(d, d, r=16), nn.ReLU(), lora.MergedLinear(d, 3 * d, r=8,
                                                                               enable_lora=[True, False, True]))
    fresh.load_state_dict(model.state_dict(), strict=True)  # the pretrained weights
    with torch.no_grad():
        fresh[2].lora_B.zero_()
    result = fresh.load_state_dict(torch.load(tmp_path / "ckpt_lora.pt", weights_only=True), strict=False)
    assert not result.unexpected_keys and all("lora_" not in k for k in result.missing_keys)
    x = torch.randn(3, d)
    torch.testing.assert_close(fresh(x), model(x))


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merged_linear_unequal_slices_against_hand_reference(fan_in_fan_out):
    # q, k, v of grouped-query attention: 8, 4, 4 rows; loralib cannot express this
    sizes, enable, r, alpha = [8, 4, 4], [True, False, True], 2, 6
    layer = lora.MergedLinear(5, 16, r=r, lora_alpha=alpha, enable_lora=enable, slice_sizes=sizes,
                              fan_in_fan_out=fan_in_fan_out, bias=True)
    randomize(layer)
    A, B, s = layer.lora_A.detach(), layer.lora_B.detach(), alpha / r
    assert A.shape == (2 * r, 5) and B.shape == (8 + 4, r)
    W = layer.weight.detach().clone()
    W = W.t() if fan_in_fan_out else W  # (out, in)
    delta = torch.zeros(16, 5)
    delta[0:8] = B[0:8] @ A[0:r]       # q: first enabled slice
    delta[12:16] = B[8:12] @ A[r:2 * r]  # v: second enabled slice; k (rows 8..12) has no adapter
    x = torch.randn(3, 5)
    expected = x @ (W + s * delta).t() + layer.bias.detach()
    torch.testing.assert_close(layer(x), expected, **TOL)
    assert layer.lora_ind.tolist() == [True] * 8 + [False] * 4 + [True] * 4
    assert "lora_ind" not in layer.state_dict()  # a non-persistent buffer: follows .to(), not saved
    layer.eval()
    stored = layer.weight.detach()
    torch.testing.assert_close(stored.t() if fan_in_fan_out else stored, W + s * delta, **TOL)
    torch.testing.assert_close(layer(x), expected, **TOL)


def test_merged_linear_slice_sizes_are_checked():
    with pytest.raises(ValueError, match="slice_sizes"):
        lora.MergedLinear(5, 16, r=2, enable_lora=[True, True, True], slice_sizes=[8, 4, 5])
    with pytest.raises(ValueError, match="must divide"):
        lora.MergedLinear(5, 16, r=2, enable_lora=[True, True, True])
    # no enabled slice: a plain linear layer (loralib fails in forward here)
    layer = lora.MergedLinear(5, 12, r=2, enable_lora=[False, False, False])
    x = torch.randn(2, 5)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("cls, args", [(lora.Linear, (6, 4)), (lora.MergedLinear, (6, 9)),
                                       (lora.Embedding, (10, 4)), (lora.Conv2d, (2, 3, 3))])
def test_rslora_scaling(cls, args):
    kw = dict(enable_lora=[True, True, True]) if cls is lora.MergedLinear else {}
    plain = cls(*args, r=4, lora_alpha=8, **kw)
    rs = cls(*args, r=4, lora_alpha=8, use_rslora=True, **kw)
    assert plain.scaling == 8 / 4 and rs.scaling == 8 / math.sqrt(4)
    randomize(plain)
    rs.load_state_dict(plain.state_dict())
    torch.testing.assert_close(rs.delta_weight(), plain.delta_weight() * (4 / math.sqrt(4)), **TOL)


def test_rslora_forward():
    layer = lora.Linear(6, 4, r=9, lora_alpha=6, use_rslora=True)
    randomize(layer)
    x = torch.randn(5, 6)
    A, B, W, b = (t.detach() for t in (layer.lora_A, layer.lora_B, layer.weight, layer.bias))
    torch.testing.assert_close(layer(x), x @ W.t() + b + (6 / 3) * (x @ A.t() @ B.t()), **TOL)


@pytest.mark.parametrize("cls, args", [(lora.Linear, (64, 48)), (lora.MergedLinear, (64, 48))])
def test_merge_of_bf16_weight_is_fp32_sum_rounded_once(cls, args):
    kw = dict(enable_lora=[True, False, True]) if cls is lora.MergedLinear else {}
    layer = cls(*args, r=8, lora_alpha=16, dtype=torch.bfloat16, **kw)
    randomize(layer)
    with torch.no_grad():
        layer.lora_B.mul_(0.1)  # ΔW small next to W: where bf16 rounding order matters
    W0 = layer.weight.detach().clone()
    delta = layer.delta_weight()
    assert delta.dtype == torch.float32
    if cls is lora.Linear:
        torch.testing.assert_close(delta, (layer.lora_B.float() @ layer.lora_A.float()) * 2.0, **TOL)
    expected = (W0.float() + delta).to(torch.bfloat16)
    layer.merge()
    assert torch.equal(layer.weight, expected)
    # merging in bf16 (loralib's way) gives other bits: the fp32 path is what the test pins down
    naive = W0 + (layer.lora_B @ layer.lora_A if cls is lora.Linear else layer.merge_AB()) * layer.scaling
    assert not torch.equal(naive, expected)
    layer.merge()  # merging twice is a no-op
    assert torch.equal(layer.weight, expected)
    layer.unmerge()
    assert torch.equal(layer.weight, (expected.float() - delta).to(torch.bfloat16))


@pytest.mark.parametrize("cls, args", [(lora.Linear, (8, 6)), (lora.MergedLinear, (8, 6))])
def test_dropout_only_on_low_rank_path(cls, args):
    kw = dict(enable_lora=[True, True]) if cls is lora.MergedLinear else {}
    layer = cls(*args, r=2, lora_alpha=2, lora_dropout=0.5, **kw)
    randomize(layer)
    x = torch.randn(32, 8)
    W, b = layer.weight.detach(), layer.bias.detach()
    full_B = layer.lora_B.detach()
    if cls is lora.MergedLinear:
        full_B = torch.block_diag(full_B[:3], full_B[3:])  # (6, 4): each half's B on its own rows
    base = F.linear(x, W, b)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(y, base + (dropped @ layer.lora_A.detach().t() @ full_B.t()), **TOL)
    # had dropout touched the base path, y would be far from this (half the inputs zeroed, the rest doubled)
    assert not torch.allclose(y, F.linear(dropped, W, b) + (dropped @ layer.lora_A.detach().t() @ full_B.t()),
                              atol=1e-2)
    # with B = 0 the output is exactly the base layer's, whatever the mask
    with torch.no_grad():
        layer.lora_B.zero_()
    assert torch.equal(layer(x), base)
    # eval: no dropout
    randomize(layer)
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))


def test_lora_params_follow_input_dtype_and_buffers_follow_to():
    layer = lora.MergedLinear(8, 12, r=2, enable_lora=[True, False, True])
    randomize(layer)
    layer.weight.data, layer.bias.data = layer.weight.data.bfloat16(), layer.bias.data.bfloat16()
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    y = layer(x)  # fp32 A, B with a bf16 weight and input, no autocast: A and B are cast to bf16
    assert y.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    moved = layer.to("meta")  # lora_ind is a buffer: it moves with the module (loralib's plain tensor stays)
    assert moved.lora_ind.device.type == "meta" and moved.lora_ind.dtype == torch.bool


def test_kernel_route_matches_torch_route(monkeypatch):
    """Linear / MergedLinear through kernels.lora_linear (the CUDA route; here Triton's interpreter on the CPU)
    against the plain torch route: outputs and gradients, with dropout and fan_in_fan_out."""
    kernel_module = importlib.import_module("phi3lora.kernels.lora_matmul")
    if not (torch.cuda.is_available() or kernel_module.INTERPRET) or not kernel_module.HAS_TRITON:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layers = [lora.Linear(20, 33, r=3, lora_alpha=6, lora_dropout=0.2, fan_in_fan_out=True),
              lora.MergedLinear(20, 40, r=2, lora_alpha=5, lora_dropout=0.2, enable_lora=[True, False, True],
                                slice_sizes=[20, 10, 10])]
    for layer in layers:
        layer.to(device)
        randomize(layer)
        x = torch.randn(2, 9, 20, device=device)
        results = []
        for route in (True, False):
            monkeypatch.setattr(lora.layers, "_use_triton", lambda x, w: route)
            layer.zero_grad()
            xi = x.clone().requires_grad_()
            torch.manual_seed(3)
            y = layer(xi)
            y.pow(2).sum().backward()
            results.append((y.detach(), xi.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [lora.Linear, lora.MergedLinear])
def test_cuda_triton_path_matches_torch_path(cls):
    kw = dict(enable_lora=[True, False, True], slice_sizes=[96, 48, 48]) if cls is lora.MergedLinear else {}
    layer = cls(80, 192, r=8, lora_alpha=16, **kw).cuda()
    randomize(layer)
    x = torch.randn(3, 37, 80, device="cuda")
    results = []
    for use in (True, False):
        layer.use_kernel = use
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.pow(2).sum().backward()
        results.append((y.detach(), xi.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
    for fused, ref in zip(*results):
        torch.testing.assert_close(fused, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [lora.Linear, lora.MergedLinear])
def test_cuda_route_honours_a_trained_weight_and_autocast(cls):
    # the fused kernel gives the weight no gradient and computes in x's dtype: a layer whose weight is trained,
    # or an fp32 layer under bf16 autocast, must take the torch route and behave as it does on the CPU
    kw = dict(enable_lora=[True, False, True], slice_sizes=[96, 48, 48]) if cls is lora.MergedLinear else {}
    layer = cls(80, 192, r=8, lora_alpha=16, **kw).cuda()
    randomize(layer)
    x = torch.randn(3, 37, 80, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    layer.weight.requires_grad_(True)
    grads = []
    for use in (True, False):
        layer.use_kernel = use
        layer.zero_grad(set_to_none=True)
        layer(x).pow(2).sum().backward()
        assert layer.weight.grad is not None
        grads.append(layer.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)
