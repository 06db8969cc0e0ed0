"""Pictures of what phi3mini.probe measures, as PNG files (matplotlib, the optional `[viz]` extra).

Each function takes plain tensors and labels, writes one figure to `path` (atomically, through phi3mini.atomic)
and returns the path. Token labels come from `token_labels`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from phi3lora.atomic import write_file

MAX_LABEL = 10  # characters of a token shown on an axis


class VizError(RuntimeError):
    """matplotlib is missing: the message says what to install."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise VizError("the pictures need matplotlib: pip install 'phi3-lora[viz]' (or pip install matplotlib)") \
            from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def token_labels(tokenizer, ids) -> list[str]:
    """Readable, short labels for token ids: SentencePiece's word-start mark '▁' as '␣', byte tokens <0x0A> as
    '\\n', others as they are, cut to MAX_LABEL characters."""
    out = []
    for i in ids:
        tok = tokenizer.id_to_token(int(i)) or f"#{int(i)}"
        if tok.startswith("<0x") and tok.endswith(">") and len(tok) == 6:
            tok = repr(chr(int(tok[3:5], 16)))[1:-1]
        tok = tok.replace("▁", "␣")
        out.append(tok if len(tok) <= MAX_LABEL else tok[:MAX_LABEL - 1] + "…")
    return out


def _save(fig, plt, path) -> Path:
    try:
        return write_file(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    finally:
        plt.close(fig)


PAGE_INCHES = 12.0  # a figure wider than this is shown shrunk on a page (index.html: 1200 px at the PNGs' 110 dpi)
TOKEN_INCHES = 0.2  # per token on an attention map's axes: room for an 8 pt label (about 0.15 in tall) and a gap
LABEL_PT = 8  # token labels on the attention maps
MAX_LABELLED = 64  # tokens labelled along an axis: a longer axis labels every k-th token (a figure stays < 2^16 px)


def attention_plot(probs: torch.Tensor, labels: list[str], layer: int, heads: list[int]):
    """The figure attention_figure saves (for tests and notebooks): maps of TOKEN_INCHES per labelled token, so a
    label never runs into its neighbour whatever T is, as many maps side by side as fit in PAGE_INCHES (one for a
    long prompt), the rest below."""
    plt = _pyplot()
    H, T, S = probs.shape
    side = max(2.6, TOKEN_INCHES * min(max(T, S), MAX_LABELLED))
    step_q, step_k = -(-T // MAX_LABELLED), -(-S // MAX_LABELLED)
    label_room = 0.09 * MAX_LABEL + 0.5  # inches: the longest label at LABEL_PT, and the axis title
    cols = max(1, min(H, 4, int((PAGE_INCHES - label_room - 1.2) // (side + 0.4))))  # 1.2: the colour bar
    rows = -(-H // cols)
    fig, axes = plt.subplots(rows, cols, figsize=((side + 0.4) * cols + label_room + 1.2, (side + 0.5) * rows
                                                  + label_room), squeeze=False)
    q_labels, k_labels = labels[-T:], labels[-S:]
    for n, ax in enumerate(axes.flat):
        if n >= H:
            ax.axis("off")
            continue
        im = ax.imshow(probs[n].float().cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto",
                       interpolation="nearest")
        ax.set_title(f"layer {layer}, head {heads[n]}", fontsize=10)
        ax.set_xticks(range(0, S, step_k), k_labels[::step_k], rotation=90, fontsize=LABEL_PT)
        ax.set_yticks(range(0, T, step_q), q_labels[::step_q] if n % cols == 0 else [], fontsize=LABEL_PT)
        if n % cols == 0:  # query labels on the first column only: they would run into the map on their left
            ax.set_ylabel("query (attends from)", fontsize=9)
        if n // cols == rows - 1 or n + cols >= H:
            ax.set_xlabel("key (attends to)", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=min(0.6, 4.0 / rows), label="attention probability")
    return fig


def attention_figure(probs: torch.Tensor, labels: list[str], layer: int, heads: list[int], path) -> Path:
    """probs (H, T, S) for one sequence and the listed heads (H = len(heads)); one map per head, queries down,
    keys across, labelled with the tokens (key labels: the last S of `labels`)."""
    plt = _pyplot()
    return _save(attention_plot(probs, labels, layer, heads), plt, path)


def logit_lens_figure(layers: list[int], top_probs: torch.Tensor, top_labels: list[list[str]], labels: list[str],
                      final_probs: torch.Tensor, path) -> Path:
    """One sequence: rows are layers, columns positions. Each cell names the layer's top next token and is
    coloured by the probability it gives the model's final prediction (how early the answer forms).
    top_probs (L, T) of the top token, top_labels[L][T], final_probs (L, T)."""
    plt = _pyplot()
    L, T = top_probs.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.62 * T + 1.5), max(2.2, 0.42 * L + 1.4)))
    # the colour scale ends at the largest value shown: a random or early model gives every token little mass
    vmax = max(float(final_probs.max()), 1e-3)
    im = ax.imshow(final_probs.float().cpu().numpy(), cmap="magma", vmin=0.0, vmax=vmax, aspect="auto",
                   interpolation="nearest")
    for li in range(L):
        for t in range(T):
            value = float(final_probs[li, t])
            ax.text(t, li, top_labels[li][t][:7], ha="center", va="center", fontsize=6,
                    color="black" if value > 0.6 * vmax else "white")
    ax.set_xticks(range(T), labels[-T:], rotation=90, fontsize=7)
    ax.set_yticks(range(L), [f"layer {i}" for i in layers], fontsize=7)
    ax.set_xlabel("input token (the prediction is for the next one)", fontsize=8)
    ax.set_title("logit lens: each layer's top next token; colour: its probability of the final prediction",
                 fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8, label="p(final prediction)")
    return _save(fig, plt, path)


def adapter_norms_figure(norms, path) -> Path:
    """norms: lora.footprint.AdapterNorm list. Bars per block (x) and module (colour): Frobenius above, spectral
    below."""
    plt = _pyplot()
    kinds = list(dict.fromkeys(n.name.rsplit(".", 1)[-1] for n in norms))
    group_of = lambda n: n.layer if n.layer is not None else n.name.removeprefix("model.")  # noqa: E731
    groups = list(dict.fromkeys(group_of(n) for n in norms))
    width = 0.8 / len(kinds)
    fig, axes = plt.subplots(2, 1, figsize=(max(5.0, 0.5 * len(groups) * len(kinds) + 2.0), 5.2), sharex=True)
    for k, kind in enumerate(kinds):
        rows = [(groups.index(group_of(n)), n) for n in norms
                if n.name.rsplit(".", 1)[-1] == kind]
        x = [g + (k - (len(kinds) - 1) / 2) * width for g, _ in rows]
        axes[0].bar(x, [n.frobenius for _, n in rows], width, label=kind)
        axes[1].bar(x, [n.spectral for _, n in rows], width, label=kind)
    axes[0].set_ylabel("‖s·B·A‖ Frobenius")
    axes[1].set_ylabel("‖s·B·A‖ spectral")
    axes[0].set_title("what the adapter changed, per module", fontsize=10)
    axes[0].legend(fontsize=7, ncol=min(4, len(kinds)))
    axes[1].set_xticks(range(len(groups)), [f"layer {g}" if isinstance(g, int) else g for g in groups],
                       rotation=90 if len(groups) > 8 else 0, fontsize=7)
    return _save(fig, plt, path)


def adapter_effect_figure(logprob_change: torch.Tensor, kl: torch.Tensor, labels: list[str], path) -> Path:
    """One sequence: logprob_change (T-1,) of each actual next token (adapted minus base) and kl (T,) per position,
    labelled by the token being predicted (bars) and the token read (KL)."""
    plt = _pyplot()
    change = logprob_change.float().cpu()
    T = kl.shape[0]
    fig, axes = plt.subplots(2, 1, figsize=(max(5.0, 0.3 * T + 1.5), 5.2))
    axes[0].bar(range(len(change)), change.numpy(), color=["tab:green" if c >= 0 else "tab:red" for c in change])
    axes[0].axhline(0.0, color="grey", linewidth=0.5)
    axes[0].set_xticks(range(len(change)), labels[-T + 1:] if T > 1 else [], rotation=90, fontsize=7)
    axes[0].set_ylabel("Δ log p(token)", fontsize=8)
    axes[0].set_title("adapted − base log-probability of each token (green: the adapter made it likelier)",
                      fontsize=9)
    axes[1].bar(range(T), kl.float().cpu().numpy(), color="tab:purple")
    axes[1].set_xticks(range(T), labels[-T:], rotation=90, fontsize=7)
    axes[1].set_ylabel("KL(adapted ‖ base), nats", fontsize=8)
    axes[1].set_xlabel("position (the distribution predicts the token after it)", fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)
