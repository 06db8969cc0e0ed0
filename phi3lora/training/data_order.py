"""The order of the data: the micro-batches of each epoch, a pure function of (seed, epoch), so a resumed run sees
the same batches in the same order."""
from __future__ import annotations

from phi3lora.data.pipeline import epoch_plan

from .config import TrainingConfig


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
