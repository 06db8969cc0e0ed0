"""Named models of the Phi family: the Hub id, the Phi3Config overrides of each (on top of Phi-3-mini-4k's
defaults) and generation_config.json's eos ids, as published.

Phi3Config.from_name(name) builds the config; Phi3.from_name(name) a randomly initialised model (for shapes,
memory estimates and tests: real weights come from the Hub id or a folder through Phi3.from_pretrained). The LongRoPE
factors are each checkpoint's own (config.json): the presets use ones, of the right count, so the shapes are right
and the frequencies are not. Phi-3-small (another architecture: block-sparse attention, GeGELU, tiktoken) is not
here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .tiny import TINY_CONFIG


def _longrope(n_factors: int) -> dict:
    # placeholder factors (see the module docstring); n_factors = rotary dim / 2
    return {"type": "longrope", "short_factor": [1.0] * n_factors, "long_factor": [1.0] * n_factors}


_PHI3_EOS = (32000, 32001, 32007)  # Phi-3 generation_config.json: <|endoftext|>, <|assistant|>, <|end|>
_LONG = dict(max_position_embeddings=131072, original_max_position_embeddings=4096)
_MEDIUM = dict(hidden_size=5120, intermediate_size=17920, num_hidden_layers=40, num_attention_heads=40,
               num_key_value_heads=10)


@dataclass(frozen=True)
class Preset:
    hub_id: str | None  # None: built in code (tiny)
    config: dict = field(default_factory=dict)  # Phi3Config keyword overrides
    eos_ids: tuple = _PHI3_EOS  # generation_config.json eos_token_id: the ids that end a reply


PRESETS: dict[str, Preset] = {
    "phi3-mini-4k": Preset("microsoft/Phi-3-mini-4k-instruct"),
    "phi3-mini-128k": Preset("microsoft/Phi-3-mini-128k-instruct",
                             dict(**_LONG, sliding_window=262144, rope_scaling=_longrope(48))),
    "phi3.5-mini": Preset("microsoft/Phi-3.5-mini-instruct",
                          dict(**_LONG, sliding_window=262144, rope_scaling=_longrope(48))),
    "phi3-medium-4k": Preset("microsoft/Phi-3-medium-4k-instruct", dict(**_MEDIUM, sliding_window=2047)),
    "phi3-medium-128k": Preset("microsoft/Phi-3-medium-128k-instruct",
                               dict(**_MEDIUM, **_LONG, sliding_window=131072, rope_scaling=_longrope(64))),
    # rotary on 96 of each head's 128 dims; one 200064 x 3072 matrix for the embedding and the output layer
    "phi4-mini": Preset("microsoft/Phi-4-mini-instruct",
                        dict(vocab_size=200064, num_attention_heads=24, num_key_value_heads=8,
                             partial_rotary_factor=0.75, **_LONG, sliding_window=262144,
                             rope_scaling=_longrope(48), tie_word_embeddings=True, bos_token_id=199999,
                             eos_token_id=199999, pad_token_id=199999),
                        eos_ids=(200020, 199999)),  # <|end|>, <|endoftext|>
    "tiny": Preset(None, TINY_CONFIG),  # phi3mini/tiny.py: Phi-3's vocabulary and ids, small widths
}


def preset(name: str) -> Preset:
    """The preset of that name; ValueError listing the names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


__all__ = ["Preset", "PRESETS", "preset"]
