"""Several processes under torchrun: data parallel over the LoRA parameters, the frozen base whole in every
process (DDP) or sharded over them (FSDP2, --fsdp).

    torchrun --nproc_per_node N train.py ...          # N processes; gloo on CPU, nccl on CUDA, chosen here
    torchrun --nproc_per_node N train.py ... --fsdp   # the base sharded: each process holds 1/N of it

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them (plain `python train.py`) everything here is a no-op
for one process. Every rank builds the same seeded epoch plan with the global micro-batch (batch_size x world) and
takes its contiguous share of each one, so N ranks x batch b see exactly what one process sees with batch N x b.
Rank 0 alone writes files; `on_rank0` runs such a write there and hands its result (or its error) to every rank,
so a refusal on rank 0 is a clean error everywhere instead of a hang.
"""
from __future__ import annotations

import datetime
import gc
import inspect
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import TrainError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


SINGLE = World()


def from_env() -> World:
    """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), or one process when they are not set."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise TrainError(f"RANK / WORLD_SIZE / LOCAL_RANK from torchrun are not integers ({e})") from None
    if size < 1 or not 0 <= rank < size:
        raise TrainError(f"RANK {rank} / WORLD_SIZE {size}: not a valid process layout")
    return World(rank, size, local)


def device_for(world: World, device: torch.device) -> torch.device:
    """Each rank on its own GPU (LOCAL_RANK) when the run is on CUDA without an index."""
    if world.active and device.type == "cuda" and device.index is None:
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return device


def init(world: World, device: torch.device) -> None:
    """Join the process group: nccl for CUDA, gloo otherwise (the CPU tests and a CPU machine)."""
    if not world.active or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.size,
                            timeout=datetime.timedelta(minutes=30))


def teardown(finished: bool = False) -> None:
    """Leave the process group. finished (every rank got through the run): first free what still holds the
    group's work and tensors (FSDP's hooks and device mesh sit in reference cycles) and wait for the other ranks,
    so none tears down while another still talks. Not after an error: the other ranks may never arrive."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if finished:
        gc.collect()
        dist.barrier()
    dist.destroy_process_group()


def leave(status: int) -> None:
    """End a torchrun rank's process now, without the interpreter's finalization: gloo's worker threads can
    still hold work whose tensors need the GIL while the interpreter is torn down, and abort the process
    ("terminate called without an active exception", seen about once in 30 runs of the 2-process CPU tests,
    after the run had written everything; pytorch/pytorch#179291 describes the cause). Everything this program
    writes is closed by then; the standard streams are flushed here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def reduce_sum(world: World, values: list[float], device: torch.device) -> list[float]:
    """The sums over ranks of a few numbers (fp64, so token counts and loss sums stay exact)."""
    if not world.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(world: World, flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on one (a Ctrl-C seen by one rank stops them all at the same step)."""
    if not world.active:
        return flag
    return reduce_sum(world, [float(flag)], device)[0] > 0


def on_rank0(world: World, action, share: bool = False):
    """action() on rank 0 only, the other ranks waiting for it; a TrainError there is raised on every rank. Returns
    its result on rank 0, and on the others too with share (it must pickle), else None there."""
    if not world.active:
        return action()
    box, result = [None, None], None
    if world.is_main:
        try:
            result = action()
            box[0] = result if share else None
        except TrainError as e:
            box[1] = str(e)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise TrainError(box[1])
    return result if world.is_main else box[0]


def broadcast_params(world: World, params: list) -> None:
    """Rank 0's initial LoRA weights on every rank (they are equal when every rank seeded alike; this makes sure)."""
    if world.active:
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)


def wrap_ddp(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """DDP over the trainable parameters only (the frozen base has no gradients, so nothing of it is reduced).
    init_sync off: the base is loaded alike everywhere and broadcast_params syncs the adapter, so the multi-GB
    base is not broadcast at start; buffers (rotary tables) are computed, never broadcast."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    # newer torch names broadcast_buffers forward_sync_buffers (and warns on the old name)
    no_buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                  else {"broadcast_buffers": False})
    return DDP(model, device_ids=ids, init_sync=False, find_unused_parameters=False, **no_buffers)


def share(rows: list, world: World) -> list:
    """This rank's contiguous share of a global micro-batch's rows (the first ranks take one more when they do not
    divide evenly; a rank can get none in an epoch's last, short micro-batch)."""
    base, extra = divmod(len(rows), world.size)
    start = world.rank * base + min(world.rank, extra)
    return rows[start:start + base + (1 if world.rank < extra else 0)]


def first_on_rank0(world: World, action):
    """action() on rank 0, then (once it succeeded) on the other ranks: what may write a cache (tokenized data)
    does so once, and its error stops every rank cleanly."""
    if not world.active:
        return action()
    box = {}
    on_rank0(world, lambda: box.setdefault("result", action()) and None)
    return box["result"] if world.is_main else action()


# ----- FSDP2 ----------------------------------------------------------------------------------------------------------
def wrap_fsdp(model: torch.nn.Module, world: World, device: torch.device, trainable: list) -> torch.nn.Module:
    """FSDP2 in place: each decoder block one unit, then the root (embeddings, final norm, lm_head); every frozen
    base parameter is sharded over the ranks (dim 0) and gathered whole only while its unit computes.

    The LoRA parameters stay out (ignored_params): whole on every rank, their gradients averaged by
    average_gradients. They are < 1% of the model, so sharding them would save little, and this keeps one code path
    for everything that reads the adapter (saving it and its optimizer state, its norms, the checks of its weights)
    whatever the mode, and the bf16 base and the fp32 LoRA weights out of one all-gather. Returns model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world.size,))
    ignored = set(trainable)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    return model


def base_bytes(model: torch.nn.Module) -> int:
    """Bytes of the frozen parameters this process holds: all of them, or its shards once wrap_fsdp has run."""
    held = 0
    for p in model.parameters():
        if not p.requires_grad:
            local = p.to_local() if hasattr(p, "to_local") else p  # a DTensor: this rank's shard
            held += local.numel() * local.element_size()
    return held


def average_gradients(world: World, params: list) -> None:
    """The mean over ranks of each parameter's gradient, in one flat fp32 all-reduce (gloo has no AVG: sum, then
    divide). For the parameters FSDP leaves to us (wrap_fsdp), once per optimizer step: what DDP does on its own."""
    if not world.active or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n
