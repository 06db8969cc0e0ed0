"""Phi-3 configuration: one dataclass whose defaults are microsoft/Phi-3-mini-4k-instruct's config.json.

`from_hf` reads both forms of a Hugging Face config.json: the Hub's (top-level rope_theta + rope_scaling, with
"su" as the older name of "longrope") and the one transformers 5.x writes (a "rope_parameters" dict).
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .presets import preset


class ConfigError(ValueError):
    """A config.json that this implementation cannot honour."""


# Keys of a Hugging Face config.json that carry no meaning for the forward pass.
_BOOKKEEPING = {
    "_name_or_path", "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "initializer_range", "model_type", "return_dict", "output_hidden_states", "output_attentions",
    "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "tie_encoder_decoder",
    "full_attn_mod", "interpolate_factor", "_attn_implementation", "attn_implementation", "quantization_config_off",
}
# Keys we understand but only at one value: anything else is an error naming the key.
_MUST_BE = {
    "hidden_act": ("silu",), "attention_bias": (False,), "mlp_bias": (False,), "lm_head_bias": (False,),
    "resid_pdrop": (0.0, 0), "embd_pdrop": (0.0, 0), "attention_dropout": (0.0, 0),
}
_LONGROPE = ("longrope", "su")


def _check_quantization(qc: dict | None, where: str) -> None:
    """bitsandbytes NF4 loads (phi3mini/quant.py); fp4 (bitsandbytes' default), 8-bit, GPTQ, AWQ... do not."""
    if qc and not (qc.get("quant_method") == "bitsandbytes" and qc.get("load_in_4bit")
                   and qc.get("bnb_4bit_quant_type", "fp4") == "nf4"):
        raise ConfigError(f"{where}: quantization_config {qc.get('quant_method')!r} "
                          f"(4-bit type {qc.get('bnb_4bit_quant_type', 'fp4')!r}, 8-bit {qc.get('load_in_8bit')}) "
                          "is not supported: only bitsandbytes 4-bit NF4 checkpoints and unquantized ones load "
                          "(for 4-bit, load the bf16 checkpoint with quantize='nf4' / --quantize nf4)")


@dataclass
class Phi3Config:
    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    # LongRoPE (128k / Phi-3.5): {"type": "longrope", "short_factor": [...], "long_factor": [...]}; None for plain RoPE.
    rope_scaling: dict | None = None
    sliding_window: int | None = 2047  # a key is visible while q_pos - k_pos < sliding_window
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int | list = 32000
    pad_token_id: int | None = 32000

    # derived in __post_init__
    rotary_dim: int = field(init=False)
    rope_scale: float = field(init=False)  # max_position_embeddings / original_max_position_embeddings
    rope_attention_factor: float = field(init=False)  # multiplies cos and sin (LongRoPE only)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        self.rotary_dim = int(self.head_dim * self.partial_rotary_factor)
        if self.rotary_dim % 2:
            raise ConfigError(f"rotary dim {self.rotary_dim} (head_dim x partial_rotary_factor) must be even")
        self.rope_scale = self.max_position_embeddings / self.original_max_position_embeddings
        self.rope_attention_factor = 1.0
        if self.rope_scaling is not None:
            rs = dict(self.rope_scaling)
            kind = rs.get("type", rs.get("rope_type"))
            if kind not in _LONGROPE:
                raise ConfigError(f"rope_scaling type {kind!r} is not supported (only 'longrope' / 'su')")
            for key in ("short_factor", "long_factor"):
                if len(rs.get(key) or ()) != self.rotary_dim // 2:
                    raise ConfigError(f"rope_scaling.{key} needs {self.rotary_dim // 2} values "
                                      f"(rotary dim / 2), got {len(rs.get(key) or ())}")
            if rs.get("attention_factor") is not None:
                self.rope_attention_factor = float(rs["attention_factor"])
            elif self.rope_scale > 1.0:
                # LongRoPE's attention temperature: https://arxiv.org/abs/2402.13753 (transformers' longrope init)
                self.rope_attention_factor = math.sqrt(
                    1 + math.log(self.rope_scale) / math.log(self.original_max_position_embeddings))

    @property
    def stop_ids(self) -> list[int]:
        ids = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        return [i for i in ids if i is not None]

    # ----- constructors ---------------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides) -> "Phi3Config":
        """A preset of phi3mini/presets.py: "phi3-mini-4k", "phi3-mini-128k", "phi3.5-mini", "phi3-medium-4k",
        "phi3-medium-128k", "phi4-mini" (LongRoPE factors are placeholders: exact ones come from each checkpoint's
        config.json), "tiny" (phi3mini/tiny.py: the demo's small model). Keyword overrides change any field."""
        try:
            kw = dict(preset(name).config)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> "Phi3Config":
        """Build from a Hugging Face config.json (a path, a folder holding one, or the parsed dict)."""
        where = "config"
        if not isinstance(source, dict):
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            where = str(path)
            try:
                source = json.loads(path.read_text())
            except FileNotFoundError:
                raise ConfigError(f"{where}: no such file") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not valid JSON ({e})") from None
        hf = dict(source)
        model_type = hf.get("model_type", "phi3")
        if model_type != "phi3":
            raise ConfigError(f"{where}: model_type is {model_type!r}; this implementation only runs 'phi3' "
                              "(Phi-3-mini, Phi-3.5-mini, Phi-4-mini)")
        for key, allowed in _MUST_BE.items():
            if key in hf and hf[key] not in allowed:
                raise ConfigError(f"{where}: {key}={hf[key]!r} is not supported (only {allowed[0]!r})")

        _check_quantization(hf.pop("quantization_config", None), where)  # phi3mini.weights reads 4-bit tensors

        # RoPE comes as the Hub's top-level rope_theta + rope_scaling or as transformers 5.x's rope_parameters. As in
        # transformers: rope_scaling wins over rope_parameters, and values inside the dict over top-level ones.
        field_name = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
        rope = dict(hf.pop("rope_scaling", None) or hf.get("rope_parameters") or {})
        hf.pop("rope_parameters", None)
        for key in ("rope_theta", "partial_rotary_factor"):
            if key in rope:
                hf[key] = rope.pop(key)
        kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        rope.pop("type", None)
        if kind in _LONGROPE:
            # transformers reads original_max_position_embeddings from the top level only (4096 when absent)
            orig = hf.get("original_max_position_embeddings", 4096)
            inner = rope.pop("original_max_position_embeddings", orig)
            if inner != orig:
                raise ConfigError(f"{where}: {field_name}.original_max_position_embeddings={inner} differs from the "
                                  f"top-level original_max_position_embeddings ({orig}), which transformers uses")
            factor = rope.pop("factor", None)
            if (factor is not None and rope.get("attention_factor") is None
                    and factor != hf.get("max_position_embeddings", 4096) / orig):
                raise ConfigError(f"{where}: {field_name}.factor={factor} differs from "
                                  "max_position_embeddings / original_max_position_embeddings")
            scaling = {"type": "longrope"}
            for key in ("short_factor", "long_factor"):
                value = rope.pop(key, None)
                if not isinstance(value, (list, tuple)):
                    raise ConfigError(f"{where}: {field_name}.{key} must be a list of numbers, got {value!r}")
                scaling[key] = list(value)
            if rope.get("attention_factor") is not None:
                scaling["attention_factor"] = rope["attention_factor"]
            rope.pop("attention_factor", None)
            hf["rope_scaling"] = scaling
        elif kind != "default":
            raise ConfigError(f"{where}: {field_name} type {kind!r} is not supported (only 'longrope' / 'su')")
        if rope:  # e.g. short_mscale / long_mscale, which transformers' Phi-3 ignores too
            warnings.warn(f"{where}: ignoring {field_name} keys {sorted(rope)}", stacklevel=2)

        names = {f.name for f in fields(cls) if f.init}
        kwargs = {k: v for k, v in hf.items() if k in names}
        unknown = sorted(set(hf) - names - _BOOKKEEPING - set(_MUST_BE))
        if unknown:
            warnings.warn(f"{where}: ignoring keys {unknown}", stacklevel=2)
        # absent keys take transformers' Phi3Config defaults; they are ours (Phi-3-mini-4k's) but for the window
        kwargs.setdefault("sliding_window", None)
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """config.json in the Hub's form, which transformers 4.x and 5.x both read."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        d.pop("head_dim")  # derived by transformers from hidden_size / heads
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            d["head_dim"] = self.head_dim
        if self.partial_rotary_factor == 1.0:
            d.pop("partial_rotary_factor")
        d.update(model_type="phi3", architectures=["Phi3ForCausalLM"], hidden_act="silu", attention_dropout=0.0,
                 resid_pdrop=0.0, embd_pdrop=0.0, initializer_range=0.02, use_cache=True)
        return d

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
