"""lm-evaluation-harness's model type "phi3lora": any task lm-eval runs, on our Phi-3 with or without an adapter.

    import phi3lora.eval, lm_eval
    lm_eval.simple_evaluate(model="phi3lora", model_args="pretrained=microsoft/Phi-3-mini-4k-instruct,"
                            "adapter=out/run/adapter,dtype=bfloat16", tasks=["arc_easy"])

Importing phi3lora.eval registers the class with lm-eval's own decorator (lm-eval 0.4 has no plugin discovery).
The requests are scored the way lm-eval's `hf` model scores them, so the numbers agree with
`model="hf", model_args="pretrained=...,peft=<the adapter exported to PEFT>"` (tests/test_eval.py checks it):
- loglikelihood: context + continuation cut to the last max_length + 1 tokens, the continuation's log-probs summed
  (log_softmax in fp32), and whether each continuation token is the argmax. Requests run longest first, left-padded
  with an attention mask, and only the continuation's positions go through lm_head (logits_to_keep): a batch of
  Phi-3-mini rows never holds (B, T, 32064) logits.
- loglikelihood_rolling: the text in disjoint windows of max_length tokens, each after one token of context (the
  first after the prefix token), as lm_eval.utils.get_rolling_token_windows makes them; the windows' sums added.
- generate_until: `phi3mini.generate` (prefill, then a KV cache), left-padded batches of the same generation
  settings, up to max_gen_toks new tokens, ending at the checkpoint's stop ids; the text is cut at the first stop
  string. One row alone also stops as soon as a stop string appears; rows of a batch run to their stop id or
  max_gen_toks and are cut after (the same text, more steps).
- chat templates (`apply_chat_template=True`): our tokenizer's chat format (phi3mini/chat_format.py), the text
  transformers renders from the checkpoint's template.
No BOS is added (Phi-3's chat format has none; add_bos_token=True in model_args adds it), as transformers'
Phi-3 tokenizer encodes.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from phi3lora import console
from phi3lora.phi3mini import default_stop_ids, generate

from .models import EvalError, load

# what lm-eval itself passes to every model (simple_evaluate's additional_config); not ours to act on
LM_EVAL_KEYS = ("max_batch_size",)


class StopGeneration(Exception):
    """Raised from generate's on_token when a single row's text reaches a stop string."""


@register_model("phi3lora")
class Phi3LM(TemplateLM):
    """model_args: pretrained ("tiny", a folder or a Hub id), adapter (folder, ours or PEFT), dtype, device
    (phi3mini.hub's choices), quantize (none | nf4), merge, batch_size, max_length (default: the model's
    max_position_embeddings), max_gen_toks (default 256, as lm-eval's hf), add_bos_token."""

    def __init__(self, pretrained: str = "tiny", adapter: str | None = None, dtype: str = "auto",
                 device: str | None = "auto", quantize: str = "none", merge: bool = False, batch_size=1,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool = False, **kwargs):
        super().__init__()
        unknown = sorted(k for k in kwargs if k not in LM_EVAL_KEYS)
        if unknown:
            raise EvalError(f"model_args: unknown key(s) {', '.join(unknown)} for model phi3lora (known: pretrained, "
                            "adapter, dtype, device, quantize, merge, batch_size, max_length, max_gen_toks, "
                            "add_bos_token)")
        # lm-eval's model_args parser reads the text "none" as None
        self.model, self.tokenizer = load(str(pretrained), str(adapter) if adapter else None, str(device or "auto"),
                                          str(dtype or "auto"), str(quantize or "none"), merge=bool(merge))
        self.pretrained, self.adapter = str(pretrained), adapter
        self._device = next(self.model.parameters()).device
        self._batch_size = parse_batch_size(batch_size)
        self._max_length = int(max_length or self.model.config.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = bool(add_bos_token)
        self.stop_ids = default_stop_ids(self.model, self.tokenizer)
        self._rank, self._world_size = 0, 1

    # ----- what TemplateLM asks of a model ----------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # the context of a continuation that has none (and of a rolling text's first window): BOS, else EOS
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else bool(add_special_tokens) and self.add_bos_token
        if bos and self.tokenizer.bos_id is not None and string.startswith(self.tokenizer.special_tokens["bos"]):
            bos = False  # the text already starts with its BOS
        ids = self.tokenizer.encode(string, add_bos=bos and self.tokenizer.bos_id is not None)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The messages in our chat format; add_generation_prompt=False continues the last (assistant) message,
        as transformers' continue_final_message: its text left open, without <|end|>."""
        tok = self.tokenizer
        last_open = not add_generation_prompt and chat_history and chat_history[-1].get("content")
        closed = chat_history[:-1] if last_open else [m for m in chat_history if m.get("content")]
        try:
            text = "".join(tok.render_message(*turn) for turn in tok.check_chat(closed))
            if last_open:
                role, content = chat_history[-1]["role"], chat_history[-1]["content"]
                tok.check_chat([{"role": role, "content": content}])
                return text + tok.render_message(role, content).rsplit("<|end|>", 1)[0]
        except ValueError as e:
            raise EvalError(f"chat template: {e}") from None
        return text + (tok.chat_format.generation_prompt if add_generation_prompt else "")

    # ----- scoring --------------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) -> (sum of the continuation's
        log-probs, whether greedy decoding gives it), in the requests' order."""
        longest = max((len(cont) for _, _, cont in requests), default=0)
        if longest > self.max_length:
            raise EvalError(f"a continuation of {longest} tokens is longer than max_length {self.max_length}")
        # each row: the last max_length + 1 tokens of context + continuation, without its last token
        rows = [((ctx + cont)[-(self.max_length + 1):][:-1], cont) for _, ctx, cont in requests]
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), rows[i][0]))  # longest first
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        bar = tqdm(total=len(rows), desc="loglikelihood requests", disable=disable_tqdm)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            ids, mask = self._left_padded([rows[i][0] for i in chunk])
            keep = max(len(rows[i][1]) for i in chunk)
            with torch.inference_mode():
                logits = self.model(ids, attention_mask=mask, position_ids=positions(mask), logits_to_keep=keep)
            logprobs = F.log_softmax(logits.float(), dim=-1)  # (B, keep, V)
            for row, i in enumerate(chunk):
                cont = torch.tensor(rows[i][1], device=self.device)
                lp = logprobs[row, keep - len(cont):]  # (len(cont), V): the positions that predict cont
                greedy = bool((lp.argmax(dim=-1) == cont).all())
                results[i] = (float(lp.gather(-1, cont[:, None]).sum()), greedy)
                request = requests[i][0]
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, results[i])
            bar.update(len(chunk))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, scores):
            totals[n] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args = [req.args for req in requests]
        groups: dict[str, list[int]] = {}  # one generation setting per batch
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(args)
        bar = tqdm(total=len(args), desc="generate_until requests", disable=disable_tqdm)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for members in groups.values():
            kw = normalize_gen_kwargs(dict(args[members[0]][1]), self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            max_new = int(kw.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise EvalError(f"max_gen_toks {max_new} leaves no room for a prompt in max_length {self.max_length}")
            sampling = dict(temperature=float(kw.get("temperature") or 0.0) if kw.get("do_sample") else 0.0,
                            top_p=float(kw.get("top_p") or 1.0), top_k=int(kw.get("top_k") or 0))
            prompts = {i: self.tok_encode(args[i][0], left_truncate_len=self.max_length - max_new) for i in members}
            order = sorted(members, key=lambda i: (-len(prompts[i]), args[i][0]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                new = self._generate([prompts[i] for i in chunk], max_new, until, sampling)
                for i, ids in zip(chunk, new):
                    out[i] = postprocess_generated_text(self.tok_decode(ids), until, None)
                    self.cache_hook.add_partial("generate_until", args[i], out[i])
                bar.update(len(chunk))
        bar.close()
        return out

    # ----- helpers ----------------------------------------------------------------------------------------------
    def _left_padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """rows of ids -> (ids (B, T), attention mask (B, T)), left-padded with the pad id to the longest row."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for n, r in enumerate(rows):
            if r:
                ids[n, width - len(r):] = torch.tensor(r)
                mask[n, width - len(r):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _generate(self, prompts: list[list[int]], max_new: int, until: list[str], sampling: dict) -> list[list[int]]:
        if len(prompts) == 1:  # alone: stop as soon as the text holds a stop string
            got: list[int] = []

            def on_token(token: int) -> None:
                got.append(token)
                text = self.tok_decode(got)
                if any(s and s in text for s in until):
                    raise StopGeneration

            try:
                return [generate(self.model, prompts[0], max_new, stop_ids=self.stop_ids, on_token=on_token,
                                 **sampling)]
            except StopGeneration:
                return [got]
        ids, mask = self._left_padded(prompts)
        return generate(self.model, ids, max_new, stop_ids=self.stop_ids, attention_mask=mask, **sampling)

    def get_model_info(self) -> dict:
        return {"model": self.pretrained, "adapter": self.adapter, "dtype": str(next(self.model.parameters()).dtype)}


def positions(mask: torch.Tensor) -> torch.Tensor:
    # mask (B, T) of 1 on real tokens -> position ids (B, T) counted over the real tokens only (pads: 0, unused)
    return (mask.cumsum(-1) - 1).clamp(min=0)


def parse_batch_size(value) -> int:
    """lm-eval's batch_size: an int, or "auto" / "auto:N" (no memory probing here: 16 requests a batch)."""
    text = str(value)
    if text.startswith("auto"):
        console.info("batch_size auto: 16 requests a batch (set batch_size=N to choose)")
        return 16
    try:
        n = int(text)
    except ValueError:
        raise EvalError(f"batch_size {value!r}: a whole number, or auto") from None
    if n < 1:
        raise EvalError(f"batch_size {n}: at least 1")
    return n
