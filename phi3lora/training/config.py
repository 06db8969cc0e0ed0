"""The run's configuration: one dataclass per TOML section, every option declared once, on its field.

[training] is TrainingConfig below; [lora] is lora.LoraConfig itself. A field holds its default, and in its
metadata its help line and constraints:
    help          the --help text
    choices       the allowed values
    type          turns the text given into the value kept (dtype: "bf16" -> "bfloat16"), on the command line and
                  in the TOML file
    metavar       how --help shows the value
    min / above   value >= min / value > above
    below         value < below
    length        a list of exactly this many items
    resume_fixed  changing it between a run and its --resume would change the data order or the adapter
From these fields come the command-line flags (--max-steps, --lora-r, ...; booleans as --flag / --no-flag), the TOML
reader and writer, and the checks of every value, run before any model loads. Adding an option is adding a field.
Precedence: a flag wins over the --config file, the file over the tiny preset (model "tiny"), the preset over the
defaults; resolve_config records where each setting came from, for the start-up summary. --resume RUN starts from
RUN/config.toml instead (the run's own settings, already resolved) and lets a flag change only what does not change
what was trained.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import torch

from phi3lora import console
from phi3lora.data.files import SPEC_FORMS
from phi3lora.console import ArgumentParser
from phi3lora.lora import LoraConfig
from phi3lora.phi3mini import hub

from .errors import TrainError


def option(default, help: str, **constraints):
    """A config field: its default, help text and constraints (see the module docstring)."""
    meta = {"help": help, **constraints}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainingConfig:
    """[training]. The defaults follow the official Phi-3 sample fine-tune (bf16 on GPU, cosine schedule, warmup
    ratio 0.2, batch 4, max length 2048, packing, gradient checkpointing) with a LoRA learning rate."""
    model: str = option("microsoft/Phi-3-mini-4k-instruct",
                        "Hub id, local folder in the Hugging Face layout, or 'tiny' (built-in random model)",
                        resume_fixed=True)
    data: str = option("data/sample_chat.jsonl", f"training data (chats): {SPEC_FORMS}")
    eval_data: str = option("", "evaluation data (same forms as data); when empty, eval_split, else eval_fraction")
    eval_fraction: float = option(0.05, "fraction of data held out for evaluation when eval_data and eval_split "
                                  "are empty (rounded, at most 200 examples; 0: no evaluation)", min=0, below=1)
    data_split: str = option("train", "split read from Hub datasets and split-named folders in data")
    eval_split: str = option("", "evaluation split of data's Hub datasets and split-named folders")
    max_examples: int = option(0, "at most this many examples of each data source without its own :N (0: all)",
                               min=0)
    data_cache: str = option("auto", "tokenized-data cache: auto (~/.cache/phi3-lora/data), off, or a folder")
    max_line_mb: int = option(64, "longest JSON line read, in MB (a longer one is a bad line): parsing a line "
                              "holds several times its size in memory", above=0)
    out: str = option("out/phi3-lora", "output folder")
    epochs: int = option(1, "passes over the data (when max_steps is 0)", above=0)
    max_steps: int = option(0, "optimizer steps; > 0 overrides epochs", min=0)
    batch_size: int = option(4, "sequences per micro-batch (packed rows with packing)", above=0, resume_fixed=True)
    grad_accum: int = option(1, "micro-batches per optimizer step", above=0, resume_fixed=True)
    max_seq_len: int = option(2048, "longer examples are cut after their last whole reply that fits, or skipped",
                              above=0, resume_fixed=True)
    train_on: str = option("assistant", "assistant: loss on the replies and their <|end|>; all: on every token",
                           choices=("assistant", "all"), resume_fixed=True)
    packing: bool = option(True, "pack several examples in a row (attention stays inside each)", resume_fixed=True)
    lr: float = option(2e-4, "peak learning rate", min=0)
    min_lr: float = option(0.0, "learning rate at the end of the decay", min=0)
    schedule: str = option("cosine", "decay after warmup", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = option(0.2, "warmup steps as a fraction of all steps", min=0, below=1)
    warmup_steps: int = option(0, "warmup steps; > 0 overrides warmup_ratio", min=0)
    min_steps: int = option(0, "when the run is counted in epochs (max_steps 0): at least this many steps, more "
                            "epochs over a small data set", min=0)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0)
    adam_beta1: float = option(0.9, "AdamW beta1", min=0, below=1)
    adam_beta2: float = option(0.999, "AdamW beta2", min=0, below=1)
    adam_eps: float = option(1e-8, "AdamW eps", min=0)
    max_grad_norm: float = option(1.0, "gradient clipping; 0 turns it off", min=0)
    loraplus_lr_ratio: float = option(0.0, "LoRA+: lora_B (and 1-d parameters) learn at lr x this (peft's "
                                      "create_loraplus_optimizer; 16 in its paper); 0: off", min=0,
                                      resume_fixed=True)
    loraplus_lr_embedding: float = option(1e-6, "LoRA+: learning rate of LoRA on embeddings", min=0)
    neftune_noise_alpha: float = option(0.0, "NEFTune: uniform noise of size alpha/sqrt(length x hidden) on the "
                                        "input embeddings while training (5 in its paper); 0: off", min=0)
    dtype: str = option("auto", f"{hub.DTYPE_HELP}; autocast in it too (the LoRA weights are float32 always; "
                        "float16 is refused: it needs loss scaling)", choices=hub.DTYPE_CHOICES, type=hub.dtype_name)
    device: str = option("auto", hub.DEVICE_HELP, metavar=hub.DEVICE_METAVAR)
    kernels: str = option("auto", "Triton kernels: auto = on for CUDA", choices=("auto", "on", "off"))
    quantize: str = option("none", "4-bit base (QLoRA): nf4 quantizes the decoder projections while loading; none "
                           "keeps them as stored, but a bitsandbytes 4-bit checkpoint is 4-bit anyway",
                           choices=hub.QUANTIZE_CHOICES, type=hub.quantize_name, resume_fixed=True)
    grad_checkpointing: bool = option(True, "non-reentrant activation checkpointing")
    compile: bool = option(False, "torch.compile each block")
    fsdp: bool = option(False, "under torchrun: shard the frozen base over the processes (FSDP2, one unit per "
                        "decoder block) instead of a whole copy in each (DDP); one process: no effect")
    seed: int = option(0, "adapter init, data order, dropout", min=0, resume_fixed=True)
    log_every: int = option(10, "progress line every N steps (not on a terminal)", min=0)
    eval_every: int = option(100, "evaluate every N steps (and at the end); 0: only at the end", min=0)
    save_every: int = option(100, "checkpoint every N steps (and at the end); 0: only at the end", min=0)
    keep_last: int = option(2, "checkpoints kept", above=0)
    resume: bool = option(False, "continue the run in folder RUN (no RUN: in --out) from its newest complete "
                          "checkpoint, with the settings of its config.toml; flags may change only what does not "
                          "change what was trained")
    overwrite: bool = option(False, "start afresh in an out folder that holds an earlier run")
    export_peft: bool = option(False, "also write the adapter in PEFT's format (out/adapter-peft)")
    merge: bool = option(False, "also write base + adapter merged, Hugging Face layout (out/merged)")
    eval_at_end: bool = option(False, "after training, base vs adapter on the held-out chats: loss, perplexity, exact "
                               "match and token F1 of greedy answers (phi3lora eval), in out/eval.json")
    report_to: str = option("none", "also send the metrics to tensorboard (event files in out/tensorboard) or wandb",
                            choices=("none", "tensorboard", "wandb"))
    eval_samples: int = option(3, "at each evaluation, greedy replies to the first N eval prompts (samples.jsonl)",
                               min=0)
    objective: str = option("sft", "sft: chats, cross-entropy on the replies; dpo / orpo: preference pairs (chosen, "
                            "rejected) in data, always unpacked (training/preference.py)",
                            choices=("sft", "dpo", "orpo"), resume_fixed=True)
    beta: float = option(0.1, "dpo: strength of the tie to the reference; orpo: weight of the odds-ratio term",
                         above=0, resume_fixed=True)
    label_smoothing: float = option(0.0, "dpo: assumed fraction of pairs with chosen and rejected swapped", min=0,
                                    below=0.5, resume_fixed=True)
    ref_logps: str = option("step", "dpo: reference log-probs computed in each step (no_grad, adapter off) or once "
                            "before training (precompute: kept in out/reference_logps.pt)",
                            choices=("step", "precompute"))
    init_adapter: str = option("", "start from this adapter folder (e.g. an SFT run's out/adapter); for dpo it is "
                               "also the reference policy", resume_fixed=True)


SECTIONS = {"training": TrainingConfig, "lora": LoraConfig}


# ----- the fields ---------------------------------------------------------------------------------------------------
def kind(f) -> type:
    """bool, int, float, str or list (a list or tuple field; its items have the default's items' type)."""
    name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    return {"bool": bool, "int": int, "float": float, "str": str}.get(name, list)


def default_of(f):
    value = f.default if f.default is not MISSING else f.default_factory()
    return list(value) if isinstance(value, tuple) else value


def defaults() -> dict:
    """{"training": {key: default}, "lora": {...}}: the configuration when nothing is given."""
    return {section: {f.name: default_of(f) for f in fields(cls)} for section, cls in SECTIONS.items()}


def resume_fixed() -> tuple[str, ...]:
    return tuple(f.name for f in fields(TrainingConfig) if f.metadata.get("resume_fixed"))


def flag_for(section: str, key: str) -> str:
    if section == "lora":
        return "--lora-" + key.removeprefix("lora_").replace("_", "-")
    return "--" + key.replace("_", "-")


def as_spelled_now(training: dict) -> dict:
    """A [training] section read back from an older checkpoint, each text value through its field's `type`, so an
    older spelling compares equal to today's (quantize "" is "none", dtype "bf16" is "bfloat16")."""
    by_name = {f.name: f for f in fields(TrainingConfig)}
    return {k: by_name[k].metadata["type"](v) if k in by_name and "type" in by_name[k].metadata and isinstance(v, str)
            else v for k, v in training.items()}


def typed(cfg: dict) -> tuple[TrainingConfig, LoraConfig]:
    """The checked configuration dict as its dataclasses."""
    return TrainingConfig(**cfg["training"]), LoraConfig(**cfg["lora"])


# ----- command line -------------------------------------------------------------------------------------------------
def _list_arg(item: type):
    def parse(text: str):
        items = [s.strip() for s in text.split(",") if s.strip()]
        if item is bool:
            bools = {"true": True, "1": True, "false": False, "0": False}
            if any(s.lower() not in bools for s in items):
                raise argparse.ArgumentTypeError(f"expected a comma-separated list of true/false, got {text!r}")
            return [bools[s.lower()] for s in items]
        return items
    return parse


def _argument(section: str, f) -> dict:
    default, k = default_of(f), kind(f)
    shown = ",".join(map(str, default)) if k is list else default
    kw = dict(dest=f"{section}.{f.name}", default=None,
              help=f"{f.metadata.get('help', '')} (default: {shown})".replace("%", "%%"))
    if f.name == "resume":  # --resume, or --resume RUN: the folder of the run to continue
        kw.update(nargs="?", const=True, metavar="RUN")
    elif k is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif k is list:
        kw.update(type=_list_arg(type(default[0]) if default else str), metavar="A,B,...")
    else:
        kw["type"] = f.metadata.get("type", k)  # a field's own type= spells its value one way (dtype: bf16 -> bfloat16)
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        else:
            kw["metavar"] = f.metadata.get("metavar", k.__name__.upper())
    return kw


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Fine-tune Phi-3 with LoRA on chat data: JSON lines (also gzip or zstd "
                       "compressed), JSON, Parquet, Arrow or CSV files, folders of them, globs, Hugging Face "
                       "Hub datasets, several joined by commas (see --data).")
    p.add_argument("--config", metavar="FILE", help="TOML file with [training] and [lora] sections")
    for section, cls in SECTIONS.items():
        group = p.add_argument_group(f"[{section}]")
        for f in fields(cls):
            # short spellings as well, e.g. --use-dora for --lora-use-dora
            group.add_argument(flag_for(section, f.name), *f.metadata.get("aliases", ()), **_argument(section, f))
    return p


# Where a setting came from, lowest precedence first: each level overrides the ones before it. "run" is the
# config.toml of the run --resume continues (that run's defaults, preset, file and flags, already resolved).
LEVELS = ("default", "preset", "run", "file", "flag")
# (a, b): a > 0 sets b aside. Where both are set, the one set at the higher level governs (a flag's --epochs over
# the preset's max_steps); at the same level, a.
CONFLICTS = (("max_steps", "epochs"), ("warmup_steps", "warmup_ratio"))


@dataclass
class Resolved:
    """The configuration ({"training": {...}, "lora": {...}}, what the rest of the program reads) and where each
    setting came from."""
    cfg: dict
    origin: dict = field(default_factory=dict)  # {(section, key): level in LEVELS}; absent: the default
    where: dict = field(default_factory=lambda: {"flag": "flags", "preset": "the tiny preset"})  # level -> name
    notes: list = field(default_factory=list)  # lines for the user: which setting governs, what --resume changed
    replaced: set = field(default_factory=set)  # (section, key) whose value a higher level changed

    def level(self, section: str, key: str) -> str:
        return self.origin.get((section, key), "default")

    def set_all(self, level: str, values: dict) -> None:
        for section, items in values.items():
            for key, value in items.items():
                if self.cfg[section][key] != value:
                    self.replaced.add((section, key))
                self.cfg[section][key] = value
                self.origin[section, key] = level

    def described(self, section: str, key: str) -> str:
        """ "--max-steps 100 (the tiny preset)" """
        level = self.level(section, key)
        return f"{as_flag(section, key, self.cfg[section][key])} ({self.where.get(level, level)})"

    def summary(self) -> str | None:
        """The settings not at their default, every flag given and every value that replaced a lower level's,
        grouped by where they came from, highest precedence first: what the run uses, as flags."""
        base, groups = defaults(), {}
        for section, values in self.cfg.items():
            for key, value in values.items():
                level = self.level(section, key)
                if level != "default" and (level == "flag" or value != base[section][key]
                                           or (section, key) in self.replaced):
                    groups.setdefault(level, []).append(as_flag(section, key, value))
        if not groups:
            return None
        order = [level for level in reversed(LEVELS) if level in groups]
        width = max(len(self.where[level]) for level in order)
        chain = " > ".join([self.where[level] for level in order] + ["defaults"])
        return "\n".join([f"settings ({chain}):"]
                         + [f"  {self.where[level]:<{width}}  {' '.join(groups[level])}" for level in order])


def resolve_config(argv=None) -> Resolved:
    """Defaults, then the tiny preset's settings (model "tiny"), then the --config TOML file, then command-line
    flags; with --resume, the run's config.toml, then the file and the flags where they change nothing that was
    trained. Every value checked (TrainError otherwise)."""
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    flags = {}
    for dest, value in args.items():
        if value is not None:
            section, key = dest.split(".")
            flags.setdefault(section, {})[key] = value
    from_file = read_toml(Path(config_file)) if config_file else {}
    r = Resolved(defaults())
    r.where["file"] = config_file
    resume = flags.get("training", {}).get("resume", from_file.get("training", {}).get("resume", False))
    if resume:
        continue_run(r, resume, flags, from_file)
    else:
        model = flags.get("training", {}).get("model") or from_file.get("training", {}).get("model")
        if model == "tiny":  # the preset's settings, under the file's and the flags'
            r.set_all("preset", {section: {k: v for k, v in values.items() if v != r.cfg[section][k]}
                                 for section, values in TINY_SETTINGS.items()})
        r.set_all("file", from_file)
        r.set_all("flag", flags)
    settle_conflicts(r)
    check(r.cfg)
    return r


def parse_config(argv=None, notes: list | None = None) -> dict:
    """resolve_config's configuration -> {"training": {...}, "lora": {...}}. The lines for the user (the settings
    and where they came from, which of two conflicting settings governs) go to `notes` when given, else to
    stderr."""
    r = resolve_config(argv)
    lines = [line for line in [r.summary(), *r.notes] if line]
    if notes is not None:
        notes.extend(lines)
    else:
        for line in lines:
            console.info(line)
    return r.cfg


def settle_conflicts(r: Resolved) -> None:
    """For each pair of CONFLICTS both set: the one set at the higher level governs (the other is put back to its
    default when it is the overriding one), the same level: the overriding one; one line says which."""
    t = r.cfg["training"]
    for first, second in CONFLICTS:
        a, b = LEVELS.index(r.level("training", first)), LEVELS.index(r.level("training", second))
        if t[first] <= 0 or b == 0:
            continue
        if b > a:
            r.notes.append(f"{r.described('training', second)} governs, not {r.described('training', first)}: the "
                           "one given at the higher level wins")
            t[first] = default_of(next(f for f in fields(TrainingConfig) if f.name == first))
            del r.origin["training", first]
        elif b == a:
            r.notes.append(f"{r.described('training', first)} governs, not {as_flag('training', second, t[second])}"
                           f": both given there, and {flag_for('training', first)} > 0 overrides "
                           f"{flag_for('training', second)}")
        else:
            r.notes.append(f"{r.described('training', first)} governs, not {r.described('training', second)}: the "
                           "one given at the higher level wins")
    # min_steps is a floor under the epochs: one from a lower level (the tiny preset's) does not hold down epochs the
    # user gave (`--model tiny --epochs 3` trains 3 epochs, not the preset's 100 steps)
    epochs, floor = (LEVELS.index(r.level("training", k)) for k in ("epochs", "min_steps"))
    if t["min_steps"] > 0 and t["max_steps"] <= 0 and epochs > floor:
        r.notes.append(f"{r.described('training', 'epochs')} governs, not {r.described('training', 'min_steps')}: "
                       "the one given at the higher level wins")
        t["min_steps"] = 0
        del r.origin["training", "min_steps"]


def resume_unchangeable() -> set[str]:
    """[training] keys that --resume refuses to change: they change the data order, the training data or the
    adapter (every [lora] key too). batch_size may change with the number of processes (train.resume checks the
    global batch)."""
    return (set(resume_fixed()) - {"batch_size"}) | {"data", "data_split", "max_examples"}


def continue_run(r: Resolved, resume, flags: dict, from_file: dict) -> None:
    """--resume [RUN]: the settings of RUN/config.toml (RUN: --out when not given), then the config file's and the
    flags' where they differ; a change to what was trained is refused, any other said in one line."""
    given_out = flags.get("training", {}).get("out") or from_file.get("training", {}).get("out")
    if isinstance(resume, str):
        if given_out and Path(given_out) != Path(resume):
            raise TrainError(f"--resume {resume} and --out {given_out} name two folders: give the run's folder once")
        folder = resume
    else:
        folder = given_out or r.cfg["training"]["out"]
    saved_path = Path(folder) / "config.toml"
    if not saved_path.is_file():
        raise TrainError(f"--resume: no run to continue in {folder} (no config.toml, which every run writes when "
                         "it starts)")
    r.where["run"] = str(saved_path)
    base = defaults()
    r.set_all("run", {section: {k: v for k, v in values.items() if v != base[section][k]}  # as if given there
                      for section, values in read_toml(saved_path).items()})
    run = {section: dict(values) for section, values in r.cfg.items()}
    r.set_all("file", from_file)
    r.set_all("flag", flags)
    r.cfg["training"].update(out=str(folder), resume=True, overwrite=False)
    refused, fixed = [], resume_unchangeable()
    for section, values in r.cfg.items():
        for key, value in values.items():
            if key in ("out", "resume", "overwrite") or value == run[section][key]:
                continue
            if section == "lora" or key in fixed:
                refused.append(f"{r.described(section, key)}: the run has {as_flag(section, key, run[section][key])}")
            else:
                r.notes.append(f"--resume: {r.described(section, key)} in place of the run's "
                               f"{as_flag(section, key, run[section][key])}")
    if refused:
        raise TrainError(f"--resume {folder}: cannot change what the run trained ({'; '.join(refused)}); leave "
                         f"{'it' if len(refused) == 1 else 'them'} out to continue the run, or start a new run "
                         "in another --out")


# The tiny preset's training settings: the defaults are Phi-3-mini's, and on the random tiny model they barely move
# the loss. They apply whenever the model is "tiny" (from a flag or the config file), below the file and the flags.
# The built-in tiny random Phi-3 (phi3mini/tiny.py: 256 wide, 4 layers) memorizes the demo's six short chats on a
# CPU in about a minute with them.
TINY_SETTINGS = {
    "training": dict(
        # Epochs over the data, and at least 100 steps: Adam moves each LoRA weight about lr per step, so the number
        # of steps (not the tokens per step) is what lets the adapter's outputs grow to the logit range it needs. The
        # demo's 6 chats (one batch an epoch) get 100 steps; 200 short chats (9 batches) 16 epochs, 144 steps; a
        # large set its 16 epochs. 16 epochs: a question's own words reach its reply only through the adapter
        # columns of those words (embed_tokens), which move only when the chat is in the batch, so what counts for
        # a set of facts is how often each one is seen. Batch 24: on a CPU a step costs about the same at 6 or 24
        # short chats, so 4x the views of each fact per step.
        # lr 1e-3, constant after warmup: at 5e-3 (or 2e-3) the adapters (scale 16, below) overshoot and every
        # reply collapses onto one name; a cosine decay stops the learning of 200 facts halfway.
        # Measured, 200 invented facts (tests/test_tiny_learns.py), 20 asked back, batch 24, 108 steps: 5e-3
        # cosine 0/20 right (all one name); 1e-3 cosine 5/20; 1e-3 constant 13/20, all 20 replies different; 144
        # steps (16 epochs) 16/20. With batch 6 instead (102 or 340 steps) 0/20. The demo's 6 chats stay exact.
        epochs=16, min_steps=100, batch_size=24, max_seq_len=256, packing=False, lr=1e-3, schedule="constant",
        warmup_ratio=0.1,
        grad_checkpointing=False, log_every=10, eval_every=50, save_every=50),
    "lora": dict(
        # scale alpha/r = 16 (not 2): the random, frozen lm_head caps its logits near +-1.3 and the frozen
        # embeddings are tiny (std 0.02), so the adapters must add logits of ~10 and token vectors much larger than
        # the base ones.
        r=16, lora_alpha=256, lora_dropout=0.0,
        # lm_head: lets the model produce real logits at all. embed_tokens: token vectors that stay distinct after
        # the final RMSNorm. No o_proj / down_proj: their adapters write one shared vector into the residual stream
        # that drowns the tiny random embeddings, every hidden state becomes the same, and the loss sticks at the
        # unigram entropy. qkv_proj and gate_up_proj carry the question into the reply.
        target_modules=["qkv_proj", "gate_up_proj", "lm_head", "embed_tokens"]),
}


def as_flag(section: str, key: str, value) -> str:
    """The command-line spelling of a setting: --lr 0.005, --no-packing, --lora-target-modules a,b."""
    flag = flag_for(section, key)
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    if isinstance(value, list):
        return f"{flag} {','.join(map(str, value))}"
    if value == "":
        return f'{flag} ""'
    return f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}"


# ----- TOML ---------------------------------------------------------------------------------------------------------
def coerce(f, value, where: str, section: str):
    """A TOML value checked against the field's type (ints are accepted for floats)."""
    k = kind(f)
    if k is bool:
        ok = isinstance(value, bool)
    elif k is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif k is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif k is list:
        default = default_of(f)
        item = type(default[0]) if default else str
        ok = isinstance(value, list) and all(isinstance(v, item) for v in value)
    else:
        ok = isinstance(value, str)
        value = f.metadata["type"](value) if ok and "type" in f.metadata else value
    if not ok:
        raise TrainError(f"{where}: [{section}] {f.name} must be {k.__name__}, got {value!r}")
    return value


def read_toml(path: Path) -> dict:
    """{section: {key: value}} of a config file, every key known and of its field's type."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise TrainError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:  # a folder, no permission, not text
        raise TrainError(f"{path}: cannot read the config file ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise TrainError(f"{path}: not valid TOML ({e})") from None
    out = {}
    for section, values in data.items():
        if not isinstance(values, dict):  # a key above the first [section] line
            home = section_of(section)
            raise TrainError(f"key {section!r} is at the top of {path}, outside any section: "
                             + (f"put it under [{home}]" if home else f"no section has it{did_you_mean(section)}"))
        if section not in SECTIONS:
            raise TrainError(f"{path}: unknown section [{section}] (expected [training] and [lora])"
                             + did_you_mean(section, SECTIONS, "[{}]"))
        by_name = {f.name: f for f in fields(SECTIONS[section])}
        for key, value in values.items():
            if key not in by_name:
                home = section_of(key)
                if home:
                    raise TrainError(f"{path}: key {key!r} is in [{section}], but it belongs under [{home}]")
                raise TrainError(f"{path}: unknown key {key!r} in [{section}]"
                                 + (did_you_mean(key, by_name) or f"; known: {', '.join(by_name)}"))
            out.setdefault(section, {})[key] = coerce(by_name[key], value, str(path), section)
    return out


def section_of(key: str) -> str | None:
    """The section whose field this key is, if any."""
    return next((section for section, cls in SECTIONS.items() if key in {f.name for f in fields(cls)}), None)


def did_you_mean(word: str, known=None, form: str = "{}") -> str:
    """ "; did you mean [training]?" for the nearest known name (every field's when not given), else ""."""
    if known is None:
        known = {f"{f.name} (under [{section}])": f.name for section, cls in SECTIONS.items() for f in fields(cls)}
        close = difflib.get_close_matches(word, list(known.values()), n=1)
        return f"; did you mean {next(k for k, v in known.items() if v == close[0])}?" if close else ""
    close = difflib.get_close_matches(word, list(known), n=1)
    return f"; did you mean {form.format(close[0])}?" if close else ""


def to_toml(cfg: dict) -> str:
    """The resolved configuration as TOML that --config reads back."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a valid TOML basic string
        return repr(v)
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {val(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


# ----- checks -------------------------------------------------------------------------------------------------------
def _bounds(m: dict) -> str | None:
    """The constraint text of a field's numeric bounds, e.g. "> 0", ">= 0", "in [0, 1)"."""
    if "min" in m and "below" in m:
        return f"in [{m['min']}, {m['below']})"
    if "above" in m:
        return f"> {m['above']}"
    if "min" in m:
        return f">= {m['min']}"
    if "below" in m:
        return f"< {m['below']}"
    return None


def check_value(section: str, f, value) -> None:
    m, where = f.metadata, f"[{section}] {f.name} ({flag_for(section, f.name)})"
    if isinstance(value, float) and not math.isfinite(value):
        raise TrainError(f"{where} must be a finite number, got {value}")
    if "choices" in m and value not in m["choices"]:
        raise TrainError(f"{where} must be one of {', '.join(m['choices'])}, got {value!r}")
    ok = (("above" not in m or value > m["above"]) and ("min" not in m or value >= m["min"])
          and ("below" not in m or value < m["below"]))
    if not ok:
        raise TrainError(f"{where} must be {_bounds(m)}, got {value}")
    if "length" in m and len(value) != m["length"]:
        raise TrainError(f"{where} needs {m['length']} values, got {len(value)}")


def check(cfg: dict) -> None:
    """Every value within its field's constraints, and the [lora] section a LoraConfig that fits a Phi-3 model:
    what LoraConfig, lora.inject and AdamW would refuse after minutes of loading is refused here."""
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            check_value(section, f, cfg[section][f.name])
    try:
        lora_config = LoraConfig(**cfg["lora"])
    except (TypeError, ValueError) as e:
        raise TrainError(f"[lora] {e}") from None
    if cfg["training"].get("export_peft") and lora_config.use_dora and lora_config.base_changing:
        raise TrainError(f"--export-peft with use_dora and init_lora_weights={lora_config.init_lora_weights!r}: the "
                         "adapter has no exact PEFT form on the original base (DoRA's norm is of the residual "
                         "weight; peft cannot convert it either); drop one of the three")
    check_targets(lora_config)


def check_targets(lora_config: LoraConfig) -> None:
    """The adapter plan on a Phi-3 built on the meta device (no memory, no weights): target names that match
    no layer, or q/k/v flags that leave qkv_proj without an adapter, are found before the real model loads. Every
    preset shares these module names."""
    from phi3lora.lora.inject import plan, saved_modules
    from phi3lora.phi3mini import Phi3
    from phi3lora.phi3mini.config import Phi3Config

    with torch.device("meta"):
        skeleton = Phi3(Phi3Config.from_name("tiny"))
    try:
        plan(skeleton, lora_config)
    except ValueError as e:
        raise TrainError(f"[lora] target_modules (--lora-target-modules): {e}") from None
    try:
        saved_modules(skeleton, lora_config)
    except ValueError as e:
        raise TrainError(f"[lora] modules_to_save (--modules-to-save): {e}") from None
