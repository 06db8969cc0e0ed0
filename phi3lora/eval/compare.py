"""Base vs adapter on held-out chats: what the adapter changed, in the numbers people report.

For each conversation (an Example as phi3lora.data encodes it for training, train_on="assistant"):
- loss: cross-entropy on the assistant tokens (each reply's tokens and its <|end|>, exactly what training scores),
  summed over every conversation and divided by their count of target tokens; perplexity = exp(loss);
- the last reply is the reference: its prompt (every token before the reply's content, which is
  `Tokenizer.encode_chat(messages[:k], add_generation_prompt=True)`) is answered greedily (`phi3mini.generate`,
  up to max_new_tokens, ending at the checkpoint's stop ids), and the answer is scored against the reference by
  exact match and token F1 (SQuAD's: lower case, punctuation and articles dropped, whitespace words; F1 of the
  bag of words), each the mean over conversations.
The base is the same model with every adapter's scale at 0 (`lora.footprint.adapter_disabled`): one copy of the
weights serves both columns.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter

import numpy as np
import torch

from phi3lora import console
from phi3lora.lora import lora_layers
from phi3lora.lora.footprint import adapter_disabled
from phi3lora.phi3mini import default_stop_ids, generate
from phi3lora.phi3mini.tokenizer import IGNORE

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalization: lower case, no punctuation, no articles, single spaces."""
    return " ".join(ARTICLES.sub(" ", text.lower().translate(PUNCTUATION)).split())


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalized words of prediction against reference's (SQuAD v1.1's f1_score)."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def last_reply(input_ids, labels) -> tuple[list[int], list[int]] | None:
    """(prompt ids, reply ids) of the conversation's last assistant reply: the reply is the last run of target
    tokens (its content and <|end|>), the prompt every token before it. None without a target."""
    target = np.asarray(labels) != IGNORE
    if not target.any():
        return None
    end = int(np.flatnonzero(target)[-1]) + 1
    start = end
    while start > 0 and target[start - 1]:
        start -= 1
    ids = [int(t) for t in input_ids]
    return ids[:start], ids[start:end]


def score(model, tokenizer, examples, max_new_tokens: int, batch_size: int, label: str) -> dict:
    """The model as it is (adapter on or off) over examples: loss sums, target counts and greedy answers."""
    device = next(model.parameters()).device
    stop_ids = default_stop_ids(model, tokenizer)
    meter = console.Meter(f"eval {label}", total=len(examples), unit="ex", after=1.0)
    loss_sum, n_target, answers = 0.0, 0, []
    model.eval()
    for start in range(0, len(examples), batch_size):
        chunk = [examples[i] for i in range(start, min(start + batch_size, len(examples)))]
        width = max(len(ex.input_ids) for ex in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        for n, ex in enumerate(chunk):  # right-padded: causal attention keeps the pads out of every real token
            ids[n, :len(ex.input_ids)] = torch.as_tensor(np.asarray(ex.input_ids, dtype=np.int64))
            labels[n, :len(ex.labels)] = torch.as_tensor(np.asarray(ex.labels, dtype=np.int64))
        with torch.inference_mode():
            loss_sum += float(model(ids.to(device), labels=labels.to(device), loss_reduction="sum"))
        n_target += sum(ex.n_target for ex in chunk)
        prompts = [last_reply(ex.input_ids, ex.labels)[0] for ex in chunk]
        p_width = max(len(p) for p in prompts)
        p_ids = torch.full((len(chunk), p_width), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), p_width), dtype=torch.long)
        for n, p in enumerate(prompts):  # left-padded: every row's answer starts in the same column
            p_ids[n, p_width - len(p):] = torch.tensor(p)
            mask[n, p_width - len(p):] = 1
        rows = generate(model, p_ids.to(device), max_new_tokens, stop_ids=stop_ids, attention_mask=mask.to(device))
        answers += [tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]
        meter.update(start + len(chunk))
    meter.close()
    return {"loss_sum": loss_sum, "n_target": n_target, "answers": answers}


def summarize(scored: dict, references: list[str]) -> dict:
    loss = scored["loss_sum"] / max(scored["n_target"], 1)
    exact = [float(normalize(a) == normalize(r)) for a, r in zip(scored["answers"], references)]
    f1 = [token_f1(a, r) for a, r in zip(scored["answers"], references)]
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "exact_match": float(np.mean(exact)),
            "token_f1": float(np.mean(f1)), "n_target_tokens": scored["n_target"]}


def compare(model, tokenizer, examples, max_new_tokens: int = 64, batch_size: int = 8, show: int = 3) -> dict:
    """Base vs adapter (or the model alone when it has no adapter) on examples (a list of Example or a TokenSet
    of chats) -> the numbers, per column, and up to `show` examples whose greedy answers differ."""
    examples = [ex for ex in (examples[i] for i in range(len(examples))) if last_reply(ex.input_ids, ex.labels)]
    if not examples:
        raise ValueError("no conversation with an assistant reply to evaluate")
    replies = [last_reply(ex.input_ids, ex.labels) for ex in examples]
    references = [tokenizer.decode(reply, skip_special_tokens=True).strip() for _, reply in replies]
    has_adapter = any(m.has_lora for _, m in lora_layers(model))
    columns = {}
    if has_adapter:
        with adapter_disabled(model):
            columns["base"] = score(model, tokenizer, examples, max_new_tokens, batch_size, "base")
        columns["adapter"] = score(model, tokenizer, examples, max_new_tokens, batch_size, "adapter")
    else:
        columns["base"] = score(model, tokenizer, examples, max_new_tokens, batch_size, "base")
    result = {"n_examples": len(examples), "max_new_tokens": max_new_tokens,
              **{name: summarize(s, references) for name, s in columns.items()}}
    if has_adapter:
        differ = [i for i in range(len(examples)) if columns["base"]["answers"][i] != columns["adapter"]["answers"][i]]
        result["n_differ"] = len(differ)
        result["examples"] = [{
            "source": examples[i].source,
            "prompt": tokenizer.decode(replies[i][0], skip_special_tokens=True).strip(),
            "reference": references[i], "base": columns["base"]["answers"][i],
            "adapter": columns["adapter"]["answers"][i]} for i in differ[:show]]
    return result


def clip(text: str, width: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def format_table(result: dict) -> str:
    """The comparison as a few lines of text: one row per number, one column per model; then the examples."""
    names = [n for n in ("base", "adapter") if n in result]
    def ppl(x: float) -> str:  # an untrained model's perplexity runs to many digits
        return f"{x:,.2f}" if x < 1e6 else f"{x:.3e}"

    rows = [("loss", "{:.4f}".format, "loss"), ("perplexity", ppl, "perplexity"),
            ("exact match", "{:.1%}".format, "exact_match"), ("token F1", "{:.3f}".format, "token_f1")]
    lines = [f"{'':<14}" + "".join(f"{n:>12}" for n in names)]
    for title, fmt, key in rows:
        lines.append(f"{title:<14}" + "".join(f"{fmt(result[n][key]):>12}" for n in names))
    lines.append(f"({result['n_examples']} conversations, {result[names[0]]['n_target_tokens']:,} assistant tokens; "
                 f"answers: greedy, at most {result['max_new_tokens']} tokens, against each last reply)")
    if "n_differ" in result:
        lines.append(f"base and adapter answer differently on {result['n_differ']} of {result['n_examples']}"
                     + (":" if result["examples"] else ""))
        for ex in result["examples"]:
            lines += [f"  {ex['source']}", f"    prompt     {clip(ex['prompt'][-200:])}",
                      f"    reference  {clip(ex['reference'])}", f"    base       {clip(ex['base'])}",
                      f"    adapter    {clip(ex['adapter'])}"]
    return "\n".join(lines)
