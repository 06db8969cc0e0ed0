"""Numbers that must stay sane: the base weights at load, the LoRA weights after every update.

A NaN in a base weight would make every loss NaN and look like a learning-rate problem; a diverged adapter
(weights at 1e18 while the loss is still finite) would be saved in a checkpoint that poisons every resume."""
from __future__ import annotations

import torch

from .errors import TrainError

# Adam moves a weight by about lr per step, so even lr 1e-2 for 10,000 steps stays near 100: LoRA weights beyond
# this have diverged (at --lr 1e20 one step takes them to ~1e19; at --lr 1e6 to ~1e6).
LORA_WEIGHT_LIMIT = 1e4


def check_base(model: torch.nn.Module, model_name: str) -> None:
    """Every parameter and buffer of the base model finite, else a TrainError naming the first bad tensor."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise TrainError(f"--model {model_name}: the base weight {name} holds {bad} NaN/inf value(s) of "
                             f"{tensor.numel()}: the checkpoint is damaged (download or convert it again)")


def lora_weight_problem(named_params: list[tuple[str, torch.Tensor]]) -> str | None:
    """Why the trainable weights are unfit to save (non-finite, or beyond LORA_WEIGHT_LIMIT), or None."""
    if not named_params:
        return None
    with torch.no_grad():
        peaks = torch.stack([p.detach().abs().amax().float() for _, p in named_params]).cpu()
    worst = int(torch.nan_to_num(peaks, nan=float("inf")).argmax())
    peak = float(peaks[worst])
    name = named_params[worst][0]
    if not torch.isfinite(peaks).all():
        bad = next(n for (n, _), v in zip(named_params, peaks) if not torch.isfinite(v))
        return f"the LoRA weight {bad} is no longer finite"
    if peak > LORA_WEIGHT_LIMIT:
        return f"the LoRA weight {name} reached {peak:.3g} (diverged: beyond {LORA_WEIGHT_LIMIT:g})"
    return None
