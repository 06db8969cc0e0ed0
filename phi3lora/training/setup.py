"""Device, dtype, tokenizer and model of a run: the frozen base with LoRA on the target modules."""
from __future__ import annotations

import contextlib

import torch

from phi3lora import lora
from phi3lora.phi3mini import Phi3, Tokenizer, hub

from .config import TrainingConfig
from .errors import TrainError
from .health import check_base


def resolve_device_dtype(t: TrainingConfig) -> tuple[torch.device, torch.dtype]:
    """--device and --dtype as chat and probe read them (phi3mini.hub.resolve); float16 is refused here: without
    loss scaling its small gradients round to zero, and the adapter stops learning without a word."""
    try:
        device, dtype = hub.resolve(t.device, t.dtype)
    except hub.LoadError as e:
        raise TrainError(str(e)) from None
    if dtype == torch.float16:
        raise TrainError("--dtype float16: training in float16 needs loss scaling, which train.py does not do; "
                         "use bfloat16 (or float32)")
    return device, dtype


def keep_freed_cpu_memory() -> None:
    """Let glibc keep large freed blocks for reuse instead of handing them back to the kernel.

    By default every block above the mmap threshold (a few MB, 32 MB at most) is a fresh mapping, returned on
    free: each step's large tensors (the logits alone are batch x length x 32064 floats) then come back as new
    pages the kernel has to fault in and zero again. On the 2-core CPU that was 60% of the tiny demo's time
    (32 s -> 13 s with this). The process keeps its peak footprint instead, which a training run reaches every
    step anyway. glibc only; elsewhere nothing changes."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def load_tokenizer(name: str) -> Tokenizer:
    try:
        return hub.open_tokenizer(name)
    except hub.LoadError as e:
        raise TrainError(str(e)) from None


def load_base(name: str, dtype: torch.dtype, device: torch.device, quantize: str = "") -> Phi3:
    """The frozen base model: "tiny", a local folder in the Hugging Face layout, or a Hub id (phi3mini.hub);
    quantize="nf4": its decoder projections 4-bit (QLoRA)."""
    try:
        return hub.open_model(name, device, dtype, quantize)
    except hub.LoadError as e:
        raise TrainError(str(e)) from None


def build_model(t: TrainingConfig, lora_config: lora.LoraConfig, device: torch.device, dtype: torch.dtype):
    """Base model + LoRA on the target modules, only LoRA trainable (in fp32) -> model, LoraConfig, trainable
    parameters. The adapter's random A comes from torch's global RNG: seed it first. A configuration dict
    (config.parse_config) becomes these two with config.typed."""
    model = load_base(t.model, dtype, device, t.quantize)
    check_base(model, t.model)  # a NaN here would later look like a learning-rate problem
    try:
        lora.inject(model, lora_config)
    except ValueError as e:
        raise TrainError(f"[lora] {e}") from None
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainError(f"[lora] target_modules {list(lora_config.target_modules)} matched no layer of the model")
    for p in params:  # the trained weights (and so the optimizer state) in fp32, whatever the base dtype
        p.data = p.data.float()
    model.gradient_checkpointing = t.grad_checkpointing
    if t.kernels == "on" or (t.kernels == "auto" and device.type == "cuda"):
        # the fused loss multiplies by lm_head.weight itself: it would skip (and never train) an lm_head adapter
        model.set_kernels(True, fused_ce=not isinstance(model.lm_head, lora.LoRALayer))
    if t.compile:
        for block in model.model.layers:
            block.compile()
    return model.train(), lora_config, params


def make_optimizer(t: TrainingConfig, params: list, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                             weight_decay=t.weight_decay, fused=device.type == "cuda")


def autocast(device: torch.device, dtype: torch.dtype):
    # bf16 autocast: matmuls in bf16, the fp32 LoRA weights stay fp32 for the optimizer
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
