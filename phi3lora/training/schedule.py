"""The learning-rate schedule and the order of the data: the step count, warmup and micro-batches of each epoch.

Warmup: warmup_steps if > 0, else ceil(warmup_ratio x total steps); the lr rises linearly to lr over the warmup
steps, then decays (cosine or linear) towards min_lr."""
from __future__ import annotations

import math

from phi3lora.data.pipeline import epoch_plan

from .config import TrainingConfig


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


class EpochPlans:
    """The micro-batches of each epoch (lists of example indices), a pure function of (seed, epoch); the two
    newest epochs are kept."""

    def __init__(self, examples: list, t: TrainingConfig):
        self.examples, self.t = examples, t
        self.plans: dict[int, list] = {}

    def __call__(self, epoch: int) -> list:
        if epoch not in self.plans:
            t = self.t
            self.plans[epoch] = epoch_plan(self.examples, t.batch_size, t.seed, epoch, t.packing, t.max_seq_len)
            self.plans.pop(epoch - 2, None)
        return self.plans[epoch]


def total_and_warmup(t: TrainingConfig, plans: EpochPlans) -> tuple[int, int]:
    """(optimizer steps of the run, warmup steps). A step never spans two epochs."""
    if t.max_steps > 0:
        total = t.max_steps
    else:
        total = sum(math.ceil(len(plans(e)) / t.grad_accum) for e in range(t.epochs))
    warmup = t.warmup_steps if t.warmup_steps > 0 else math.ceil(t.warmup_ratio * total)
    return total, warmup
