"""What a training run reports at each evaluation besides its loss: greedy sample replies for a few fixed eval
prompts (samples.jsonl and the console), the adapter's size per module (into the metrics record), and, when
asked, TensorBoard event files (torch.utils.tensorboard; the `[tensorboard]` extra) or a wandb run (when wandb is
installed). metrics.jsonl and loss.svg stay the trainer's own (metrics.py).

    tracker = ExperimentTracker(out, report_to="tensorboard")
    prompts = sample_prompts(eval_set, tokenizer, 3)
    ...
    record = {"step": step, "eval_loss": loss, "adapter_norms": adapter_norm_metrics(model)}
    tracker.log(record)
    tracker.log_samples(step, greedy_samples(model, tokenizer, prompts))
    tracker.close()
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable

import torch

from phi3lora import console
from phi3lora.atomic import write_file
from phi3lora.phi3mini.generation import default_stop_ids, generate

REPORT_TO = ("none", "tensorboard", "wandb")
# a vocabulary entry no text maps to: Phi-3's <|placeholderN|> and the other added tokens, the tiny tokenizer's
# <unusedN> filler. A random or barely trained model emits walls of them; they say nothing about what it learned.
NOISE_PIECE = re.compile(r"<unused\d+>|<\|[^|<>]*\|>|<unk>|<s>|</s>")
QUESTION_CHARS = 100  # of the question, on the console (samples.jsonl keeps it whole)


class TrackerError(ValueError):
    """A tracking backend that cannot run (not installed, unknown name): the message says what to do."""


def sample_prompts(examples, tokenizer, n: int) -> list[dict]:
    """Prompts of the first n examples that hold an assistant reply: every token up to and including the last
    <|assistant|> marker (exactly the prompt chat.py would build), and the reply the data gives there.
    Returns [{"prompt_ids": [...], "reference": str}]. examples: phi3mini.data Examples or a TokenSet."""
    assistant, end = tokenizer.role_ids.get("assistant"), tokenizer.end_id
    out = []
    for i in range(len(examples)):  # a list of Examples or a data.TokenSet (indexable, rows on demand)
        if len(out) >= n:
            break
        ids = [int(t) for t in examples[i].input_ids]
        marks = [i for i, t in enumerate(ids) if t == assistant]
        if assistant is None or not marks:
            continue
        reply = ids[marks[-1] + 1:]
        reply = reply[:reply.index(end)] if end in reply else reply
        out.append({"prompt_ids": ids[:marks[-1] + 1], "reference": tokenizer.decode(reply, skip_special_tokens=True)})
    return out


@torch.no_grad()
def greedy_samples(model, tokenizer, prompts: list[dict], max_new_tokens: int = 48,
                   stop_ids=None, lockstep: bool = False) -> list[dict]:
    """The model's greedy reply to each prompt, stopping where chat.py does (generate restores the train/eval
    mode afterwards). lockstep (a base sharded by FSDP, whose every forward is a collective of all ranks): every
    prompt runs exactly max_new_tokens forwards whatever the tokens, and the reply is cut at its first stop id
    afterwards, so no rank can stop sooner than another on a token its rounding chose differently.
    The reply ends before its first noise token (NOISE_PIECE: what an untrained model babbles), "noise_cut" saying
    how many tokens went; "cut" is True when the reply ran into max_new_tokens without a stop.
    Returns [{"prompt": text, "question": the last user message, "reply": text, "reference": text, "cut": bool,
    "noise_cut": int}]."""
    stop_ids = default_stop_ids(model, tokenizer) if stop_ids is None else stop_ids  # as chat.py stops
    out = []
    for p in prompts:
        new = generate(model, p["prompt_ids"], max_new_tokens, temperature=0.0,
                       stop_ids=[] if lockstep else stop_ids)
        if lockstep:
            new = new[:next((i + 1 for i, t in enumerate(new) if t in stop_ids), len(new))]
        cut = len(new) >= max_new_tokens and not (new and new[-1] in stop_ids)
        noise = next((i for i, t in enumerate(new) if is_noise(tokenizer, t) and t not in stop_ids), len(new))
        reply = tokenizer.decode(new[:noise], skip_special_tokens=True)
        out.append({"prompt": tokenizer.decode(p["prompt_ids"]), "question": question_of(tokenizer, p["prompt_ids"]),
                    "reply": reply, "reference": p["reference"], "cut": cut, "noise_cut": len(new) - noise})
    return out


def is_noise(tokenizer, token_id: int) -> bool:
    piece = tokenizer.id_to_token(int(token_id))
    return piece is None or NOISE_PIECE.fullmatch(piece) is not None


def question_of(tokenizer, prompt_ids: list[int]) -> str:
    """The text of the prompt's last user message (between its <|user|> and the next <|end|>); "" without one."""
    user, end = tokenizer.role_ids.get("user"), tokenizer.end_id
    starts = [i for i, t in enumerate(prompt_ids) if t == user]
    if user is None or not starts:
        return ""
    body = list(prompt_ids[starts[-1] + 1:])
    body = body[:body.index(end)] if end in body else body
    return tokenizer.decode(body, skip_special_tokens=True).strip()


def sample_line(index: int, step: int, s: dict) -> str:
    """The console's line for one sample: `sample 0 @ step 50: 'question' -> 'reply' (data: 'reference')`, with
    what was cut from the reply said after it."""
    question = s.get("question", "")
    if len(question) > QUESTION_CHARS:
        question = question[:QUESTION_CHARS - 1] + "…"
    marks = ""
    if s.get("noise_cut"):
        marks += f" (… {s['noise_cut']} more tokens of noise cut)"
    if s.get("cut"):
        marks += " [cut at the token limit]"
    return f"sample {index} @ step {step}: {question!r} -> {s['reply']!r}{marks} (data: {s['reference']!r})"


def adapter_norm_metrics(model) -> dict[str, float]:
    """{module name: ‖s·B·A‖ Frobenius} for every adapted module, plus "total" (the norm of all of them together)."""
    from phi3lora.lora.footprint import adapter_norms

    norms = {n.name.removeprefix("model."): n.frobenius for n in adapter_norms(model)}
    norms["total"] = math.sqrt(sum(v * v for v in norms.values()))
    return norms


def _import_tensorboard():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises this when the tensorboard package is missing
        raise TrackerError("report_to tensorboard needs the tensorboard package: pip install "
                          "'phi3-lora[tensorboard]' (or pip install tensorboard)") from None
    return SummaryWriter


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise TrackerError("report_to wandb needs wandb: pip install wandb (then wandb login)") from None
    return wandb


def check_backend(report_to: str) -> None:
    """Raise TrackerError now (before a model loads) if report_to is unknown or its package is missing."""
    if report_to not in REPORT_TO:
        raise TrackerError(f"report_to must be one of {', '.join(REPORT_TO)}; got {report_to!r}")
    if report_to == "tensorboard":
        _import_tensorboard()
    elif report_to == "wandb":
        _import_wandb()


def _scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """Numbers of a metrics record, nested dicts flattened to "outer/inner" (TensorBoard's tag groups)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            out[prefix + key] = float(value)
    return out


class ExperimentTracker:
    """Sends each metrics record and the sample replies where report_to says ("none", "tensorboard", "wandb"),
    and keeps samples.jsonl in out_dir. resume_step: keep the samples.jsonl lines up to that step (the later
    ones are about to be redone); None starts the file afresh with the first samples logged."""

    def __init__(self, out_dir, report_to: str = "none", config: dict | None = None,
                 resume_step: int | None = None, echo: Callable[[str], None] | None = None):
        check_backend(report_to)
        self.out_dir = Path(out_dir)
        self.echo = echo or console.info  # ends an open progress line first
        self.tb = self.wandb = None
        if report_to == "tensorboard":
            self.tb = self._tensorboard()
        elif report_to == "wandb":
            self.wandb = self._wandb(config)
        self.samples_path = self.out_dir / "samples.jsonl"
        self.samples_mode = "w"  # a fresh run replaces the file with its first samples (none: no file)
        if resume_step is not None and self.samples_path.exists():
            kept = []
            for line in self.samples_path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:  # the half-written last line of a killed run
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= resume_step:
                    kept.append(line)
            write_file(self.samples_path, "".join(x + "\n" for x in kept))
            self.samples_mode = "a"

    def _tensorboard(self):
        return _import_tensorboard()(log_dir=str(self.out_dir / "tensorboard"))

    def _wandb(self, config):
        return _import_wandb().init(project="phi3-lora", name=self.out_dir.name, dir=str(self.out_dir),
                                    config=config or {})

    def log(self, record: dict) -> None:
        """One metrics record (with its "step"): every number in it, nested dicts as "outer/inner"."""
        scalars = _scalars(record)
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, record["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """Append the replies to samples.jsonl, print them, and send them to TensorBoard / wandb as text."""
        with open(self.samples_path, self.samples_mode, encoding="utf-8") as f:
            for i, s in enumerate(samples):
                f.write(json.dumps({"step": step, "index": i, **s}, ensure_ascii=False) + "\n")
        self.samples_mode = "a"
        for i, s in enumerate(samples):
            self.echo(sample_line(i, step, s))
        text = "\n\n".join(f"**{i}** `{s['prompt'][-200:]}`\n\n→ {s['reply']}" for i, s in enumerate(samples))
        if self.tb is not None:
            self.tb.add_text("samples", text, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({"samples": text}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
