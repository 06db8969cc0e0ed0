"""phi3lora lives beside the Hugging Face stack in one process. transformers (5.25 and later) requires Hugging Face's
`kernels` package, which peft and bitsandbytes import too; our kernels are `phi3lora.kernels`, so nothing shadows
anything. In a fresh interpreter, in both import orders (theirs first, then ours; ours first, then theirs): build
transformers' Phi-3, apply a peft adapter, load the same weights with our code and compare, run our Triton LoRA
matmul (interpreter on the CPU) against its torch reference, and check that bitsandbytes' NF4 equals ours."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

THEIRS = """
import kernels, transformers, peft, bitsandbytes
assert 'phi3lora' not in kernels.__file__, kernels.__file__
from transformers import Phi3Config as HFConfig, Phi3ForCausalLM
from peft import LoraConfig as PeftConfig, get_peft_model
import bitsandbytes.functional as bnbF
"""
OURS = """
import phi3lora.phi3mini, phi3lora.lora, phi3lora.kernels
from phi3lora.phi3mini import Phi3
from phi3lora import lora
from phi3lora.kernels import lora_linear, lora_linear_reference
from phi3lora.kernels.nf4 import quantize_nf4
"""
CHECKS = """
import sys, tempfile, torch
torch.manual_seed(0)
hf = Phi3ForCausalLM(HFConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
ids = torch.randint(3, 128, (2, 9))
folder = tempfile.mkdtemp()
hf.save_pretrained(folder)
ours = Phi3.from_pretrained(folder, dtype=torch.float32).eval()
with torch.no_grad():
    base_diff = (ours(ids) - hf(ids).logits).abs().max().item()
assert base_diff < 1e-4, base_diff

# a peft adapter with non-zero B on transformers' model, exported by peft, loaded by us
peft_model = get_peft_model(hf, PeftConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "down_proj"]))
for name, p in peft_model.named_parameters():
    if "lora_B" in name:
        torch.nn.init.normal_(p, std=0.05)
peft_dir = tempfile.mkdtemp()
peft_model.save_pretrained(peft_dir)
lora.load_adapter(ours, peft_dir)
with torch.no_grad():
    adapted = peft_model(ids).logits
    adapter_diff = (ours(ids) - adapted).abs().max().item()
    with peft_model.disable_adapter():
        effect = (adapted - peft_model(ids).logits).abs().max().item()
assert adapter_diff < 1e-4 and effect > 1e-3, (adapter_diff, effect)  # equal, and the adapter did change the logits

# our Triton LoRA matmul (Triton's interpreter here) against its torch reference, forward and gradients
x = torch.randn(5, 48, requires_grad=True)
w, A, B = torch.randn(40, 48), torch.randn(8, 48, requires_grad=True), torch.randn(40, 8, requires_grad=True)
out = lora_linear(x, w, None, A, B, 0.5)
ref = lora_linear_reference(x, w, None, A, B, 0.5)
grads = torch.autograd.grad(out.square().sum(), (x, A, B))
ref_grads = torch.autograd.grad(ref.square().sum(), (x, A, B))
assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()
assert all(torch.allclose(g, r, atol=1e-3) for g, r in zip(grads, ref_grads))

# bitsandbytes' NF4 (double quant) equals ours, bit for bit
wq = torch.randn(64, 128)
packed, state = bnbF.quantize_4bit(wq, blocksize=64, compress_statistics=True, quant_type="nf4")
assert torch.equal(packed, quantize_nf4(wq)["weight"])
print("ok", base_diff, adapter_diff)
"""


def run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)


@pytest.mark.parametrize("order", ["theirs first", "ours first"])
def test_both_stacks_in_one_process(order):
    for name in ("transformers", "peft", "bitsandbytes", "kernels"):
        pytest.importorskip(name)
    code = (THEIRS + OURS if order == "theirs first" else OURS + THEIRS) + CHECKS
    r = run(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok"), r.stdout
