"""Pictures of what Phi-3 does with one prompt, and of what a LoRA adapter changed: an HTML page and its PNGs.

    python probe.py --model tiny --prompt "hello world" --out report/
    python probe.py --model microsoft/Phi-3-mini-4k-instruct --adapter out/my-run/adapter \\
        --chat --prompt "What is LoRA?" --reply "A low-rank update." --out report/

Writes into --out (created if needed; files of the same names are replaced, others are left alone):
  attention_layer<N>.png   attention probabilities of the chosen heads, queries down, keys across
  logit_lens.png           each layer's top next token through the final norm + lm_head
  adapter_norms.png        (--adapter) ‖s·B·A‖ per adapted module, Frobenius and spectral
  adapter_effect.png       (--adapter) adapted − base log-probability of each token, and KL per position
  index.html               all of them, each with a few lines on how to read it, the token list and the top-k tables
The top-k table is at the end of the prompt (the last prompt token; with --chat, the <|assistant|> token that
starts the reply, also with --reply) or at --position. With --reply the conversation ends at the reply's <|end|>:
no <|endoftext|> is appended (a training example's closing token, of no interest here).
The numbers come from phi3lora.interp.internals (one forward pass with the attention recorded, one without the adapter);
the pictures need matplotlib (pip install 'phi3-lora[viz]').
"""
from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path

import torch

from phi3lora import console
from phi3lora.cli.options import add_model_flags
from phi3lora.console import ArgumentParser
from phi3lora.lora import footprint
from phi3lora.phi3mini import Phi3, Tokenizer, hub
from phi3lora.interp import viz
from phi3lora.interp.internals import capture, logit_lens
from phi3lora.atomic import write_file

class ProbeError(Exception):
    """A problem the user can fix: printed as `error: ...`, exit code 2."""


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description="Write pictures of attention, the logit lens and a LoRA adapter's "
                                            "footprint for one prompt (index.html + PNGs).")
    add_model_flags(p)
    p.add_argument("--adapter", help="LoRA adapter folder (ours or PEFT): adds its norms and base-vs-adapted pictures")
    p.add_argument("--prompt", required=True, help="the text to run")
    p.add_argument("--chat", action="store_true", help="render --prompt as a user message in Phi-3's chat format")
    p.add_argument("--reply", help="with --chat: an assistant reply to append (its tokens are scored)")
    p.add_argument("--out", required=True, help="folder for index.html and the PNGs")
    p.add_argument("--layers", help="comma-separated layers for attention maps (default: first, middle, last)")
    p.add_argument("--heads", default="auto",
                   help="comma-separated heads, 'all', or 'auto' (all up to 8 heads, else the first 8)")
    p.add_argument("--top-k", type=int, default=5, help="tokens per position in the logit-lens table")
    p.add_argument("--position", type=int,
                   help="token number (as the page lists them; negative: from the end) for the top-k table "
                        "(default: the end of the prompt)")
    p.add_argument("--max-tokens", type=int, default=64, help="keep the last this many tokens of the input")
    args = p.parse_args(argv)
    if not args.prompt.strip():
        p.error("--prompt is empty")
    if args.reply is not None and not args.chat:
        p.error("--reply needs --chat")
    if args.top_k < 1 or args.max_tokens < 2:
        p.error("--top-k must be >= 1 and --max-tokens >= 2")
    return args


def int_list(text: str, flag: str, n: int) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ProbeError(f"{flag} {text!r}: expected comma-separated integers") from None
    bad = [v for v in values if not 0 <= v < n]
    if bad or not values:
        raise ProbeError(f"{flag} {text!r}: choose from 0..{n - 1}")
    return values


def load(args) -> tuple[Phi3, Tokenizer]:
    try:
        model, tokenizer = hub.load(args.model, args.device, args.dtype)
    except hub.LoadError as e:
        raise ProbeError(str(e)) from None
    if args.adapter:
        from phi3lora import lora
        try:
            lora.load_adapter(model, args.adapter)
        except (FileNotFoundError, ValueError, KeyError, RuntimeError, OSError) as e:
            raise ProbeError(f"--adapter {args.adapter}: {e}") from None
    return model.eval(), tokenizer


def input_ids(args, tokenizer: Tokenizer) -> tuple[list[int], int, int]:
    """The token ids to run (the last --max-tokens), how many were cut from the front, and the position of the
    top-k table in the ids kept: --position, else the prompt's last token."""
    try:
        if args.chat:
            messages = [{"role": "user", "content": args.prompt}]
            prompt = tokenizer.encode_chat(messages, add_generation_prompt=True)  # ends with <|assistant|>
            ids = list(prompt)
            if args.reply:
                # encode_chat without a generation prompt closes the conversation with the eos token, as a
                # training example ends: the table would be read there. Up to the reply's <|end|> only.
                ids = tokenizer.encode_chat(messages + [{"role": "assistant", "content": args.reply}])
                eos = tokenizer.encode(tokenizer.eos_token)
                ids = ids[:-len(eos)] if ids[-len(eos):] == eos else ids
        else:
            ids = prompt = tokenizer.encode(args.prompt)
    except ValueError as e:
        raise ProbeError(str(e)) from None
    cut = max(0, len(ids) - args.max_tokens)
    if args.position is None:
        at = len(prompt) - 1 - cut
        if at < 0:
            raise ProbeError(f"--max-tokens {args.max_tokens} cuts off the whole prompt ({len(ids)} tokens with the "
                             "reply): raise it, or choose a --position")
    else:
        n = len(ids) - cut
        at = args.position + n if args.position < 0 else args.position
        if not 0 <= at < n:
            raise ProbeError(f"--position {args.position}: choose from 0..{n - 1} (or -{n}..-1)")
    return list(ids)[cut:], cut, at


def choose(args, model: Phi3) -> tuple[list[int], list[int]]:
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    layers = (int_list(args.layers, "--layers", n_layers) if args.layers
              else sorted({0, n_layers // 2, n_layers - 1}))
    if args.heads == "all":
        heads = list(range(n_heads))
    elif args.heads == "auto":
        heads = list(range(min(n_heads, 8)))
    else:
        heads = int_list(args.heads, "--heads", n_heads)
    return layers, heads


# ----- the report ----------------------------------------------------------------------------------------------------
def table(header: list[str], rows: list[list[str]]) -> str:
    cells = lambda tag, row: "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in row)  # noqa: E731
    return ("<table><tr>" + cells("th", header) + "</tr>"
            + "".join("<tr>" + cells("td", r) + "</tr>" for r in rows) + "</table>")


def attention_section(model, ids, labels, layers, heads, out: Path) -> list[str]:
    with torch.no_grad(), capture(model, attention=True, layers=layers) as cap:
        model(ids)
    parts = ["<h2>Attention</h2>", how(
        "One map per head. Row: the token that reads (query); column: the token it reads from (key). A row sums to "
        "1: a bright cell is where that token's head takes its information from. Only the lower triangle has colour "
        "(a token sees itself and the tokens before it); a bright first column is a head with nothing to do "
        "(it parks its attention on the first token).")]
    for layer in layers:
        name = f"attention_layer{layer}.png"
        viz.attention_figure(cap.attentions[layer][0, heads], labels, layer, heads, out / name)
        # shown at full size (scrolling sideways when wider than the page): shrunk, the token labels are unreadable
        parts.append(f'<div class="wide"><img src="{name}" alt="attention, layer {layer}"></div>')
    return parts


def how(text: str) -> str:
    """A few lines under a heading saying how to read the picture or table."""
    return f'<p class="how">{html.escape(text)}</p>'


def lens_section(model, tokenizer, ids, labels, top_k: int, at: int, out: Path) -> list[str]:
    lens = logit_lens(model, ids, k=top_k)
    top_labels = [viz.token_labels(tokenizer, row[:, 0].tolist()) for row in lens.top_ids[:, 0]]  # [L][T]
    viz.logit_lens_figure(lens.layers, lens.top_probs[:, 0, :, 0], top_labels, labels, lens.final_probs[:, 0],
                          out / "logit_lens.png")
    rows = [[f"layer {layer}"] + [f"{tok} {p:.2f}" for tok, p in
                                  zip(viz.token_labels(tokenizer, lens.top_ids[li, 0, at].tolist()),
                                      lens.top_probs[li, 0, at].tolist())]
            for li, layer in enumerate(lens.layers)]
    return ["<h2>Logit lens</h2>", how(
                "Rows: layers; columns: input tokens. Each cell names the token that layer would predict next if the "
                "model stopped there (its residual stream read through the final norm and lm_head). The colour is "
                "the probability that layer gives the model's final prediction: the row where it turns bright is "
                "where the answer forms."),
            '<img src="logit_lens.png" alt="logit lens">',
            f"<p id=\"top-k\">Top {top_k} next tokens after token {at} <code>{html.escape(labels[at])}</code>, per "
            "layer, with their probabilities (the last layer's row is the model's own prediction):</p>",
            table(["layer"] + [f"#{i + 1}" for i in range(top_k)], rows)]


def adapter_section(model, tokenizer, ids, labels, out: Path) -> list[str]:
    norms = footprint.adapter_norms(model)
    viz.adapter_norms_figure(norms, out / "adapter_norms.png")
    effect = footprint.adapter_effect(model, ids)
    viz.adapter_effect_figure(effect.logprob_change[0], effect.kl[0], labels, out / "adapter_effect.png")
    changed = [[str(t), labels[t], *viz.token_labels(tokenizer, [effect.base_top[0, t], effect.adapted_top[0, t]]),
                f"{float(effect.kl[0, t]):.4f}"]
               for t in range(ids.shape[1]) if effect.base_top[0, t] != effect.adapted_top[0, t]]
    return ["<h2>What the adapter changed</h2>", how(
                "Norms: ‖s·B·A‖, the size of the change the adapter adds to each weight matrix (Frobenius: all of it; "
                "spectral: its largest direction), per block and module. Tall bars are where the adapter acts."),
            '<img src="adapter_norms.png" alt="adapter norms">',
            table(["module", "rank", "Frobenius", "spectral"],
                  [[n.name, n.rank, f"{n.frobenius:.4g}", f"{n.spectral:.4g}"] for n in norms]),
            how("Effect, top: for each token, its log-probability given the tokens before it, with the adapter "
                "minus without; green bars are tokens the adapter made likelier. Bottom: KL divergence between the "
                "next-token distributions with and without the adapter at each position: how much it changes the "
                "prediction there."),
            '<img src="adapter_effect.png" alt="adapter effect">',
            f"<p>Positions where the top next token differs ({len(changed)} of {ids.shape[1]}):</p>",
            table(["position", "token", "base top", "adapted top", "KL"], changed)]


def write_report(args, model: Phi3, tokenizer: Tokenizer, out: Path) -> Path:
    ids_list, cut, at = input_ids(args, tokenizer)
    device = next(model.parameters()).device
    ids = torch.tensor([ids_list], device=device)  # (1, T)
    labels = viz.token_labels(tokenizer, ids_list)
    layers, heads = choose(args, model)
    parts = [f"<h1>phi3-lora probe</h1><p>model <code>{html.escape(args.model)}</code>"
             + (f", adapter <code>{html.escape(args.adapter)}</code>" if args.adapter else "")
             + f"; {len(ids_list)} tokens" + (f" (the first {cut} cut off by --max-tokens)" if cut else "")
             + "</p>", "<p>Tokens (numbered from 0): "
             + " ".join(f"<sub>{i}</sub><code>{html.escape(t)}</code>" for i, t in enumerate(labels)) + "</p>"]
    parts += attention_section(model, ids, labels, layers, heads, out)
    parts += lens_section(model, tokenizer, ids, labels, args.top_k, at, out)
    if args.adapter:
        parts += adapter_section(model, tokenizer, ids, labels, out)
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}img{max-width:100%;display:block;"
             "margin:1em 0}.wide{overflow-x:auto}.wide img{max-width:none}.how{color:#444;max-width:60em}"
             "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:2px 6px}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>probe: {html.escape(args.model)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    return write_file(out / "index.html", page)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists() and not out.is_dir():
            raise ProbeError(f"--out {out} is a file, not a folder")
        model, tokenizer = load(args)
        out.mkdir(parents=True, exist_ok=True)
        index = write_report(args, model, tokenizer, out)
    except (ProbeError, viz.VizError) as e:
        console.error(str(e))
        return 2
    except OSError as e:
        console.error(f"--out {out}: {e.strerror or e}")
        return 2
    console.info(f"wrote {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
