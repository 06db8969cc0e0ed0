"""Memory per GPU of LoRA fine-tuning under torchrun, DDP and FSDP2, for Phi-3-mini and Phi-3-medium: computed
from the presets' parameter counts (bench/family_memory.py's counts and assumptions), not measured.

Per GPU, N processes:
  DDP   the whole bf16 base, the LoRA state (fp32 weights, gradients, Adam's two moments: 16 bytes per LoRA
        parameter) plus DDP's gradient buckets (4 more bytes), and one micro-batch's activations
  FSDP  the base sharded: / N (train.py --fsdp, training/distributed.wrap_fsdp); the LoRA state whole on every GPU
        (FSDP leaves the adapter out, < 1% of the model) plus the flat buffer its gradients are averaged in (4
        bytes per LoRA parameter); plus what is gathered whole at a time: the root unit (embeddings, lm_head,
        final norm), which FSDP2 keeps gathered through the step, and two decoder blocks (the one computing and the
        one prefetched); and one micro-batch's activations
Activations: activation checkpointing (train.py's default) keeps each layer's input hidden state in bf16 for the
backward: tokens x layers x hidden x 2 bytes. Not counted (as in family_memory.py): the layer being recomputed,
the loss's chunked working set, the CUDA context, NCCL's buffers and the allocator's slack: a floor, not a promise.

    python bench/dist_memory.py                       # r 16, batch 4 x 2048 tokens per GPU, N = 1, 2, 4, 8
    python bench/dist_memory.py --tokens 4096 --gpus 2,8
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from family_memory import GB, estimate  # noqa: E402

from phi3lora.phi3mini import Phi3Config  # noqa: E402

MODELS = ("phi3-mini-4k", "phi3-medium-4k")


def block_params(name: str) -> int:
    """Parameters of one decoder block (what FSDP2 gathers whole, one unit per block)."""
    from phi3lora.phi3mini import Phi3
    with torch.device("meta"):
        model = Phi3(Phi3Config.from_name(name))
    return sum(p.numel() for p in model.model.layers[0].parameters())


def root_params(name: str) -> int:
    """Parameters outside the decoder blocks (embeddings, lm_head, final norm): FSDP2's root unit."""
    from phi3lora.phi3mini import Phi3
    with torch.device("meta"):
        model = Phi3(Phi3Config.from_name(name))
    return sum(p.numel() for n, p in model.named_parameters() if ".layers." not in n)


def per_gpu(name: str, r: int, tokens: int, gpus: int) -> dict:
    row = estimate(name, r, tokens)
    acts = row["activations_gb"]
    lora_whole = row["lora_state_gb"] * 20 / 16  # weights, gradients, Adam's moments + the reduce buffer
    ddp = row["weights_gb"] + lora_whole + acts
    gathered = (2 * block_params(name) + root_params(name)) * 2 / GB
    fsdp = row["weights_gb"] / gpus + lora_whole + gathered + acts
    return {"model": name, "gpus": gpus, "tokens_per_gpu": tokens, "params": row["params"],
            "lora_params": row["lora_params"], "ddp_gb": ddp, "fsdp_gb": fsdp, "activations_gb": acts,
            "fsdp_gathered_gb": gathered}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--tokens", type=int, default=4 * 2048,
                        help="tokens per micro-batch per GPU (default 8192: batch 4 x 2048)")
    parser.add_argument("--gpus", default="1,2,4,8", help="process counts (default 1,2,4,8)")
    args = parser.parse_args(argv)
    rows = [per_gpu(m, args.r, args.tokens, int(n)) for m in MODELS for n in args.gpus.split(",")]
    print(f"GB per GPU, computed, not measured: LoRA r={args.r}, bf16 base, {args.tokens} tokens per GPU per "
          "micro-batch, activation checkpointing")
    print(f"{'model':16} {'GPUs':>4} {'DDP':>7} {'FSDP2':>7} {'(acts)':>7}")
    for x in rows:
        print(f"{x['model']:16} {x['gpus']:4d} {x['ddp_gb']:7.2f} {x['fsdp_gb']:7.2f} {x['activations_gb']:7.2f}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
