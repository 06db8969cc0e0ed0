"""Memory that LoRA fine-tuning in bf16 needs for each model of the Phi family: computed from the presets, not
measured (no GPU here).

Counted, per model, with the README's configuration (configs/phi3-mini-lora.toml: r 16 on qkv_proj, o_proj,
gate_up_proj, down_proj; train.py keeps LoRA weights in fp32 and the base in bf16):
  weights      every base parameter in bf16 (2 bytes; a tied embedding counted once)
  lora state   LoRA parameters in fp32 with their gradients and Adam's two moments (4 + 4 + 8 bytes each)
  activations  with activation checkpointing (train.py's default): each layer's input hidden state kept in bf16
               for the backward, tokens x layers x hidden x 2 bytes, at --tokens tokens per micro-batch
Not counted: the one layer recomputed at a time during the backward, the loss's working set (chunked: it never
holds the whole batch's logits), the CUDA context and the allocator's slack. Treat the total as a floor.

    python bench/family_memory.py                 # a table, then one JSON line
    python bench/family_memory.py --tokens 4096 --r 32
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi3lora import lora  # noqa: E402
from phi3lora.phi3mini import Phi3, Phi3Config  # noqa: E402
from phi3lora.phi3mini.presets import PRESETS  # noqa: E402

TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
GB = 1e9


def estimate(name: str, r: int, tokens: int) -> dict:
    config = Phi3Config.from_name(name)
    with torch.device("meta"):
        model = Phi3(config)
        lora.inject(model, lora.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    params = {id(p): p for p in model.parameters()}.values()  # a tied matrix once
    n_base = sum(p.numel() for p in params if not p.requires_grad)
    n_lora = sum(p.numel() for p in params if p.requires_grad)
    row = {"model": name, "hub_id": PRESETS[name].hub_id, "params": n_base, "lora_params": n_lora,
           "weights_gb": 2 * n_base / GB, "lora_state_gb": 16 * n_lora / GB,
           "activations_gb": tokens * config.num_hidden_layers * config.hidden_size * 2 / GB}
    row["total_gb"] = row["weights_gb"] + row["lora_state_gb"] + row["activations_gb"]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per micro-batch (default 2048)")
    args = parser.parse_args(argv)
    rows = [estimate(name, args.r, args.tokens) for name in PRESETS if PRESETS[name].hub_id]
    print(f"LoRA r={args.r} on {', '.join(TARGETS)}; bf16 base, fp32 LoRA + Adam; {args.tokens} tokens per "
          "micro-batch, activation checkpointing (computed, not measured)")
    print(f"{'model':18} {'params':>8} {'LoRA':>7} {'weights':>8} {'LoRA+Adam':>9} {'acts':>6} {'total':>7}")
    for x in rows:
        print(f"{x['model']:18} {x['params'] / 1e9:7.2f}B {x['lora_params'] / 1e6:6.1f}M {x['weights_gb']:6.2f}GB "
              f"{x['lora_state_gb']:7.2f}GB {x['activations_gb']:4.2f}GB {x['total_gb']:5.2f}GB")
    print(json.dumps({"r": args.r, "tokens": args.tokens, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
