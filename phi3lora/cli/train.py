"""Fine-tune Phi-3 with LoRA on a chat dataset.

    python train.py --config configs/tiny.toml                       # the CPU demo: tiny model, sample data
    python train.py --config configs/phi3-mini-lora.toml --data chats.jsonl --out out/mine
    python train.py --resume out/mine      # continue out/mine with its own settings (its config.toml)

A run, in the order train() below does it: prepare the output folder, load the data, build the model, resume (or
start), the loop, save the outputs. The options are the fields of training/config.py (every key of the [training]
and [lora] sections of a TOML config is also a flag: --max-steps, --lora-r, ...); the pieces live in training/:
setup.py (device, model), lr_schedule.py, data_order.py, checkpoints.py, metrics.py (progress line, metrics.jsonl,
loss.svg); tracking.py (sample replies, adapter norms, TensorBoard / wandb).

The loss of an optimizer step is the summed cross-entropy of all its micro-batches divided by the number of target
tokens of the whole accumulated batch, so batch 8 x accumulation 1 and batch 1 x accumulation 8 give the same
gradients.

Output folder: config.toml (the resolved configuration), metrics.jsonl (one line per step; at each evaluation also
the adapter's norm per module), samples.jsonl (greedy replies to eval prompts at each evaluation), loss.svg,
tensorboard/ (--report-to tensorboard),
checkpoints/step-NNNNNNN/ (adapter, optimizer, RNG and data position; written to a .tmp folder and renamed, the
last keep_last kept), adapter/ (the final adapter, lora.save_adapter format), adapter-peft/ (--export-peft),
merged/ (--merge: base + adapter in the Hugging Face layout, tokenizer beside it).

Exit codes: 0 done; 2 a problem with the input or configuration, or a NaN/inf loss, printed as "error: ..."
(a NaN stops before the bad update, so the last checkpoint is the last good state); 130 interrupted by Ctrl-C:
the first Ctrl-C finishes the current step, saves a checkpoint and exits (continue with --resume), a second one
stops at once (still saving the last completed step when that is safe); 143 stopped by SIGTERM (a scheduler, a
spot instance, torchrun's agent): the step in flight is abandoned, the last completed one saved, and the run
continues exactly with --resume.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from phi3lora import lora
from phi3lora.lora.inject import saved_modules
from phi3lora.lora.adapter_files import base_fingerprint
from phi3lora.phi3mini import Tokenizer
from phi3lora.phi3mini.attention import attention_backend_and_why
from phi3lora import atomic, console
from phi3lora import data
from phi3lora.data import DataError, TokenSet, collate, fingerprint
from phi3lora.data.preference import PreferenceSet, collate_pairs, load_preferences
from phi3lora.training.tracking import (ExperimentTracker, TrackerError, adapter_norm_metrics, check_backend,
                                        greedy_samples, sample_prompts)
from phi3lora.training import config, distributed, preference
from phi3lora.training.checkpoints import (CheckpointWriteError, clean_leftovers, delete_checkpoint, is_write_error,
                                           load_checkpoint, newest_complete, read_trainer_state, rng_state,
                                           save_checkpoint, step_dirs)
from phi3lora.training.config import TrainingConfig, parse_config
from phi3lora.training.distributed import World
from phi3lora.training.errors import TrainError
from phi3lora.training.health import lora_weight_problem
from phi3lora.training.data_order import EpochPlans
from phi3lora.training.lr_schedule import lr_at, total_and_warmup
from phi3lora.training.metrics import MetricsLog, Progress, memory_gb, read_metrics, write_loss_svg
from phi3lora.training.setup import (activate_neftune, autocast, build_model, deactivate_neftune, keep_freed_cpu_memory,
                                     load_tokenizer, make_optimizer, set_lr,
                                     resolve_device_dtype)

# what an earlier run leaves in --out: a new run there needs --resume or --overwrite
EARLIER_RUN = ("checkpoints", "adapter", "adapter-peft", "merged", "metrics.jsonl", "config.toml", "loss.svg",
               "samples.jsonl", "tensorboard")
# --overwrite deletes these at the start
REPLACED_BY_A_NEW_RUN = ("adapter", "adapter-peft", "merged", "loss.svg", "samples.jsonl", "tensorboard",
                         "reference_logps.pt", "eval.json")
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}


@dataclass
class Run:
    """What the loop reads: set up once, never changed by it."""
    cfg: dict  # the resolved configuration, as written to config.toml and into each checkpoint
    t: TrainingConfig
    out: Path
    device: torch.device
    dtype: torch.dtype
    tokenizer: Tokenizer
    train_set: list
    eval_set: list
    data_hash: str
    model: torch.nn.Module
    lora_config: lora.LoraConfig
    params: list  # the trainable (LoRA) parameters
    optimizer: torch.optim.Optimizer
    plans: EpochPlans
    total_steps: int
    warmup: int
    sample_prompts: list = field(default_factory=list)  # eval prompts replied to at each evaluation
    world: World = distributed.SINGLE  # torchrun's processes; plans(epoch) holds the global micro-batches
    engine: torch.nn.Module | None = None  # what the training forward runs: DDP(model) under torchrun, else model
    sharded: bool = False  # --fsdp under torchrun: the base is sharded (FSDP2), every forward a collective
    fingerprint: dict | None = None  # the base's, for the adapters written (taken before sharding it)
    objective: preference.Objective | None = None  # --objective dpo / orpo: train_set and eval_set hold pairs

    def __post_init__(self):
        self.engine = self.engine or self.model


@dataclass
class Position:
    """Where the run is: updates done, the data position (epoch, next micro-batch in it), the RNG states as the
    last update left them (what a checkpoint of that update must hold, even when an interruption comes in the
    middle of the next step: LoRA dropout has drawn from them by then), the newest checkpoint written."""
    step: int = 0
    epoch: int = 0
    index: int = 0
    rng: dict | None = None
    last_saved: Path | None = None
    updating: bool = False  # inside optimizer.step(): the adapter may be half updated
    zero_grad_steps: int = 0  # steps whose gradient norm was exactly 0 (the adapter learned nothing)


def main(argv=None) -> int:
    notes: list[str] = []  # said once the run is under way (an error in the input comes first, alone)
    try:
        return train(parse_config(argv, notes), notes)
    except TrainError as e:
        console.error(str(e))
        return 2
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        console.error(f"cannot write {e.filename or 'to the output folder'}: {e.strerror}; free some space, then "
                      "continue with --resume")
        return 2
    except KeyboardInterrupt:  # outside the loop: while loading (nothing to save yet) or while writing the final
        # adapter (the last step's checkpoint is complete: --resume writes the adapter again)
        console.info("\ninterrupted")
        return 130


def train(cfg: dict, notes: list[str] = ()) -> int:
    """One process, or one rank of a torchrun run (training/distributed.py): the process group lives as long as
    the run, and is left on every way out (an error on one rank: torchrun then stops the others)."""
    world = distributed.from_env()
    t, _ = config.typed(cfg)
    if t.objective != "sft" and t.neftune_noise_alpha > 0:  # the reference pass would see the noise too
        raise TrainError(f"--neftune-noise-alpha is for --objective sft (not {t.objective})")
    if t.objective != "sft" and t.packing:  # both sides of a pair share a batch, one sequence per row
        cfg["training"]["packing"] = False
        notes = [*notes, f"--objective {t.objective} implies --no-packing"]
    try:  # a missing tensorboard / wandb, before minutes of loading
        check_backend(t.report_to)
    except TrackerError as e:
        raise TrainError(str(e)) from None
    device, dtype = resolve_device_dtype(t)
    device = distributed.device_for(world, device)
    console.set_quiet(not world.is_main)
    distributed.init(world, device)
    finished = False
    try:
        status = train_on(cfg, world, device, dtype, notes)
        finished = status == 0
        return status
    finally:
        distributed.teardown(finished)


def train_on(cfg: dict, world: World, device: torch.device, dtype: torch.dtype, notes=()) -> int:
    t, lc = config.typed(cfg)
    if device.type == "cpu" and sys.platform == "linux":
        keep_freed_cpu_memory()
    out = Path(t.out)
    resume_from = distributed.on_rank0(world, lambda: prepare_out(out, t), share=True)
    tokenizer = load_tokenizer(t.model)
    read = load_pairs if t.objective != "sft" else load_data
    train_set, eval_set = distributed.first_on_rank0(world, lambda: read(t, tokenizer))
    for note in notes:
        console.info(note)

    torch.manual_seed(t.seed)  # the adapter's initial A, then dropout
    random.seed(t.seed)
    model, lora_config, params = build_model(t, lc, device, dtype)
    params, start = load_init_adapter(t, model, params) if t.init_adapter else (params, None)
    n_train, n_all = sum(p.numel() for p in params), model.num_parameters()  # a 4-bit weight counts its values
    console.info(f"model {t.model} on {device} ({str(dtype).removeprefix('torch.')}): trainable {n_train:,} of "
                 f"{n_all:,} parameters ({100 * n_train / n_all:.3f}%)")
    c = model.config
    window = c.sliding_window is not None and t.max_seq_len > c.sliding_window
    if t.packing or window:  # packed rows (and rows past the window) attend per document: say how, once
        backend, why = attention_backend_and_why(device, dtype, c.num_attention_heads, c.num_key_value_heads,
                                                 c.head_dim)
        console.info(f"attention for {'packed rows' if t.packing else 'rows past the sliding window'}: {why}")
    if world.active:
        distributed.broadcast_params(world, params)
        torch.manual_seed(t.seed + world.rank)  # each rank its own dropout masks (rank 0: as one process)
    elif t.fsdp:
        console.info("note: --fsdp shards the base over torchrun's processes; in one process it changes nothing")
    # every rank plans the global micro-batches (batch_size x world) and takes its share of each
    plans = EpochPlans(train_set, dataclasses.replace(t, batch_size=t.batch_size * world.size))
    total_steps, warmup = total_and_warmup(t, plans)
    pairs = isinstance(train_set, PreferenceSet)
    run = Run(cfg, t, out, device, dtype, tokenizer, train_set, eval_set,
              train_set.fingerprint() if pairs else fingerprint(train_set), model, lora_config, params,
              make_optimizer(t, params, device, model), plans, total_steps, warmup,
              sample_prompts([p.chosen for p in eval_set] if pairs else eval_set, tokenizer, t.eval_samples), world)
    if pairs:
        run.objective = preference.Objective(t.objective, t.beta, t.label_smoothing)
        if t.objective == "dpo":
            run.objective.reference = preference.Reference(model, params, start)
    describe_schedule(run)

    pos, records = resume(run, resume_from) if resume_from else start_afresh(run)
    if run.objective is not None and run.objective.reference is not None and t.ref_logps == "precompute":
        run.objective.cached = precomputed_reference(run)
    if world.active:  # after resume: loading the adapter reads the base (its fingerprint), whole only until now
        parallelize(run)
    metrics = distributed.on_rank0(world, lambda: open_metrics(run, records))
    tracker = None
    if world.is_main:
        tracker = ExperimentTracker(out, t.report_to, config=cfg, resume_step=pos.step if resume_from else None,
                                    echo=console.info)
    # NEFTune: noise on the input embeddings in training mode only; evaluation and sample replies run in eval()
    neftune = activate_neftune(model, t.neftune_noise_alpha) if t.neftune_noise_alpha > 0 else None
    try:
        status = loop(run, pos, metrics, tracker)
    finally:
        if neftune is not None:  # off before anything is written or merged
            deactivate_neftune(model, neftune)
        if metrics is not None:
            close_metrics(run, metrics, tracker)
    if status == 0:
        distributed.on_rank0(world, lambda: save_outputs(run, pos.last_saved))
        if t.eval_at_end:
            distributed.on_rank0(world, lambda: eval_at_end(run))
    return status


def parallelize(run: Run) -> None:
    """DDP over the adapter (the base whole in every process), or with --fsdp FSDP2 sharding the base
    (training/distributed.py); the adapter is whole on every rank either way."""
    if not run.t.fsdp:
        run.engine = distributed.wrap_ddp(run.model, run.world, run.device)
        return
    run.fingerprint = base_fingerprint(run.model)
    whole = distributed.base_bytes(run.model)
    distributed.wrap_fsdp(run.model, run.world, run.device, run.params)
    run.sharded = True
    console.info(f"FSDP2: the base sharded over {run.world.size} processes, one unit per decoder block: this one "
                 f"holds {distributed.base_bytes(run.model) / 2**20:,.1f} MiB of its {whole / 2**20:,.1f} MiB; the "
                 "adapter whole in each")


def open_metrics(run: Run, records: list[dict]) -> MetricsLog:
    """config.toml, then metrics.jsonl opened with the records kept from before a resume (rank 0 only)."""
    out = run.out
    # resume/overwrite describe this invocation, not the run: the file, reused with --config, starts a new run
    resolved = {**run.cfg, "training": {**run.cfg["training"], "resume": False, "overwrite": False}}
    try:
        atomic.write_file(out / "config.toml", config.to_toml(resolved))  # whole or not at all, never 0 bytes
    except OSError as e:
        raise TrainError(f"cannot write {out / 'config.toml'} ({e.strerror}): free some space first") from None
    return MetricsLog(out / "metrics.jsonl", records)


def close_metrics(run: Run, metrics: MetricsLog, tracker: ExperimentTracker) -> None:
    metrics.close()
    tracker.close()
    try:
        write_loss_svg(metrics.records, run.out / "loss.svg", f"Loss per step: {run.out.name}")
    except OSError as e:  # never hides why the loop ended
        console.warn(f"could not write {run.out / 'loss.svg'} ({e.strerror})")


# ----- the loop -----------------------------------------------------------------------------------------------------
def loop(run: Run, pos: Position, metrics: MetricsLog | None, tracker: ExperimentTracker | None) -> int:
    """Optimizer steps from pos to the end of the run, with evaluation, metrics and checkpoints on their schedule
    (metrics and tracker: None on the ranks other than 0, which write nothing). Returns 0, or 130 after Ctrl-C
    and 143 after SIGTERM (the last completed step saved when that is safe)."""
    t, world = run.t, run.world
    progress = Progress(run.total_steps, t.log_every)
    start_step = pos.step
    together = False  # a stop every rank agreed on (they may all still talk), not a signal in the middle of a step
    stop = StopOnCtrlC()
    try:
        with stop:
            if run.eval_set and pos.step == 0:
                rec = {"step": 0, **eval_metrics(run)}
                report_eval(run, rec, tracker)
                if metrics is not None:  # rank 0
                    metrics.write(rec)
                    tracker.log(rec)
                console.info(f"eval loss before training {rec['eval_loss']:.4f}" + preference_note(rec, "eval_"))
            while pos.step < run.total_steps:
                if distributed.any_rank(world, stop.requested, run.device):
                    together = True
                    raise KeyboardInterrupt
                rec = train_step(run, pos)
                if run.eval_set and (due(t.eval_every, pos.step) or pos.step == run.total_steps):
                    rec.update(eval_metrics(run))
                    report_eval(run, rec, tracker)
                if metrics is not None:
                    metrics.write(rec)
                    tracker.log(rec)
                    progress.update(pos.step, rec, pos.step - start_step)
                if due(t.save_every, pos.step) or pos.step == run.total_steps:
                    pos.last_saved = save(run, pos)
    except KeyboardInterrupt:
        run.optimizer.zero_grad(set_to_none=True)
        if pos.updating:
            console.info(f"interrupted during an update: not saving; the last checkpoint is {pos.last_saved or 'none'}")
        elif pos.step > start_step or pos.last_saved is None:
            # a signal mid-step under torchrun: the other ranks may be anywhere, so rank 0 saves on its own
            pos.last_saved = save(run, pos, alone=world.active and not together)
        console.info(f"interrupted at step {pos.step}; continue with --resume {run.out} (checkpoint "
                     f"{pos.last_saved})")
        return stop.exit_code
    if run.objective is not None and metrics is not None and metrics.records:
        last = metrics.records[-1]
        console.info(f"{run.t.objective} at step {last['step']}" + preference_note(last, "")
                     + preference_note(last, "eval_"))
    if pos.zero_grad_steps:
        console.warn(f"{pos.zero_grad_steps} of {pos.step - start_step} steps had gradient norm 0: the adapter "
                     f"learned nothing in them")
    return 0


def train_step(run: Run, pos: Position) -> dict:
    """One optimizer step over grad_accum micro-batches; advances pos and returns the step's metrics record.
    Under torchrun each rank runs its share of every micro-batch; the gradients are averaged over the ranks on the
    last micro-batch only (no_sync before it), and the loss is the sum over all ranks / all target tokens."""
    t, t0 = run.t, time.perf_counter()
    epoch, index = pos.epoch, pos.index
    if index >= len(run.plans(epoch)):
        epoch, index = epoch + 1, 0
    micro = run.plans(epoch)[index:index + t.grad_accum]
    examples = [run.train_set[i] for rows in micro for row in rows for i in row]
    lr = lr_at(pos.step, run.total_steps, run.warmup, t.lr, t.min_lr, t.schedule)
    set_lr(run.optimizer, lr, t)  # LoRA+'s groups each at their multiple of it
    extra = {}
    if run.objective is not None:  # examples are pairs: the loss is a mean over pairs (and chosen tokens: ORPO)
        n_target = sum(p.chosen.n_target for p in examples)
        n_tokens = sum(len(p.chosen) + len(p.rejected) for p in examples)
        loss, sums = accumulate_pairs(run, micro, len(examples), n_target)
        extra = preference.summarize(sums, len(examples), n_target, run.objective.kind)
    else:
        n_target, n_tokens = sum(e.n_target for e in examples), sum(len(e) for e in examples)  # of every rank
        loss = distributed.reduce_sum(run.world, [accumulate(run, micro, n_target)], run.device)[0] / n_target
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, t.max_grad_norm or math.inf))  # 0: no clipping
    if not math.isfinite(loss) or not math.isfinite(grad_norm):
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm} (loss {loss:.4f})"
        raise TrainError(f"{what} at step {pos.step + 1}: stopped before updating the adapter. Last good "
                         f"checkpoint: {pos.last_saved or 'none yet'}. Try a lower --lr, --dtype fp32, or "
                         f"check the data.")
    pos.updating = True
    run.optimizer.step()
    rng = rng_state()
    # one statement, so a second Ctrl-C cannot land between the counters and the RNG state they go with
    pos.step, pos.epoch, pos.index, pos.rng, pos.updating = pos.step + 1, epoch, index + len(micro), rng, False
    run.optimizer.zero_grad(set_to_none=True)
    check_progress(run, pos, loss, grad_norm)
    return {"step": pos.step, "epoch": round(epoch + pos.index / len(run.plans(epoch)), 4), "loss": loss,
            "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens, "target_tokens": n_target,
            "tokens_per_s": n_tokens / (time.perf_counter() - t0), "mem_gb": round(memory_gb(run.device), 3),
            **extra}


def check_progress(run: Run, pos: Position, loss: float, grad_norm: float) -> None:
    """Stop when the update left the adapter unfit to save (its checkpoint would poison every resume); warn once
    when a step's gradient is exactly zero (the adapter learns nothing: a saturated model, e.g. from --lr 1e6)."""
    why = lora_weight_problem([(n, p) for n, p in run.model.named_parameters() if p.requires_grad])
    if why:
        raise TrainError(f"{why} after step {pos.step}: the run diverged, nothing of it is saved. Last good "
                         f"checkpoint: {pos.last_saved or 'none yet'}. Try a lower --lr (now {run.t.lr:g}).")
    if grad_norm == 0.0:
        pos.zero_grad_steps += 1
        if pos.zero_grad_steps == 1:
            console.warn(f"gradient norm 0 at step {pos.step} (loss {loss:.4f}): the adapter is not learning. "
                         f"A saturated model does this (a learning rate far too high, now --lr {run.t.lr:g}), as do "
                         f"targets that never reach the loss.")


def over_shares(run: Run, micro: list, step) -> None:
    """step(rows, mine) for this rank's share of each micro-batch (mine False: the share is empty, and step runs rows
    for zero gradients that are still reduced), under DDP's no_sync before the last; with FSDP the gradients are
    averaged after the last."""
    world = run.world
    for k, rows in enumerate(micro):
        last = k == len(micro) - 1
        mine = distributed.share(rows, world)
        if not mine and not last:
            continue
        quiet = run.engine.no_sync() if world.active and not run.sharded and not last else contextlib.nullcontext()
        with quiet:
            step(mine or rows[:1], bool(mine))
    if run.sharded:
        distributed.average_gradients(world, run.params)


def accumulate(run: Run, micro: list, n_target: int) -> float:
    """Forward and backward of this rank's share of each micro-batch; returns this rank's summed loss. The ranks'
    gradients are averaged (by DDP on the last micro-batch's backward; with FSDP by average_gradients after it), so
    each divides by n_target / world: the mean is then sum over ranks / n_target."""
    amp, pad, total = autocast(run.device, run.dtype), run.tokenizer.pad_id, [0.0]

    def step(rows, mine):
        batch = collate(run.train_set, rows, pad, run.t.packing).to(run.device)
        loss = micro_step(run.engine, batch, n_target / run.world.size if mine else math.inf, amp)
        total[0] += float(loss) if mine else 0.0
    over_shares(run, micro, step)
    return total[0]


def accumulate_pairs(run: Run, micro: list, n_pairs: int, n_chosen: int) -> tuple[float, dict]:
    """accumulate for preference pairs (--objective dpo / orpo): each rank's share of each micro-batch, both sides
    of a pair in one forward. Returns the step's loss (per-pair terms / n_pairs, plus for ORPO the chosen
    responses' token loss / n_chosen) and the statistics summed over every rank."""
    amp, world, pad = autocast(run.device, run.dtype), run.world, run.tokenizer.pad_id
    total = dict.fromkeys(preference.STATS, 0.0)

    def step(rows, mine):
        batch = collate_pairs(run.train_set, rows, pad).to(run.device)
        if not mine:
            pair_micro_step(run, batch, rows, math.inf, math.inf, amp)
            return
        for key, v in pair_micro_step(run, batch, rows, n_pairs / world.size, n_chosen / world.size, amp).items():
            total[key] += v
    over_shares(run, micro, step)
    sums = dict(zip(preference.STATS, distributed.reduce_sum(world, [total[k] for k in preference.STATS],
                                                             run.device)))
    loss = sums["loss"] / n_pairs + (sums["nll"] / n_chosen if run.objective.kind == "orpo" else 0.0)
    return loss, sums


def pair_micro_step(run: Run, batch, rows: list, pairs_total: float, chosen_total: float, amp) -> dict:
    """Forward and backward of one batch of pairs (chosen rows, then rejected rows); returns its summed
    statistics. For DPO the reference log-probs come first: from the cache, or a no_grad forward of the same
    model with the adapter off (or the start adapter in)."""
    obj, ref = run.objective, None
    if obj.kind == "dpo":
        if obj.cached is not None:
            c = obj.cached[torch.tensor([r[0] for r in rows])].to(run.device)  # (n, 2)
            ref = torch.cat([c[:, 0], c[:, 1]])
        else:
            ref = obj.reference.logps(batch, amp)
    losses, nll_sum, stats = preference.pair_terms(run.engine, batch, obj, amp, ref)
    (losses.sum() / pairs_total + nll_sum / chosen_total).backward()
    return {"loss": float(losses.detach().sum()), **{k: float(v) for k, v in stats.items()}}


def micro_step(model, batch, n_target_total: float, amp) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns its summed loss. Dividing by the target tokens of the whole
    accumulated batch (not this micro-batch's) weights every target token equally, whatever the lengths."""
    with amp:
        loss_sum = model(**batch.model_kwargs(), loss_reduction="sum")
    (loss_sum / n_target_total).backward()
    return loss_sum.detach().float()


@torch.no_grad()
def evaluate(model, examples, batch_size: int, pad_id: int, device, amp, world: World = distributed.SINGLE,
             lockstep: bool = False) -> float:
    """Mean loss per target token over the eval set, always unpacked. Under torchrun rank r takes batches r, r + N,
    ... and the sums are reduced, so every rank gets the loss of the whole set. lockstep (a base sharded by FSDP:
    every forward is a collective): each rank runs as many forwards, one left without a batch runs one on the
    first example and drops it."""
    was_training = model.training
    model.eval()
    total, n = torch.zeros((), device=device), 0
    stride = batch_size * world.size
    rounds = -(-len(examples) // stride) if lockstep else None
    starts = range(world.rank * batch_size, rounds * stride if lockstep else len(examples), stride)
    for i in starts:
        rows = [[j] for j in range(i, min(i + batch_size, len(examples)))]
        batch = collate(examples, rows or [[0]], pad_id).to(device)
        with amp:
            loss = model(**batch.model_kwargs(), loss_reduction="sum").float()
        if rows:
            total += loss
            n += batch.n_target
    model.train(was_training)
    total, n = distributed.reduce_sum(world, [float(total), n], device)
    return total / n


@torch.no_grad()
def evaluate_pairs(run: Run) -> dict:
    """The preference metrics over the eval pairs ("eval_loss", "eval_rewards/accuracies", ...), the reference
    always computed (the cache holds the training pairs only). Ranks take batches in turn as in evaluate (lockstep
    with a sharded base)."""
    model, world, obj, bs = run.model, run.world, run.objective, run.t.batch_size
    amp = autocast(run.device, run.dtype)
    was_training = model.training
    model.eval()
    total = dict.fromkeys(preference.STATS, 0.0)
    n_chosen, stride = 0, bs * world.size
    n = len(run.eval_set)
    rounds = -(-n // stride) if run.sharded else None
    for i in range(world.rank * bs, rounds * stride if run.sharded else n, stride):
        rows = [[j] for j in range(i, min(i + bs, n))]
        batch = collate_pairs(run.eval_set, rows or [[0]], run.tokenizer.pad_id).to(run.device)
        ref = obj.reference.logps(batch, amp) if obj.kind == "dpo" else None
        losses, _, stats = preference.pair_terms(model, batch, obj, amp, ref)
        if rows:
            total["loss"] += float(losses.sum())
            for k, v in stats.items():
                total[k] += float(v)
            n_chosen += preference.chosen_targets(batch)
    model.train(was_training)
    values = distributed.reduce_sum(world, [total[k] for k in preference.STATS] + [n_chosen], run.device)
    sums, n_chosen = dict(zip(preference.STATS, values[:-1])), values[-1]
    loss = sums["loss"] / n + (sums["nll"] / n_chosen if obj.kind == "orpo" else 0.0)
    return {"eval_loss": loss, **{f"eval_{k}": v for k, v in preference.summarize(sums, n, n_chosen,
                                                                                   obj.kind).items()}}


def eval_metrics(run: Run) -> dict:
    if run.objective is not None:
        return evaluate_pairs(run)
    loss = evaluate_loss(run)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def preference_note(rec: dict, prefix: str) -> str:
    """ " | eval accuracy 0.95, margin 1.234" for a record with preference metrics, else "". """
    acc, margin = rec.get(f"{prefix}rewards/accuracies"), rec.get(f"{prefix}rewards/margins")
    if acc is None:
        return ""
    return f" | {prefix.replace('_', ' ')}reward accuracy {acc:.2f}, margin {margin:.3f}"


def evaluate_loss(run: Run) -> float:
    return evaluate(run.model, run.eval_set, run.t.batch_size, run.tokenizer.pad_id, run.device,
                    autocast(run.device, run.dtype), run.world, lockstep=run.sharded)


def report_eval(run: Run, rec: dict, tracker: ExperimentTracker | None) -> None:
    """At an evaluation: the adapter's norm per module into the record, greedy replies to the sample prompts into
    samples.jsonl and the console (rank 0; tracker None elsewhere). Greedy decoding draws no random numbers: a
    resumed run stays the same. With a sharded base every rank decodes with rank 0 (lockstep)."""
    samples = None
    if run.sample_prompts and (tracker is not None or run.sharded):
        with autocast(run.device, run.dtype):
            samples = greedy_samples(run.model, run.tokenizer, run.sample_prompts, lockstep=run.sharded)
    if tracker is None:
        return
    rec["adapter_norms"] = adapter_norm_metrics(run.model)
    if samples is not None:
        tracker.log_samples(rec["step"], samples)


def due(every: int, step: int) -> bool:
    return bool(every) and step % every == 0


class StopOnCtrlC:
    """Stopping by signal. The first Ctrl-C (SIGINT) sets `requested`: the loop finishes its step, saves and stops;
    a second one raises KeyboardInterrupt at once. SIGTERM, what Slurm, Kubernetes, spot instances and torchrun's
    agent send before they kill, raises KeyboardInterrupt at once: the step in flight is abandoned and the last
    completed one saved (its RNG and data position with it, so the resume is exact), then the process exits 143.
    Only the main thread can take signals: elsewhere they are left as they are."""

    def __init__(self):
        self.requested = False
        self.terminated = False
        self.old_handlers = {}
        self.installed = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> "StopOnCtrlC":
        if self.installed:
            self.old_handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self.old_handlers.items():
            signal.signal(s, old)

    def on_signal(self, signum, frame) -> None:
        if signum == signal.SIGTERM:
            self.terminated = True
            console.info("terminated (SIGTERM): saving the last completed step, then stopping")
            raise KeyboardInterrupt
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        console.info("interrupt: finishing this step, then saving a checkpoint (Ctrl-C again to stop at once)")

    @property
    def exit_code(self) -> int:
        return 143 if self.terminated else 130  # 128 + the signal's number, as a shell reports it


def save(run: Run, pos: Position, alone: bool = False) -> Path | None:
    """A checkpoint of the step pos has reached, with the RNG states that step left (rank 0's). Under torchrun
    rank 0 writes it (the adapter and optimizer state are the same on every rank) while the others wait; alone:
    rank 0 writes without them (an interruption mid-step), the others return None."""
    if run.world.active and not alone:
        return distributed.on_rank0(run.world, lambda: save(run, pos, alone=True), share=True)
    if not run.world.is_main:
        return None
    t = run.t
    state = {"step": pos.step, "world_size": run.world.size, "fsdp": run.sharded, "epoch": pos.epoch,
             "batch_index": pos.index,
             "seed": t.seed,
             "data_fingerprint": run.data_hash, "n_train_examples": len(run.train_set),
             "scheduler": {"schedule": t.schedule, "total_steps": run.total_steps, "warmup_steps": run.warmup,
                           "lr": t.lr, "min_lr": t.min_lr, "last_lr": run.optimizer.param_groups[0]["lr"]},
             "config": run.cfg}
    try:
        path = save_checkpoint(run.out / "checkpoints", pos.step, run.model, run.optimizer, run.lora_config, state,
                               pos.rng, t.keep_last, run.fingerprint)
    except CheckpointWriteError as e:
        raise TrainError(f"cannot write the checkpoint of step {pos.step} in {run.out / 'checkpoints'} "
                         f"({e.file}: {e.reason}); the last complete checkpoint is {pos.last_saved or 'none'}: "
                         "free some space, then continue with --resume") from None
    console.info(f"saved checkpoint {path}")
    return path


def write_error_text(e: BaseException) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1][:200]


# ----- before the loop ----------------------------------------------------------------------------------------------
def prepare_out(out: Path, t: TrainingConfig) -> Path | None:
    """Check and create the output folder now, not after minutes of loading. An earlier run's files are never
    replaced without --overwrite (or continued without --resume). Returns the checkpoint to resume from."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a folder")
    ckpt_root = out / "checkpoints"
    clean_leftovers(ckpt_root)
    resume_from = None
    if t.resume:
        resume_from, skipped = newest_complete(ckpt_root)
        for line in skipped:
            console.info(f"skipping checkpoint {line}")
        if resume_from is None:
            raise TrainError(f"--resume: no complete checkpoint in {ckpt_root} to resume from"
                             + (f" (skipped {'; '.join(skipped)})" if skipped else ""))
    elif not t.overwrite:
        earlier = [name for name in EARLIER_RUN if (out / name).exists()]
        if earlier:
            raise TrainError(f"{out} already holds an earlier run ({', '.join(earlier)}); pass --resume to "
                             "continue it, --overwrite to start afresh (replacing those), or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise TrainError(f"--out {out}: the folder is not writable")
    return resume_from


def load_data(t: TrainingConfig, tokenizer: Tokenizer) -> tuple[TokenSet, TokenSet]:
    """(training examples, eval examples) from the data sources, tokenized once and cached (phi3mini.data)."""
    try:
        sets = data.load_data(t.data, tokenizer, t.max_seq_len, t.train_on, split=t.data_split,
                              eval_data=t.eval_data, eval_split=t.eval_split, eval_fraction=t.eval_fraction,
                              seed=t.seed, max_examples=t.max_examples, cache=t.data_cache,
                              max_line_bytes=t.max_line_mb << 20)
    except DataError as e:
        raise TrainError(str(e)) from None
    for line in sets.report:
        console.info(line)
    n = sets.train.n_tokens + sets.eval.n_tokens
    console.info(f"{n:,} tokens {'read from the data cache' if sets.from_cache else 'tokenized'}")
    return sets.train, sets.eval


def load_pairs(t: TrainingConfig, tokenizer: Tokenizer) -> tuple[PreferenceSet, PreferenceSet]:
    """(training pairs, eval pairs) for --objective dpo / orpo (data/preference.py)."""
    if t.eval_split:
        raise TrainError(f"--eval-split is not read with --objective {t.objective}; use --eval-data or "
                         "--eval-fraction")
    try:
        train, eval_set, report = load_preferences(t.data, tokenizer, t.max_seq_len, split=t.data_split,
                                                   eval_data=t.eval_data, eval_fraction=t.eval_fraction, seed=t.seed,
                                                   max_examples=t.max_examples, max_line_bytes=t.max_line_mb << 20)
    except DataError as e:
        raise TrainError(str(e)) from None
    for line in report:
        console.info(line)
    return train, eval_set


def load_init_adapter(t: TrainingConfig, model, params: list) -> tuple[list, list]:
    """--init-adapter: the adapter loaded into the model (its LoRA settings must be the run's) -> the trainable
    parameters and a copy of their starting values (DPO's reference policy)."""
    try:
        lora.load_adapter(model, t.init_adapter)
    except (lora.AdapterError, ValueError, KeyError, RuntimeError) as e:
        raise TrainError(f"--init-adapter {t.init_adapter}: {e}") from None
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    console.info(f"starting from the adapter in {t.init_adapter}")
    return params, [p.detach().clone() for p in params]


def precomputed_reference(run: Run) -> torch.Tensor:
    """--ref-logps precompute: the reference log-probs (pairs, 2: chosen, rejected) of every training pair,
    computed once and kept in out/reference_logps.pt (read back on resume when the data and model match)."""
    path, t = run.out / "reference_logps.pt", run.t
    key = {"data": run.data_hash, "model": t.model, "init_adapter": t.init_adapter, "dtype": str(run.dtype)}
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("key") == key:
            console.info(f"reference log-probs read from {path}")
            return saved["logps"]
    t0, n, amp = time.perf_counter(), len(run.train_set), autocast(run.device, run.dtype)
    logps = torch.empty(n, 2)
    for i in range(0, n, t.batch_size):
        rows = [[j] for j in range(i, min(i + t.batch_size, n))]
        ref = run.objective.reference.logps(collate_pairs(run.train_set, rows, run.tokenizer.pad_id)
                                            .to(run.device), amp).cpu()
        logps[i:i + len(rows)] = ref.view(2, -1).T
    if run.world.is_main:
        buf = io.BytesIO()
        torch.save({"key": key, "logps": logps}, buf)
        atomic.write_file(path, buf.getvalue())
    console.info(f"reference log-probs of {n} pairs computed in {time.perf_counter() - t0:.1f}s, kept in {path}")
    return logps


def describe_schedule(run: Run) -> None:
    t, per_epoch = run.t, len(run.plans(0))
    console.info(f"{len(run.train_set)} training examples, {per_epoch} micro-batches per epoch, "
                 f"{run.total_steps} steps (batch {t.batch_size}"
                 f"{f' x {run.world.size} processes' if run.world.active else ''} x accumulation {t.grad_accum}"
                 f"{', packed' if t.packing else ''}), "
                 f"warmup {run.warmup}, {t.schedule} to {t.min_lr:g}")
    if t.grad_accum > per_epoch:  # a step never spans two epochs
        console.info(f"note: --grad-accum {t.grad_accum} is more than the {per_epoch} micro-batches of an epoch: "
                     f"each step accumulates one epoch at most")


def resume(run: Run, path: Path) -> tuple[Position, list[dict]]:
    """Restore a checkpoint (adapter, optimizer, RNG, data position) after checking that nothing the data order or
    the adapter depend on has changed; returns the position and the metrics records up to it."""
    t, state = run.t, read_trainer_state(path)
    saved = state["config"]
    # a setting added since the checkpoint was written had its default then
    saved = {section: {**values, **saved.get(section, {})} for section, values in config.defaults().items()}
    saved["training"] = config.as_spelled_now(saved["training"])
    changed = [f"{k} (checkpoint {saved['training'].get(k)!r}, now {getattr(t, k)!r})"
               for k in config.resume_fixed() if k != "batch_size" and saved["training"].get(k) != getattr(t, k)]
    # the data position counts global micro-batches (batch_size x processes): any split of the same global batch
    saved_world = state.get("world_size", 1)
    if saved["training"]["batch_size"] * saved_world != t.batch_size * run.world.size:
        changed.append(f"batch_size x processes (checkpoint {saved['training']['batch_size']} x {saved_world}, "
                       f"now {t.batch_size} x {run.world.size})")
    changed += [f"[lora] {k}" for k, v in run.cfg["lora"].items() if saved["lora"].get(k) != v]
    if state["data_fingerprint"] != run.data_hash:
        changed.append("the training data")
    if changed:
        raise TrainError(f"cannot resume from {path}: changed since: {'; '.join(changed)}")
    try:
        state = load_checkpoint(path, run.model, run.optimizer, run.device)
    except (lora.AdapterError, RuntimeError, ValueError, KeyError) as e:  # whole, but not for this model
        raise TrainError(f"cannot resume from {path}: {e}") from None
    for group in run.optimizer.param_groups:  # load_state_dict brought back the old run's; the config wins
        group.update(betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    set_lr(run.optimizer, state["scheduler"]["last_lr"], t)  # and weight decay per group (LoRA+: none on biases)
    if state["scheduler"]["total_steps"] != run.total_steps:
        console.info(f"note: the schedule now spans {run.total_steps} steps (the checkpoint's run planned "
                     f"{state['scheduler']['total_steps']})")
    if run.world.rank > 0:  # the checkpoint holds rank 0's RNG states: the others draw their own dropout masks
        torch.manual_seed(t.seed + run.world.rank + 1_000_003 * state["step"])
    pos = Position(state["step"], state["epoch"], state["batch_index"], rng_state(), path)
    console.info(f"resumed from {path} at step {pos.step} (epoch {pos.epoch}, micro-batch {pos.index})")
    return pos, read_metrics(run.out / "metrics.jsonl", pos.step)


def start_afresh(run: Run) -> tuple[Position, list[dict]]:
    if run.t.overwrite:  # only now that data and model loaded: a typo in a flag does not cost the old run
        distributed.on_rank0(run.world, lambda: remove_earlier_run(run.out))
    return Position(rng=rng_state()), []


def vllm_note(folder: Path) -> str:
    """The log's note on an exported PEFT folder, e.g. " (r 48; vLLM needs --max-lora-rank 64)": its top-level r
    is the adapter's largest rank (lora/peft_io.py)."""
    try:
        r = int(json.loads((folder / "adapter_config.json").read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError):  # the export failed and said so already
        return ""
    return f" (r {r}; vLLM needs --max-lora-rank {lora.vllm_max_lora_rank(r)})" if r <= 512 else f" (r {r})"


def remove_earlier_run(out: Path) -> None:
    for _, path in step_dirs(out / "checkpoints"):
        delete_checkpoint(path)
    for name in REPLACED_BY_A_NEW_RUN:
        atomic.remove(out / name)


# ----- after the loop -----------------------------------------------------------------------------------------------
def save_outputs(run: Run, last_saved: Path) -> None:
    """adapter/, and with --export-peft adapter-peft/, with --merge merged/ (each written whole, then renamed in
    place of the old one). A write error leaves the old one as it was, and says that it is the older."""
    out, t = run.out, run.t
    write_output(run, last_saved, out / "adapter",
                 lambda path: lora.save_adapter(run.model, path, run.lora_config, run.fingerprint))
    console.info(f"adapter written to {out / 'adapter'}")
    if t.export_peft:
        write_output(run, last_saved, out / "adapter-peft", lambda path: lora.export_peft(
            run.model, path, run.lora_config, base_model_name_or_path=t.model))
        console.info(f"PEFT adapter written to {out / 'adapter-peft'}{vllm_note(out / 'adapter-peft')}")
    if t.merge:
        model = run.model if not run.sharded else unsharded_copy(run, out / "adapter")
        write_output(run, last_saved, out / "merged", lambda path: save_merged(model, run.tokenizer, path))
        console.info(f"merged model written to {out / 'merged'}")


def eval_at_end(run: Run) -> None:
    """--eval-at-end: base vs adapter on the held-out chats (phi3lora.eval.compare, as `phi3lora eval --data`),
    shown as a table and written to out/eval.json."""
    why = ("--objective " + run.t.objective + " holds pairs, not chats" if run.objective is not None
           else "there are no held-out chats (--eval-data FILE or --eval-fraction)" if not len(run.eval_set)
           else "under torchrun the model is spread over the processes" if run.world.active else "")
    if why:
        console.warn(f"--eval-at-end: skipped, {why}; run `phi3lora eval --model {run.t.model} --adapter "
                     f"{run.out / 'adapter'} --data FILE` instead")
        return
    from phi3lora.eval import compare, format_table  # here: a run without --eval-at-end never loads it

    console.info("--eval-at-end: base vs adapter on the held-out chats")
    result = compare(run.model, run.tokenizer, run.eval_set, batch_size=run.t.batch_size)
    console.info(format_table(result))
    data = run.t.eval_data or f"{run.t.data} (held out: --eval-fraction {run.t.eval_fraction:g})"
    report = {"model": run.t.model, "adapter_dir": str(run.out / "adapter"), "data": data, **result}
    path = atomic.write_file(run.out / "eval.json", json.dumps(report, indent=2) + "\n")
    console.info(f"eval results written to {path}")


def write_output(run: Run, last_saved: Path, final: Path, write) -> None:
    try:
        write(final)
    except Exception as e:
        if not is_write_error(e):
            raise
        kept = (f"{final} is left as it was: from an earlier run, older than this run's" if final.exists()
                else f"there is no {final}; this run's adapter is in its")
        raise TrainError(f"cannot write {final} ({write_error_text(e)}). {kept} newest checkpoint {last_saved}: "
                         f"free some space, then run again with --resume to write the outputs") from None


def unsharded_copy(run: Run, adapter: Path) -> torch.nn.Module:
    """For --merge after an FSDP run (rank 0, the others waiting): the base loaded again whole, on the CPU (no GPU
    could hold it: that is why it was sharded), with the adapter just written."""
    console.info(f"--merge with --fsdp: loading {run.t.model} again on the CPU to merge the adapter into it")
    model, _, _ = build_model(dataclasses.replace(run.t, compile=False, kernels="off"), run.lora_config,
                              torch.device("cpu"), run.dtype)
    lora.load_adapter(model, adapter)
    return model


def save_merged(model, tokenizer, final: Path) -> None:
    """Base + adapter folded into the weights (lora.merge), saved in the Hugging Face layout with the tokenizer."""
    model.eval()
    lora.merge(model)
    # modules_to_save trained in fp32 (as the adapters): written in the base's dtype like every other weight
    base_dtype = model.model.norm.weight.dtype
    for m in saved_modules(model, model.lora_config).values():
        m.to(base_dtype)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    atomic.write_dir(final, fill)


if __name__ == "__main__":
    code = main()
    if os.environ.get("WORLD_SIZE", "1") != "1":  # a torchrun rank: see distributed.leave
        distributed.leave(code)
    sys.exit(code)
