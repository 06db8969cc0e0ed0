"""modules_to_save (whole modules trained and saved with the adapter), exact against peft both ways: a peft adapter
with lm_head / embed_tokens in modules_to_save loads here with peft's logits, ours exports and loads in peft the
same, our own format round-trips; tied embeddings are untied for a saved module, as peft's trained copy is its own.
(Training with it, and resume: test_lora_plus_neftune.py.)"""
import json
import warnings

import peft
import pytest
import safetensors.torch
import torch

from phi3lora import lora
from phi3lora.phi3mini import Phi3
from phi3lora.training.config import parse_config
from phi3lora.training.errors import TrainError
from helpers import make_hf_model, save_hf_checkpoint

TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
IDS = torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mts")
    return {tied: save_hf_checkpoint(make_hf_model(seed=0, tie_word_embeddings=tied), tmp / f"tied{tied}")
            for tied in (False, True)}


def logits(model):
    with torch.no_grad():
        out = model.eval()(IDS)
    return getattr(out, "logits", out)


def peft_adapter(folder, saved, tied=False):
    """A peft adapter trained (randomly) with modules_to_save=saved; returns its logits."""
    model = peft.get_peft_model(make_hf_model(seed=0, tie_word_embeddings=tied), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=saved, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(folder)
    return logits(model)


@pytest.mark.parametrize("saved", [["lm_head"], ["lm_head", "embed_tokens"]])
def test_peft_adapter_with_modules_to_save_loads_and_exports_exactly(ckpts, tmp_path, saved):
    theirs = peft_adapter(tmp_path / "peft", saved)
    keys = safetensors.torch.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert "base_model.model.lm_head.weight" in keys  # peft's saved form: the module's own key, no wrapper infix

    ours = Phi3.from_pretrained(ckpts[False])
    base = logits(ours)
    lora.load_adapter(ours, tmp_path / "peft")
    assert ours.lora_config.modules_to_save == tuple(saved)
    assert ours.lm_head.weight.requires_grad and not ours.model.norm.weight.requires_grad
    assert (theirs - base).abs().max() > 1e-2
    torch.testing.assert_close(logits(ours), theirs, atol=1e-5, rtol=0)

    # ours -> peft: the same keys and config field, the same logits in peft
    lora.export_peft(ours, tmp_path / "back")
    cfg = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == saved
    back = safetensors.torch.load_file(tmp_path / "back" / "adapter_model.safetensors")
    for name in saved:
        key = "base_model.model." + ("lm_head" if name == "lm_head" else "model.embed_tokens") + ".weight"
        assert torch.equal(back[key], keys[key])
    again = peft.PeftModel.from_pretrained(make_hf_model(seed=0), tmp_path / "back")
    torch.testing.assert_close(logits(again), theirs, atol=1e-5, rtol=0)

    # our own format: exact, and a fresh base that gets it warns about nothing (the saved modules are the
    # adapter's, not the base's)
    lora.save_adapter(ours, tmp_path / "ours")
    fresh = Phi3.from_pretrained(ckpts[False])

    with warnings.catch_warnings():
        warnings.simplefilter("error", lora.AdapterWarning)
        lora.load_adapter(fresh, tmp_path / "ours")
    assert torch.equal(logits(fresh), logits(ours))


def test_inject_trains_the_saved_module_in_place_and_only_it(ckpts):
    model = Phi3.from_pretrained(ckpts[False])
    head = model.lm_head.weight
    lora.inject(model, lora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["lm_head"]))
    assert model.lm_head.weight is head and type(model.lm_head) is torch.nn.Linear  # in place, no copy
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.weight" in trainable and "model.embed_tokens.weight" not in trainable
    assert all("lora_" in n for n in trainable - {"lm_head.weight"})
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()(IDS, labels=IDS).backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not torch.equal(model.lm_head.weight, Phi3.from_pretrained(ckpts[False]).lm_head.weight)


def test_tied_embeddings_are_untied_for_a_saved_lm_head_as_in_peft(ckpts, tmp_path):
    theirs = peft_adapter(tmp_path / "peft", ["lm_head"], tied=True)
    ours = Phi3.from_pretrained(ckpts[True])
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    embed = ours.model.embed_tokens.weight.detach().clone()
    with pytest.warns(UserWarning, match="tied embeddings"):
        lora.load_adapter(ours, tmp_path / "peft")
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight and not ours.config.tie_word_embeddings
    assert torch.equal(ours.model.embed_tokens.weight, embed) and not ours.model.embed_tokens.weight.requires_grad
    torch.testing.assert_close(logits(ours), theirs, atol=1e-5, rtol=0)


def test_bad_modules_to_save_are_named(ckpts):
    with pytest.raises(ValueError, match="both target_modules and modules_to_save"):
        lora.LoraConfig(target_modules=["lm_head"], modules_to_save=["lm_head"])
    model = Phi3.from_pretrained(ckpts[False])
    with pytest.raises(ValueError, match=r"\['lm_haed'\] match no module"):
        lora.inject(model, lora.LoraConfig(target_modules=TARGETS, modules_to_save=["lm_haed"]))
    assert not lora.lora_layers(model)  # checked before anything changed
    # train.py says so before any model loads, naming the flag
    with pytest.raises(TrainError, match=r"--modules-to-save.*\['lm_haed'\]"):
        parse_config(["--model", "tiny", "--modules-to-save", "lm_haed"])


def test_merged_model_writes_the_saved_module_in_the_base_dtype(ckpts, tmp_path):
    # train.py keeps trained weights in fp32 on a bf16 base; the merged checkpoint is bf16 throughout
    from phi3lora.cli.train import save_merged
    from phi3lora.phi3mini import Tokenizer

    model = Phi3.from_pretrained(ckpts[False], dtype=torch.bfloat16)
    lora.inject(model, lora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["lm_head"]))
    model.lm_head.weight.data = model.lm_head.weight.data.float() + 0.01  # as trained: fp32, changed
    trained = model.lm_head.weight.detach().clone()
    save_merged(model, Tokenizer.tiny(), tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    head = safetensors.torch.load_file(tmp_path / "merged" / "model.safetensors")["lm_head.weight"]
    assert head.dtype == torch.bfloat16 and torch.equal(head, trained.to(torch.bfloat16))
