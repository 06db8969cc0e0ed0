"""Tiny stand-ins for the Phi family, built offline: scaled-down transformers configs of each member's shape, and a
byte-level BPE tokenizer with Phi-4-mini's special tokens at Phi-4-mini's ids.

Phi-4-mini-instruct's added tokens: <|endoftext|> 199999, <|assistant|> 200019, <|end|> 200020, <|user|> 200021,
<|tool|> 200023 (as published; the others here follow in the same block). Its chat template is typed in below from
the published tokenizer_config.json (not imported from phi3mini, so the template tests can fail).
"""
import json
from pathlib import Path

# microsoft/Phi-4-mini-instruct tokenizer_config.json "chat_template"
PHI4_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
    "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
    "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}"
    "{% else %}{{ eos_token }}{% endif %}"
)
PHI4_SPECIAL = {
    "<|endoftext|>": 199999, "<|endofprompt|>": 200018, "<|assistant|>": 200019, "<|end|>": 200020,
    "<|user|>": 200021, "<|system|>": 200022, "<|tool|>": 200023, "<|/tool|>": 200024, "<|tool_call|>": 200025,
    "<|/tool_call|>": 200026, "<|tool_response|>": 200027, "<|tag|>": 200028,
}
PHI4_VOCAB = 200064

# scaled-down shapes: what each member has that the others lack (head counts keep their ratios)
LONG = dict(max_position_embeddings=128, original_max_position_embeddings=32)


def _factors(n, step):
    return [1.0 + step * i for i in range(n)]


SHAPES = {
    # 32 heads, no GQA, LongRoPE, window longer than the context
    "phi3.5-mini": dict(num_attention_heads=4, num_key_value_heads=4, sliding_window=262144, **LONG,
                        rope_scaling={"type": "longrope", "short_factor": _factors(8, 0.05),
                                      "long_factor": _factors(8, 0.9)}),
    # 40 heads / 10 kv heads (4:1), head_dim 128 in the real model
    "phi3-medium-4k": dict(num_attention_heads=8, num_key_value_heads=2, sliding_window=15),
    "phi3-medium-128k": dict(num_attention_heads=8, num_key_value_heads=2, sliding_window=131072, **LONG,
                             rope_scaling={"type": "longrope", "short_factor": _factors(4, 0.1),
                                           "long_factor": _factors(4, 0.6)}),
    # 24 heads / 8 kv heads (3:1), rotary on 0.75 of each head, tied embeddings, LongRoPE, bos = eos = pad
    "phi4-mini": dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=96, partial_rotary_factor=0.75,
                      tie_word_embeddings=True, sliding_window=262144, **LONG, bos_token_id=5, eos_token_id=5,
                      pad_token_id=5, rope_scaling={"type": "longrope", "short_factor": _factors(6, 0.02),
                                                    "long_factor": _factors(6, 0.8)}),
}


def phi4_tokenizer_json() -> str:
    """A byte-level BPE in Phi-4-mini's layout (GPT-2 style byte alphabet, ByteLevel pre-tokenizer and decoder) with
    a few merges and Phi-4-mini's added tokens at their ids; ids between the pieces and 199999 are unused."""
    from tokenizers import pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = []
    for a, b in [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("o", "r"), ("e", "n"), ("Ġ", "w"),
                 ("a", "t"), ("Ġ", "s"), ("r", "e"), ("Ġ", "L"), ("Ġ", "is"), ("i", "s"), ("Ġ", "r")]:
        vocab.setdefault(a + b, len(vocab))
        merges.append([a, b])
    added = []
    for content, tid in PHI4_SPECIAL.items():
        vocab[content] = tid
        added.append(dict(id=tid, content=content, single_word=False, lstrip=False, rstrip=False,
                          normalized=False, special=True))
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    return json.dumps(spec, ensure_ascii=False)


def write_phi4_tokenizer(folder, template=PHI4_TEMPLATE) -> Path:
    """tokenizer.json + tokenizer_config.json as Phi-4-mini-instruct ships them (bos = eos = pad = unk =
    <|endoftext|>); template=None leaves the chat template out."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(phi4_tokenizer_json(), encoding="utf-8")
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "add_bos_token": False, "add_eos_token": False,
              "model_max_length": 131072, "tokenizer_class": "GPT2Tokenizer", "clean_up_tokenization_spaces": False}
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
