"""training.distributed.wrap_fsdp in one process (a process group of 1): the sharding machinery of FSDP2 on our model
must not change a forward or a LoRA gradient, must shard every frozen base parameter and leave the adapter whole.

On the CPU (gloo) in CI; on CUDA (nccl, bf16, the Triton kernels on) in bench/gpu_check.py's gpu tests, which is
where FSDP2 meets the kernels. The 2-process runs (equal to one process, resume, Ctrl-C) are in
tests/test_distributed.py.
"""
import copy

import pytest
import torch
import torch.distributed as dist

from phi3lora import lora
from helpers import free_port, small_tiny
from phi3lora.training import distributed


@pytest.fixture
def group_of_one(request):
    backend = request.param
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def loss_and_lora_grads(model, ids, amp):
    with amp:
        loss = model(ids, labels=ids)
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach().float(), grads


@pytest.mark.parametrize("group_of_one, device", [
    pytest.param("gloo", "cpu", id="cpu"),
    pytest.param("nccl", "cuda", id="cuda", marks=pytest.mark.gpu),
], indirect=["group_of_one"])
def test_fsdp_of_one_process_computes_what_the_plain_model_does(group_of_one, device):
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = small_tiny().to(device=device, dtype=dtype)
    targets = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")
    lora.inject(model, lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
        torch.nn.init.normal_(p, std=0.05)  # B nonzero, so every LoRA gradient is
    model.gradient_checkpointing = True  # recomputation inside FSDP units, as train.py runs them
    if device == "cuda":
        model.set_kernels(True, fused_ce=False)
    model.train()
    plain = copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), device=device)
    amp = torch.autocast(device, dtype=dtype) if dtype != torch.float32 else torch.autocast(device, enabled=False)

    want_loss, want_grads = loss_and_lora_grads(plain, ids, amp)
    whole = distributed.base_bytes(model)
    distributed.wrap_fsdp(model, distributed.World(0, 1), torch.device(device), params)
    got_loss, got_grads = loss_and_lora_grads(model, ids, amp)

    sharded = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert sharded and all(type(p).__name__ == "DTensor" for p in model.parameters() if not p.requires_grad)
    assert all(type(p) is torch.nn.Parameter for p in params)  # the adapter: plain, whole, the optimizer's own
    assert distributed.base_bytes(model) == whole  # one process holds every shard
    tol = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(got_loss, want_loss, **tol)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **tol, msg=name)
