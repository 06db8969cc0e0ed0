"""phi3mini.hub: one resolver for "tiny", a local folder and a Hub id (train.py and chat.py both use it)."""
import pytest
import torch

from phi3lora.phi3mini import CheckpointError, Phi3, TokenizerError, hub
from phi3lora.phi3mini.download import looks_like_hub_id


@pytest.mark.parametrize("name, hub_id", [("microsoft/Phi-3-mini-4k-instruct", True), ("./a/b", False),
                                          ("/abs/x", False), ("~/x", False), ("a/b/c", False), ("tiny", False)])
def test_what_counts_as_a_hub_id(name, hub_id):
    assert looks_like_hub_id(name) == hub_id


def test_an_existing_folder_shaped_like_a_hub_id_is_the_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert not looks_like_hub_id("owner/name")


def test_tiny_and_a_folder_load_the_same_model_and_tokenizer(tmp_path):
    tiny = hub.load_model("tiny")
    assert tiny.name_or_path == "tiny" and not tiny.training
    assert next(tiny.parameters()).dtype == torch.float32
    tiny.save_pretrained(tmp_path / "ckpt")
    hub.load_tokenizer("tiny").save_pretrained(tmp_path / "ckpt")
    folder = hub.load_model(str(tmp_path / "ckpt"), dtype=torch.bfloat16)
    assert folder.name_or_path == str(tmp_path / "ckpt")
    ids = torch.tensor([[1, 450, 3186]])
    with torch.no_grad():
        torch.testing.assert_close(folder(ids).float(), tiny.to(torch.bfloat16)(ids).float())
    text = "the word of the day"
    assert hub.load_tokenizer(str(tmp_path / "ckpt")).encode(text) == hub.load_tokenizer("tiny").encode(text)


def test_missing_folder_and_offline_hub_id_are_clear(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        hub.load_model(str(tmp_path / "nowhere"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TokenizerError, match="local folder"):
        hub.load_tokenizer("microsoft/Phi-3-mini-4k-instruct-does-not-exist")
    with pytest.raises(CheckpointError, match="local folder"):
        Phi3.from_pretrained("microsoft/Phi-3-mini-4k-instruct-does-not-exist")


def test_tiny_quantizes_like_a_checkpoint():
    from phi3lora.phi3mini.quant import is_quantized
    assert is_quantized(hub.load_model("tiny", quantize="nf4")) and not is_quantized(hub.load_model("tiny"))
    with pytest.raises(CheckpointError, match="quantize='int3'"):
        hub.load_model("tiny", quantize="int3")
