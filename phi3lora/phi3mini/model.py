"""Phi-3 in plain PyTorch: RMSNorm, (Long)RoPE, attention over the fused qkv_proj, SwiGLU MLP over the fused
gate_up_proj, pre-norm blocks, KV cache.

Module and parameter names are the checkpoint's own (model.layers.N.self_attn.qkv_proj, ...), so Hugging Face
weights load by identity. The math follows transformers' modeling_phi3.py (RMSNorm in fp32, half-rotation RoPE,
fp32 softmax) with these deliberate differences:
- attention runs through `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU); packed rows
  and rows longer than the sliding window never build a (B, 1, T, T) mask: attention.py's plans run each document
  (and each window) on its own, or FlexAttention with a block mask on CUDA;
- the sliding window keeps keys with q_idx - k_idx < sliding_window, counted in cache slots like transformers;
- LongRoPE picks the short or long factors from the largest position in the call (transformers does the same);
- with `labels`, the loss can be computed chunk by chunk without ever holding the (B, T, vocab) fp32 logits.
Optional Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear + cross-entropy, and the fused LoRA linear of lora/'s
layers) are switched with `set_kernels`: every module that owns one names it in its class attribute `kernel` and
runs it when its `use_kernel` is true. The plain path runs the same ops' torch references (kernels/reference.py).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from phi3lora.kernels.reference import (apply_rope_reference, cross_entropy_reference, rms_norm_reference,
                                        rotate_half, swiglu_reference)

from .attention import BACKENDS, build_attention_mask, make_plan, repeat_kv
from .config import Phi3Config
from .tokenizer import IGNORE

# The kernels a module can own (its class attribute `kernel`); lora_linear is lora/'s Linear and MergedLinear.
KERNEL_NAMES = ("rmsnorm", "rope", "swiglu", "fused_ce", "lora_linear")


class RMSNorm(nn.Module):
    kernel = "rmsnorm"

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.use_kernel = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel:
            from phi3lora.kernels.rmsnorm import rms_norm
            return rms_norm(x, self.weight, self.eps)
        return rms_norm_reference(x, self.weight, self.eps)  # as transformers: fp32, cast back, then scale


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE (https://arxiv.org/abs/2104.09864), with LongRoPE's two factor sets
    (https://arxiv.org/abs/2402.13753): short factors while every position < original_max_position_embeddings,
    long factors beyond, cos and sin scaled by the attention factor."""

    def __init__(self, config: Phi3Config):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq_short", torch.empty(config.rotary_dim // 2), persistent=False)
        self.register_buffer("inv_freq_long", torch.empty(config.rotary_dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, device=None):
        c = self.config
        device = device if device is not None else self.inv_freq_short.device
        if device.type == "meta":
            return
        exponent = torch.arange(0, c.rotary_dim, 2, dtype=torch.int64, device=device).float() / c.rotary_dim
        theta_pow = c.rope_theta ** exponent  # (rotary_dim/2,)
        short = long = torch.ones_like(theta_pow)
        if c.rope_scaling is not None:
            short = torch.tensor(c.rope_scaling["short_factor"], dtype=torch.float32, device=device)
            long = torch.tensor(c.rope_scaling["long_factor"], dtype=torch.float32, device=device)
        # 1 / (factor * theta^(2i/d)) exactly as transformers computes it: (1 / theta^(2i/d)) / factor differs in the
        # last bit for about a third of LongRoPE's frequencies, which moves cos/sin far out (position 100k+)
        self.inv_freq_short = 1.0 / (short * theta_pow)
        self.inv_freq_long = 1.0 / (long * theta_pow)

    def _apply(self, fn, *args, **kwargs):
        # Module.to(dtype) / .half() / .bfloat16() would round the frequencies to the model's dtype (bf16 keeps 8
        # bits: the angles are off by radians a few thousand positions in). Keep them fp32, recomputed on whatever
        # device the module went to (this also fills them after to_empty() from the meta device).
        super()._apply(fn, *args, **kwargs)
        self.reset_parameters()
        return self

    def uses_long(self, max_position: int) -> bool:
        c = self.config
        return c.rope_scaling is not None and max_position + 1 > c.original_max_position_embeddings

    def forward(self, position_ids: torch.Tensor, long: bool, dtype: torch.dtype):
        # position_ids (B, T) -> cos, sin (B, T, rotary_dim), angles in fp32
        inv_freq = self.inv_freq_long if long else self.inv_freq_short
        freqs = position_ids[..., None].float() * inv_freq.float()  # (B, T, rotary_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = self.config.rope_attention_factor
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


class KVCache:
    """Preallocated keys and values for every layer: (B, Hkv, max_len, D) each; `length` slots are filled."""

    def __init__(self, config: Phi3Config, batch_size: int, max_len: int, dtype, device):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0  # slots filled by earlier calls
        self.long_rope = False  # whether the cached keys were rotated with LongRoPE's long factors

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        # k, v (B, Hkv, T_new, D) -> all keys and values so far (B, Hkv, length + T_new, D)
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} tokens > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    kernel = "rope"  # attention itself is SDPA's

    def __init__(self, config: Phi3Config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=False)  # rows [q | k | v]
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)
        self.use_kernel = False
        # phi3mini.probe puts a callable (layer_idx, q, k, v, mask) -> y here while it records attention
        # probabilities (eager attention); None keeps the SDPA path
        self.probe = None

    def forward(self, x, cos, sin, plan, cache: KVCache | None):
        # plan: attention.py's plan for this call (causal, dense mask, per-document segments or a flex block mask)
        B, T, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if self.use_kernel:
            from phi3lora.kernels.rope import apply_rope  # the Triton kernel (imported here: it imports Triton)
            q, k = apply_rope(q, k, cos, sin)  # q (B, Hq, T, D), k (B, Hkv, T, D); the first R dims of a head rotate
        else:
            q, k = apply_rope_reference(q, k, cos, sin)  # cos/sin (B, T, R)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, S, D), S = cached + T
        if self.probe is not None:  # eager attention over the dense mask: the probe records the (T, S) probabilities
            k, v = repeat_kv(k, v, self.n_head)  # GQA: each kv head serves n_head / n_kv query heads
            y = self.probe(self.layer_idx, q, k, v, plan.dense_mask())  # (B, Hq, T, D)
        else:
            y = plan.attend(q, k, v)  # (B, Hq, T, D)
        y = y.transpose(1, 2).reshape(B, T, q_size)  # (B, T, Hq*D)
        return self.o_proj(y)


class MLP(nn.Module):
    kernel = "swiglu"

    def __init__(self, config: Phi3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)  # [gate | up]
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.use_kernel = False

    def forward(self, x):
        gate_up = self.gate_up_proj(x)  # (B, T, 2I)
        if self.use_kernel:
            from phi3lora.kernels.silu_mul import swiglu
            return self.down_proj(swiglu(gate_up))
        return self.down_proj(swiglu_reference(gate_up))


class Block(nn.Module):
    def __init__(self, config: Phi3Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, plan, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, plan, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Phi3Model(nn.Module):
    """The decoder stack; named `model` inside `Phi3` as in the checkpoints."""

    def __init__(self, config: Phi3Config):
        super().__init__()
        pad_id = config.pad_token_id
        pad = pad_id if pad_id is not None and pad_id < config.vocab_size else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=pad)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Phi3(nn.Module):
    kernel = "fused_ce"  # the loss: lm_head + cross-entropy in row chunks, never holding all fp32 logits

    def __init__(self, config: Phi3Config):
        super().__init__()
        self.config = config
        self.model = Phi3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        # how packed rows and rows past the sliding window attend (attention.py): "auto" (FlexAttention on CUDA
        # when it works, else per-document SDPA), "flex", "segments", or "dense" (the (B, 1, T, T) mask)
        self.attention_backend = "auto"
        self.use_kernel = False  # the fused loss (see `kernel`); the blocks' modules have their own
        self.generation_config: dict = {}
        self.name_or_path: str | None = None  # the Hub id, folder or preset it came from (adapters record it)

    # ----- switches ---------------------------------------------------------------------------------------------
    def set_kernels(self, enabled: bool | None = None, **which: bool) -> "Phi3":
        """Turn the Triton kernels on or off: set_kernels(True), or set_kernels(rmsnorm=True, fused_ce=False, ...).
        Names: KERNEL_NAMES. Sets `use_kernel` on every module whose `kernel` is named (the model itself for
        fused_ce; lora/ layers for lora_linear, which are on by default). A kernel still runs only on CUDA (or
        under TRITON_INTERPRET=1), and falls back to torch for good if its first-run self-check fails."""
        unknown = set(which) - set(KERNEL_NAMES)
        if unknown:
            raise ValueError(f"unknown kernel names {sorted(unknown)}; choose from {KERNEL_NAMES}")
        flags = {n: which.get(n, enabled) for n in KERNEL_NAMES}
        for m in self.modules():
            flag = flags.get(getattr(m, "kernel", None))
            if flag is not None:
                m.use_kernel = bool(flag)
        return self

    # ----- forward ----------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: KVCache | None = None, document_ids: torch.Tensor | None = None,
                loss_reduction: str = "mean", logits_to_keep: int = 0):
        """input_ids (B, T) -> logits (B, T, vocab) in fp32 compute dtype of the head, or a loss when labels given.

        attention_mask (B, S): 1 for real tokens, 0 for padding, S = cached + T slots. A right-padded training
        batch needs no mask (causality already hides the trailing pads from real tokens).
        position_ids (B, T): default cached + arange(T); pass them for left-padded or packed batches.
        labels (B, T): aligned with input_ids and shifted inside (token t predicts labels[t+1]), -100 ignored;
        returns the mean ("mean") or summed ("sum") cross-entropy over target tokens, or ("row") each row's sum (B,).
        document_ids (B, T): packed examples attend only within their own document.
        logits_to_keep: if > 0, only the last that many positions go through lm_head (generation).
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        max_position = start + T - 1  # known without reading the device (no GPU sync) unless positions are given
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        elif self.config.rope_scaling is not None:  # only LongRoPE needs the actual largest position
            max_position = int(position_ids.max())
        if cache is not None and document_ids is not None:
            raise ValueError("document_ids (packing) cannot be combined with a KV cache")
        if attention_mask is not None and attention_mask.shape[-1] < start + T:
            raise ValueError(f"attention_mask has {attention_mask.shape[-1]} columns; it needs one per cached and new "
                             f"token ({start} + {T})")
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        long = self.rotary.uses_long(max_position)
        cos, sin = self.rotary(position_ids, long, x.dtype)  # (B, T, rotary_dim)
        c = self.config
        # built once per call, shared by every layer (and by the recomputation under gradient checkpointing)
        plan = make_plan(self.attention_backend, T, start, c.sliding_window, attention_mask, document_ids, B,
                         x.device, x.dtype, (c.num_attention_heads, c.num_key_value_heads, c.head_dim))
        for block in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # non-reentrant: a frozen base still passes gradients through to the LoRA weights
                x = checkpoint(block, x, cos, sin, plan, cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, plan, cache)
        if cache is not None:
            cache.length += T
            cache.long_rope = long
        x = self.model.norm(x)
        if labels is not None:
            return self.loss(x, labels, loss_reduction)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(x)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy from the final hidden states (B, T, H) and unshifted labels (B, T)."""
        if reduction not in ("mean", "sum", "row"):
            raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'row', got {reduction!r}")
        if reduction == "row":  # (B,) each sequence's summed loss: -log p(targets), what preference losses need
            return torch.stack([self.loss(hidden[b:b + 1], labels[b:b + 1], "sum") for b in range(hidden.shape[0])])
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), H)
        y = labels[:, 1:].reshape(-1)  # (B*(T-1),)
        # the fused kernel multiplies by lm_head.weight itself: only for a plain nn.Linear head (an adapter on
        # lm_head, or a merged-away wrapper, would be skipped and never trained)
        if self.use_kernel and type(self.lm_head) is nn.Linear:
            from phi3lora.kernels.cross_entropy import fused_linear_cross_entropy
            return fused_linear_cross_entropy(h, self.lm_head.weight, y, ignore_index=IGNORE, reduction=reduction)
        return cross_entropy_reference(self.lm_head(h), y, ignore_index=IGNORE, reduction=reduction)

    # ----- weights ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_hub_id, dtype: torch.dtype | None = None, device=None,
                        quantize: str = "") -> "Phi3":
        """Load a Hugging Face Phi-3 checkpoint (local folder or Hub id) straight into dtype and device;
        quantize="nf4" makes the decoder projections 4-bit while loading (bitsandbytes 4-bit checkpoints are)."""
        from .weights import load_pretrained
        return load_pretrained(cls, path_or_hub_id, dtype=dtype, device=device, quantize=quantize)

    def save_pretrained(self, out_dir, max_shard_bytes: int = 5 * 1024**3) -> None:
        """Write config.json + safetensors (sharded above max_shard_bytes) in the Hugging Face layout."""
        from .weights import save_pretrained
        save_pretrained(self, out_dir, max_shard_bytes=max_shard_bytes)

    @classmethod
    def from_name(cls, name: str, seed: int = 0, dtype: torch.dtype = torch.float32, device=None, **overrides):
        """A randomly initialised model from a preset (e.g. "tiny"), deterministic for a seed."""
        from .presets import preset
        model = cls(Phi3Config.from_name(name, **overrides))
        model.init_weights(seed)
        model.name_or_path = name  # recorded in adapters trained on it
        model.generation_config = {"eos_token_id": list(preset(name).eos_ids)}  # as the Hub's generation_config
        return model.to(dtype=dtype, device=device)

    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def num_parameters(self) -> int:
        """Parameters as the model computes with them: a 4-bit weight (phi3mini/quant.py) counts its out·in
        values, not its packed bytes."""
        packed = sum(m.in_features * m.out_features - m.weight.numel() for m in self.modules()
                     if hasattr(m, "nf4_meta"))
        return sum(p.numel() for p in self.parameters()) + packed

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Model FLOPs per token at seq_len: 2 per matmul weight forward, 2 more in a LoRA backward (through the
        activations only, no weight gradient), plus attention's scores and values (2·2·d per visible key, per head
        and layer). A query sees the keys up to itself within the sliding window: on average (T+1)/2 without a
        window cut, fewer when the window is shorter than the sequence (Phi-3-mini-4k at 4096: 1536, not 2048).
        Embedding lookups are not FLOPs."""
        c = self.config
        n = self.num_parameters() - (0 if c.tie_word_embeddings else self.model.embed_tokens.weight.numel())
        w = min(seq_len, c.sliding_window or seq_len)
        visible = (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len  # mean keys per query
        attn = 2 * 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * visible
        if not training:
            return 2 * n + attn
        return 4 * n + 3 * attn  # attention's backward costs twice its forward (dQ, dK, dV, dP)


__all__ = ["Phi3", "Phi3Config", "KVCache", "RMSNorm", "RotaryEmbedding", "Attention", "MLP", "Block",
           "build_attention_mask", "rotate_half", "BACKENDS"]
