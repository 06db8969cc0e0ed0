"""QLoRA figures that need no GPU: NF4 base-weight bytes of real model shapes, and NF4-vs-full logits on a tiny model.

1. Bytes of each preset's base weights with the decoder projections in NF4 + double quant (bitsandbytes' layout:
   packed codes n/2, uint8 scales n/64, fp32 nested scales per 256 blocks, the two tables and the JSON entry per
   layer) and everything else (embedding, lm_head, norms) in bf16, built on the meta device (no memory) and
   counted from the shapes; next to the bf16 model. Target for Phi-3-mini: <= 2.2 GiB.
2. KL(full || NF4) of the next-token distributions of the tiny preset (random weights, seed 0) on random tokens,
   the base in bf16 and in fp32, and the largest logit difference.

    python bench/qlora_figures.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from phi3lora.kernels.nf4 import NESTED_BLOCKSIZE  # noqa: E402
from phi3lora.phi3mini import Phi3  # noqa: E402
from phi3lora.phi3mini.config import Phi3Config  # noqa: E402
from phi3lora.phi3mini.quant import quantize_model, quantized_names  # noqa: E402

GiB = 1024**3


def nf4_bytes(numel: int, shape_json_bytes: int = 180) -> int:
    """One NF4 + double-quant weight's bytes in bitsandbytes' layout."""
    blocks = -(-numel // 64)
    return ((numel + 1) // 2 + blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4 * 16 + 4 * 256 + shape_json_bytes)


def base_bytes(preset: str) -> dict:
    with torch.device("meta"):
        model = Phi3(Phi3Config.from_name(preset))
    four_bit = set(quantized_names(model))
    nf4 = dense_rest = linear_params = 0
    for name, m in model.named_modules():
        if name in four_bit:
            linear_params += m.weight.numel()
            nf4 += nf4_bytes(m.weight.numel())
    seen = set()
    for name, p in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if owner not in four_bit and id(p) not in seen:
            seen.add(id(p))
            dense_rest += 2 * p.numel()  # bf16
    total_bf16 = 2 * sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"preset": preset, "linear_params": linear_params, "nf4_linears_gib": nf4 / GiB,
            "bf16_rest_gib": dense_rest / GiB, "nf4_base_gib": (nf4 + dense_rest) / GiB,
            "bf16_base_gib": total_bf16 / GiB,
            "bits_per_linear_param": 8 * nf4 / linear_params}


def tiny_kl(dtype: torch.dtype, n_seq: int = 8, seq_len: int = 128) -> dict:
    full = Phi3.from_name("tiny", seed=0, dtype=dtype).eval()
    q = quantize_model(Phi3.from_name("tiny", seed=0, dtype=dtype)).eval()
    full.set_kernels(False), q.set_kernels(False)
    ids = torch.randint(0, full.config.vocab_size, (n_seq, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p, pq = full(ids).float().log_softmax(-1), q(ids).float().log_softmax(-1)
    kl = (p.exp() * (p - pq)).sum(-1)
    return {"dtype": str(dtype).removeprefix("torch."), "kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
            "top1_agree": (p.argmax(-1) == pq.argmax(-1)).float().mean().item(),
            "max_abs_logprob_diff": (p - pq).abs().max().item()}


def main() -> dict:
    rows = [base_bytes(p) for p in ("phi3-mini-4k", "phi3-medium-4k")]
    print(f"{'preset':>16} {'linear params':>14} {'NF4 base':>9} {'bf16 base':>10} {'bits/param':>10}")
    for r in rows:
        print(f"{r['preset']:>16} {r['linear_params']:14,d} {r['nf4_base_gib']:8.3f}G {r['bf16_base_gib']:9.3f}G "
              f"{r['bits_per_linear_param']:10.3f}")
    kls = [tiny_kl(torch.bfloat16), tiny_kl(torch.float32)]
    for k in kls:
        print(f"tiny {k['dtype']:>8}: KL(full||NF4) mean {k['kl_mean']:.2e} max {k['kl_max']:.2e}, "
              f"top-1 agreement {k['top1_agree']:.3f}")
    result = {"bytes": rows, "tiny_kl": kls}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
