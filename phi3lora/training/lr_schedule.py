"""The learning-rate schedule: the step count of a run, its warmup and the lr of each step.

Warmup: warmup_steps if > 0, else ceil(warmup_ratio x total steps); the lr rises linearly to lr over the warmup
steps, then decays (cosine or linear) towards min_lr."""
from __future__ import annotations

import math

from .config import TrainingConfig
from .data_order import EpochPlans


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float, schedule: str) -> float:
    """Learning rate of update number `step` (0-based): linear warmup to lr, then decay towards min_lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, total - warmup)  # 0 at the first decayed step, < 1 at the last
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr + (lr - min_lr) * (1.0 - progress)


def total_and_warmup(t: TrainingConfig, plans: EpochPlans) -> tuple[int, int]:
    """(optimizer steps of the run, warmup steps). A step never spans two epochs. max_steps > 0 is the count;
    else epochs over the data, and at least min_steps: the tiny preset's 6-chat demo (one step an epoch) needs 100
    steps, while 200 chats need their epochs, not 100 steps that see each example three times."""
    if t.max_steps > 0:
        total = t.max_steps
    else:
        total = sum(math.ceil(len(plans(e)) / t.grad_accum) for e in range(t.epochs))
        total = max(total, t.min_steps)
    warmup = t.warmup_steps if t.warmup_steps > 0 else math.ceil(t.warmup_ratio * total)
    return total, warmup
