"""Preference tuning: DPO and ORPO on the LoRA adapter, the reference policy being the same network.

DPO (https://arxiv.org/abs/2305.18290), TRL's default "sigmoid" loss with label smoothing (conservative DPO,
https://ericmitchell.ai/cdpo.pdf), per pair, on log-probs summed over the response tokens:
    d = (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))
    loss = -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)
    rewards/chosen = beta (log pi(y_c|x) - log ref(y_c|x)), rewards/rejected alike
With label_smoothing 0 this is TRL's DPOTrainer loss_type="sigmoid" exactly. The reference is the model as the run
started: the base with the adapter switched off (lora.adapter_disabled), or, after --init-adapter, that adapter's
weights swapped in (a copy of the LoRA tensors, not of the model). Reference log-probs are computed in each step under
no_grad (ref_logps "step"), or once before training (ref_logps "precompute", kept in the output folder).

ORPO (https://arxiv.org/abs/2403.07691), as TRL's ORPOTrainer on log-probs averaged over the response tokens:
    log_odds = (lc - lr) - (log(1 - exp(lc)) - log(1 - exp(lr)))
    loss = NLL(chosen response) - beta log sigmoid(log_odds);  rewards = beta * average log-probs
One deviation: TRL's ORPOTrainer takes the NLL over the chosen sequence's prompt tokens too; here, as in the paper
and in SFT, over the response only.

Token-exact accumulation, as for SFT: a step's loss is the sum over its micro-batches of (per-pair terms / pairs
of the whole step) and, for ORPO's NLL, (summed token loss / chosen target tokens of the whole step).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from phi3lora.lora.footprint import adapter_disabled
from phi3lora.phi3mini.tokenizer import IGNORE

STATS = ("loss", "chosen_rewards", "rejected_rewards", "correct", "margins", "chosen_logps", "rejected_logps",
         "nll", "log_odds")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0):
    """Per-pair DPO losses (N,) and rewards (chosen, rejected), from summed response log-probs (N,) each."""
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    d = chosen_logratios - rejected_logratios
    losses = -F.logsigmoid(beta * d) * (1 - label_smoothing) - F.logsigmoid(-beta * d) * label_smoothing
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (https://cran.r-project.org/package=Rmpfr, log1mexp)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(policy_chosen_avg: torch.Tensor, policy_rejected_avg: torch.Tensor, beta: float = 0.1):
    """Per-pair odds-ratio terms (N,) to add to the NLL (-beta log sigmoid(log_odds)), rewards (chosen, rejected)
    and the log odds, from response log-probs averaged per token (N,) each."""
    c, r = policy_chosen_avg.float(), policy_rejected_avg.float()
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    return -beta * F.logsigmoid(log_odds), beta * c.detach(), beta * r.detach(), log_odds.detach()


@dataclass
class Objective:
    """What a preference step needs to know: the loss and its settings, and how to get the reference."""
    kind: str  # "dpo" or "orpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference: "Reference | None" = None  # DPO only
    cached: torch.Tensor | None = None  # (pairs, 2) precomputed reference log-probs of the training set


class Reference:
    """The reference policy inside the trained model: with no start adapter the adapter switched off, else the
    start adapter's tensors swapped in for the forward (they are a few MB; the base is shared)."""

    def __init__(self, model: torch.nn.Module, params: list, start: list[torch.Tensor] | None = None):
        self.model, self.params, self.start = model, params, start

    @contextlib.contextmanager
    def active(self):
        if self.start is None:
            with adapter_disabled(self.model):
                yield
            return
        saved = [p.data for p in self.params]
        try:
            for p, s in zip(self.params, self.start):
                p.data = s
            yield
        finally:
            for p, s in zip(self.params, saved):
                p.data = s

    @torch.no_grad()
    def logps(self, batch, amp) -> torch.Tensor:
        """(2n,) summed response log-probs of the batch's sequences under the reference."""
        with self.active(), amp:
            return -self.model(**batch.model_kwargs(), loss_reduction="row").float()


def targets_per_row(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, 1:] != IGNORE).sum(1)  # (B,): position 0 is never a target


def pair_terms(model, batch, objective: Objective, amp, ref: torch.Tensor | None = None):
    """Forward of one preference batch (chosen rows, then rejected rows) -> the per-pair terms (N,), the summed NLL
    of the chosen responses (ORPO; 0 for DPO) and the per-pair statistics."""
    with amp:
        nll = model(**batch.model_kwargs(), loss_reduction="row").float()  # (2N,)
    logps = -nll
    n = logps.shape[0] // 2
    if objective.kind == "dpo":
        losses, rc, rr = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], objective.beta, objective.label_smoothing)
        nll_sum, log_odds = logps.new_zeros(()), None
    else:
        avg = logps / targets_per_row(batch.labels).clamp(min=1)
        losses, rc, rr, log_odds = orpo_loss(avg[:n], avg[n:], objective.beta)
        nll_sum = nll[:n].sum()
    stats = {"chosen_rewards": rc.sum(), "rejected_rewards": rr.sum(), "correct": (rc > rr).float().sum(),
             "margins": (rc - rr).sum(), "chosen_logps": logps[:n].detach().sum(),
             "rejected_logps": logps[n:].detach().sum(), "nll": nll_sum.detach(),
             "log_odds": log_odds.sum() if log_odds is not None else logps.new_zeros(())}
    return losses, nll_sum, stats


def chosen_targets(batch) -> int:
    n = batch.input_ids.shape[0] // 2
    return int(targets_per_row(batch.labels[:n]).sum())


def summarize(sums: dict, n_pairs: int, n_chosen_target: int, kind: str) -> dict:
    """Summed statistics of a step (or an evaluation) -> TRL's metric names, means over pairs."""
    rec = {"rewards/chosen": sums["chosen_rewards"] / n_pairs, "rewards/rejected": sums["rejected_rewards"] / n_pairs,
           "rewards/accuracies": sums["correct"] / n_pairs, "rewards/margins": sums["margins"] / n_pairs,
           "logps/chosen": sums["chosen_logps"] / n_pairs, "logps/rejected": sums["rejected_logps"] / n_pairs}
    if kind == "orpo":
        rec["nll_loss"] = sums["nll"] / max(n_chosen_target, 1)
        rec["log_odds_chosen"] = sums["log_odds"] / n_pairs
    return rec
