"""What importing costs: the model, LoRA and data import no Triton (kernels/__init__.py resolves its public names
on first access), and `phi3lora.kernels.<op>` is the op's function whatever submodule was imported before. Each
check runs a fresh interpreter: this one has imported everything already."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import phi3lora.kernels

ROOT = Path(__file__).resolve().parents[1]


def run(code: str, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**clean, "PYTHONPATH": str(ROOT), **env})
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="without Triton nothing could import it")
def test_model_lora_and_data_import_no_triton():
    out = run("import sys\n"
              "import phi3lora.phi3mini, phi3lora.lora, phi3lora.data\n"
              "from phi3lora.phi3mini import Phi3, Phi3Config, Tokenizer, generate\n"
              "from phi3lora.kernels import lora_linear_reference, swiglu_reference\n"
              "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith('triton.')))\n"
              "from phi3lora.kernels import rms_norm\n"  # the first kernel used imports Triton
              "print('triton' in sys.modules)")
    assert out.split("\n")[:2] == ["[]", "True"], out


def test_public_names_are_the_functions_after_their_modules():
    """A submodule named like a public function would replace it on the package once imported."""
    out = run("import importlib, phi3lora.kernels as k\n"
              "for m in ('lora_matmul', 'silu_mul', 'rmsnorm', 'rope', 'cross_entropy', 'reference', 'nf4',"
              " 'nf4_lora'):\n"
              "    importlib.import_module('phi3lora.kernels.' + m)\n"
              "from phi3lora.kernels import lora_linear, swiglu\n"
              "import phi3lora.kernels.lora_matmul as mod\n"
              "assert lora_linear is mod.lora_linear and callable(lora_linear), lora_linear\n"
              "print(' '.join(f'{n}:{type(getattr(k, n)).__name__}' for n in k.__all__))")
    assert out.split() == [f"{name}:function" for name in phi3lora.kernels.__all__]


def test_no_kernel_module_is_named_like_a_public_name():
    modules = {p.stem for p in (ROOT / "phi3lora" / "kernels").glob("*.py")}
    assert not modules & set(phi3lora.kernels.__all__)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_triton_interpret_read_at_first_kernel_use():
    """TRITON_INTERPRET set after importing the model still reaches the kernels (read when they are defined)."""
    out = run("import os, phi3lora.phi3mini\n"
              "os.environ['TRITON_INTERPRET'] = '1'\n"
              "from phi3lora.kernels import _triton, rms_norm\n"
              "print(_triton.INTERPRET)")
    assert out.strip() == "True"
