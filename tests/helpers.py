"""Tiny random Phi-3 checkpoints written by transformers, so tests go through the real loading code."""
import functools
import json
import socket
from pathlib import Path

import torch

TINY_HF = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=256, original_max_position_embeddings=256,
    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2, sliding_window=None,
    tie_word_embeddings=False, attn_implementation="eager",
)


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
