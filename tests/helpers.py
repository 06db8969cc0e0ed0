"""Tiny random Phi-3 checkpoints written by transformers, so tests go through the real loading code; the small
`tiny` model most tests build, and its checkpoint folder for the command lines."""
import atexit
import functools
import json
import shutil
import socket
import tempfile
from pathlib import Path

import torch

from phi3lora.phi3mini import Phi3, Phi3Config, Tokenizer
from phi3lora.training.config import TINY_SETTINGS, as_flag

TINY_HF = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=256, original_max_position_embeddings=256,
    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2, sliding_window=None,
    tie_word_embeddings=False, attn_implementation="eager",
)

# The `tiny` preset is sized for the README demo (256 wide, 4 layers: big enough to memorize its chats). Most tests
# only need the real code paths with Phi-3's vocabulary and ids, so they build this smaller one (a quarter of the
# width, where the 32064-row embedding and lm_head cost the most); tests of the demo itself use the preset as it is.
SMALL_TINY = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2)


def small_tiny_config(**overrides) -> Phi3Config:
    return Phi3Config.from_name("tiny", **{**SMALL_TINY, **overrides})


def small_tiny(seed=0, **overrides) -> Phi3:
    """The small tiny model, randomly initialised from seed (fp32); seed 0 is the one in small_tiny_dir()."""
    return Phi3.from_name("tiny", seed=seed, **{**SMALL_TINY, **overrides})


@functools.cache
def small_tiny_dir() -> str:
    """A checkpoint folder of small_tiny(seed=0) with the tiny tokenizer and the preset's eos ids: what `--model tiny`
    loads, at the small size, for train.py / chat.py / probe.py. Written once per test process, removed at its exit."""
    folder = Path(tempfile.mkdtemp(prefix="phi3lora-small-tiny-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    model = small_tiny()
    model.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps(model.generation_config))
    Tokenizer.tiny().save_pretrained(folder)
    return str(folder)


def small_tiny_args() -> list[str]:
    """What `--model tiny` means to train.py, at the small size: --model small_tiny_dir() and the tiny preset's
    training settings as flags (train.py applies them for the name "tiny" only); later flags override them."""
    flags = [as_flag(section, key, value) for section, values in TINY_SETTINGS.items() for key, value in values.items()]
    return ["--model", small_tiny_dir()] + [part for flag in flags for part in flag.split(" ")]


# a two-turn conversation with a system message, shared by the tokenizer and data tests
CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is LoRA?"},
    {"role": "assistant", "content": "A low-rank update."},
    {"role": "user", "content": "And r?"},
    {"role": "assistant", "content": "Its rank."},
]

def hf_config(**overrides):
    from transformers import Phi3Config as HFPhi3Config

    kw = dict(TINY_HF)
    kw.update(overrides)
    attn = kw.pop("attn_implementation")
    cfg = HFPhi3Config(**kw)
    cfg._attn_implementation = attn
    return cfg


def make_hf_model(seed=0, **overrides):
    """A transformers Phi3ForCausalLM in fp32 with random weights (norm weights randomised too)."""
    from transformers import Phi3ForCausalLM

    torch.manual_seed(seed)
    model = Phi3ForCausalLM(hf_config(**overrides)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


def save_hf_checkpoint(model, path, **save_kw):
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True, **save_kw)
    return path


@functools.lru_cache(maxsize=None)
def chat_encoder(tok, train_on="assistant", max_seq_len=None):
    """The data package's ChatEncoder, one per tokenizer and setting (it copies the tokenizer's backend)."""
    from phi3lora.data import ChatEncoder
    return ChatEncoder(tok, max_seq_len, train_on)


def training_ids(tok, messages, train_on="assistant"):
    """(input_ids, labels) of one whole conversation, as training sees it (ChatEncoder, no length limit)."""
    ex, status = chat_encoder(tok, train_on).encode(messages)
    assert status == "ok", status
    return ex.input_ids, ex.labels


def write_jsonl(path, rows):
    """rows (dicts, or strings written as they are) as a JSONL file at path."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def free_port() -> int:
    """A localhost TCP port free right now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
