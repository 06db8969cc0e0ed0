"""Our top-level package is `kernels`; so is Hugging Face's hub-kernels package, which bitsandbytes and
transformers both try to import. With ours on the path, each must see "not installed" and carry on."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})


@pytest.mark.slow  # a fresh interpreter importing transformers: ~40 s on 2 shared cores
def test_transformers_sees_no_hub_kernels():
    pytest.importorskip("transformers")
    r = run("import kernels, kernels.nf4\n"
            "from transformers.utils import import_utils\n"
            "from transformers import Phi3Config, Phi3ForCausalLM\n"
            "assert not import_utils.is_kernels_available()\n"
            "m = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,"
            " num_attention_heads=2, pad_token_id=0))\n"
            "import torch; print(m(torch.tensor([[1, 2, 3]])).logits.shape)")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "torch.Size([1, 3, 64])" in r.stdout


@pytest.mark.slow  # a fresh interpreter importing bitsandbytes: ~40 s on 2 shared cores
def test_bitsandbytes_falls_back_and_quantizes():
    """bitsandbytes logs that hub kernels failed to load (ours has no get_kernel) and uses its own CPU code."""
    pytest.importorskip("bitsandbytes")
    r = run("import kernels\n"
            "import torch, bitsandbytes.functional as F\n"
            "from kernels.nf4 import quantize_nf4\n"
            "w = torch.randn(64, 128)\n"
            "packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type='nf4')\n"
            "assert torch.equal(packed, quantize_nf4(w)['weight'])\n"
            "print('ok', kernels.__file__)")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ok" in r.stdout and str(ROOT / "phi3lora" / "kernels") in r.stdout  # ours is the `kernels` they found
