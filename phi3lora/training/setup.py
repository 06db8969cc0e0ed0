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


def make_optimizer(t: TrainingConfig, params: list, device: torch.device, model=None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; with loraplus_lr_ratio > 0 (and the model) in LoRA+'s groups."""
    groups = loraplus_groups(model, params) if t.loraplus_lr_ratio > 0 and model is not None else [{"params": params}]
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                  weight_decay=t.weight_decay, fused=device.type == "cuda")
    set_lr(optimizer, t.lr, t)
    return optimizer


# ----- LoRA+ (https://arxiv.org/abs/2402.12354) ----------------------------------------------------------------------
# The groups of peft's create_loraplus_optimizer (peft/optimizers/loraplus.py), in its order:
#   A           every other trainable parameter (lora_A, modules_to_save weights)  lr,                 decay
#   embedding   A and B of LoRA on an embedding                                     loraplus_lr_embedding, decay
#   B           lora_B, and 1-d parameters (a trained norm or bias)                 lr · ratio,          decay
#   B_no_decay  B's parameters named "bias" (peft: not in its decay list)           lr · ratio,          0
# peft's decay is its loraplus_weight_decay; here it is --weight-decay. Each group's "loraplus" key names its role:
# set_lr and group_settings read it, and it travels with the optimizer's state into checkpoints.
LORAPLUS_ROLES = ("A", "embedding", "B", "B_no_decay")


def loraplus_groups(model, params: list) -> list[dict]:
    """params (the trainable ones) in LoRA+'s four groups, by the rule of peft's create_loraplus_optimizer."""
    wanted = {id(p) for p in params}
    embeddings = {n for n, m in model.named_modules() if isinstance(m, lora.Embedding)}
    norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}  # transformers' no-decay types
    groups = {role: [] for role in LORAPLUS_ROLES}
    for name, p in model.named_parameters():
        if id(p) not in wanted:
            continue
        owner = name.rpartition(".")[0]
        if owner in embeddings and "lora_" in name.rpartition(".")[2]:
            role = "embedding"
        elif "lora_B" in name or p.ndim == 1:
            role = "B_no_decay" if "bias" in name or owner in norms else "B"
        else:
            role = "A"
        groups[role].append(p)
    return [{"params": groups[role], "loraplus": role} for role in LORAPLUS_ROLES]


def set_lr(optimizer: torch.optim.Optimizer, lr: float, t: TrainingConfig) -> None:
    """The schedule's learning rate at this step into every group: LoRA+'s B groups get lr · ratio, its embedding
    group loraplus_lr_embedding times the schedule's factor (lr / peak: as a LambdaLR scales each group's own
    initial lr)."""
    for group in optimizer.param_groups:
        role = group.get("loraplus", "A")
        if role.startswith("B"):
            group["lr"] = lr * t.loraplus_lr_ratio
        elif role == "embedding":
            group["lr"] = t.loraplus_lr_embedding * (lr / t.lr if t.lr else 0.0)
        else:
            group["lr"] = lr
        group["weight_decay"] = 0.0 if role == "B_no_decay" else t.weight_decay


# ----- NEFTune (https://arxiv.org/abs/2310.05914) --------------------------------------------------------------------
def neftune_hook(module, inputs, output: torch.Tensor) -> torch.Tensor:
    """transformers' neftune_post_forward_hook (integrations/neftune.py), the same operations in the same order, so
    one seeded RNG gives the same noise: embeddings (B, L, d) + uniform(-m, m) noise with m = alpha / sqrt(L·d), in
    training mode only (eval(), and so generate(), sees the embeddings as they are)."""
    if module.training:
        dims = torch.tensor(output.size(1) * output.size(2))
        mag_norm = module.neftune_noise_alpha / torch.sqrt(dims)
        output = output + torch.zeros_like(output).uniform_(-mag_norm, mag_norm)
    return output


def activate_neftune(model, alpha: float):
    """The NEFTune hook on the model's input embeddings (after their LoRA, if any); returns its handle, whose
    remove() (deactivate_neftune) takes it off again."""
    embeddings = model.model.embed_tokens
    embeddings.neftune_noise_alpha = alpha
    return embeddings.register_forward_hook(neftune_hook)


def deactivate_neftune(model, handle) -> None:
    handle.remove()
    embeddings = model.model.embed_tokens
    if hasattr(embeddings, "neftune_noise_alpha"):
        del embeddings.neftune_noise_alpha


def autocast(device: torch.device, dtype: torch.dtype):
    # bf16 autocast: matmuls in bf16, the fp32 LoRA weights stay fp32 for the optimizer
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
