"""4-bit checkpoints: quantize-on-load, bitsandbytes-format files both ways with transformers, round trips."""
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_hf_model, save_hf_checkpoint
from phi3lora.phi3mini import Phi3
from phi3lora.phi3mini.quant import Linear4bit, base_weight_bytes, is_quantized
from phi3lora.phi3mini.weights import CheckpointError

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A dense tiny checkpoint and transformers' own bitsandbytes NF4 (double quant) save of it."""
    from transformers import BitsAndBytesConfig, Phi3ForCausalLM

    root = tmp_path_factory.mktemp("q")
    save_hf_checkpoint(make_hf_model(), root / "dense")
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
    hf4 = Phi3ForCausalLM.from_pretrained(root / "dense", quantization_config=bnb_config, device_map="cpu",
                                          dtype=torch.float32).eval()
    hf4.save_pretrained(root / "hf4")
    return root, hf4


IDS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))


def test_quantize_on_load_equals_transformers_file_bit_for_bit(folders):
    root, _ = folders
    ours = Phi3.from_pretrained(root / "dense", quantize="nf4")
    assert isinstance(ours.model.layers[0].mlp.gate_up_proj, Linear4bit)
    assert type(ours.lm_head) is torch.nn.Linear  # embeddings, head and norms stay dense
    theirs = load_file(root / "hf4" / "model.safetensors")
    mine = ours.state_dict()
    four_bit = [k for k in theirs if ".weight." in k or theirs[k].dtype == torch.uint8]
    assert len(four_bit) == 2 * 4 * 6  # 2 layers x 4 projections x 6 entries
    for key in theirs:
        assert key in mine, key
        assert torch.equal(mine[key], theirs[key]), key


def test_bitsandbytes_checkpoint_loads_and_matches_transformers(folders):
    root, hf4 = folders
    ours = Phi3.from_pretrained(root / "hf4")  # 4-bit because the file is
    assert is_quantized(ours)
    with torch.no_grad():
        ours_logits, hf_logits = ours(IDS), hf4(IDS).logits
    # bitsandbytes' CPU forward may compute in bf16 (packed AVX512 path): close, not equal
    torch.testing.assert_close(ours_logits, hf_logits, atol=5e-2, rtol=0)
    # ours is exactly a dense model holding the dequantized weights
    dense = Phi3.from_pretrained(root / "dense")
    with torch.no_grad():
        for name, m in ours.named_modules():
            if isinstance(m, Linear4bit):
                dense.get_submodule(name).weight.copy_(m.dequantized(torch.float32))
        torch.testing.assert_close(ours(IDS), dense(IDS), atol=1e-5, rtol=1e-5)


def test_our_file_loads_in_transformers(folders, tmp_path):
    from transformers import Phi3ForCausalLM

    root, _ = folders
    ours = Phi3.from_pretrained(root / "dense", quantize="nf4")
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert config["torch_dtype"] == "float32"  # the dense tensors' dtype, not the fp32 scales'
    hf = Phi3ForCausalLM.from_pretrained(tmp_path, device_map="cpu", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, ours(IDS), atol=5e-2, rtol=0)


def test_round_trip_is_exact_and_never_requantized(folders, tmp_path):
    root, _ = folders
    ours = Phi3.from_pretrained(root / "dense", quantize="nf4", dtype=torch.bfloat16)
    ours.save_pretrained(tmp_path)
    for quantize in ("", "nf4"):  # a 4-bit file loads 4-bit either way, its codes untouched
        again = Phi3.from_pretrained(tmp_path, quantize=quantize)
        a, b = ours.state_dict(), again.state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert base_weight_bytes(ours) < 0.6 * base_weight_bytes(Phi3.from_pretrained(root / "dense",
                                                                                   dtype=torch.bfloat16))


def test_dtype_casts_keep_the_scales(folders):
    root, _ = folders
    ours = Phi3.from_pretrained(root / "dense", quantize="nf4")
    layer = ours.model.layers[0].self_attn.qkv_proj
    before = {k: v.clone() for k, v in layer.nf4_tensors().items()}
    ours.to(torch.bfloat16)
    after = layer.nf4_tensors()
    assert ours.model.embed_tokens.weight.dtype == torch.bfloat16
    for key in before:
        assert after[key].dtype == before[key].dtype and torch.equal(after[key], before[key]), key


def test_unsupported_quantization_is_refused(folders, tmp_path):
    root, _ = folders
    for name in ("model.safetensors", "generation_config.json"):
        (tmp_path / name).write_bytes((root / "hf4" / name).read_bytes())
    config = json.loads((root / "hf4" / "config.json").read_text())
    config["quantization_config"]["bnb_4bit_quant_type"] = "fp4"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="only bitsandbytes 4-bit NF4"):
        Phi3.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="quantize"):
        Phi3.from_pretrained(root / "dense", quantize="int4")
