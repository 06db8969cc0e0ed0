"""4-bit NF4 base weights (QLoRA) in bitsandbytes' file format.

`Linear4bit` is a frozen nn.Linear whose weight is stored as NF4 codes (kernels/nf4.py): its state dict holds
exactly the keys a transformers `load_in_4bit` checkpoint holds (`weight` packed uint8, `weight.absmax`,
`weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4`), so
`save_pretrained` writes a bitsandbytes-format folder and a "-bnb-4bit" Hub checkpoint loads through the ordinary
`load_state_dict`. Its forward runs the fused NF4 GEMM (kernels/nf4_lora.py) on CUDA, else dequantizes (fp32, one
rounding to the input's dtype) and calls F.linear.

What gets quantized (QUANTIZED_LINEARS): the decoder layers' four projections, as transformers does for Phi-3; the
embedding, lm_head and norms stay in the model dtype (bitsandbytes skips lm_head; llm_int8_skip_modules).
"""
from __future__ import annotations

import torch
from torch import nn

from phi3lora.kernels.nf4 import NF4Meta, QUANT_STATE_KEY, dequantize_nf4, quantize_nf4

QUANTIZED_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
QUANT_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")  # buffers; weight.<key> in files
QUANTIZE_CHOICES = ("", "none", "nf4")  # "" and "none": no quantization


def quantization_config(compute_dtype: torch.dtype) -> dict:
    """config.json's quantization_config for a folder of NF4 linears (what transformers writes and reads)."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."), "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": ["lm_head"]}


class NF4Weight:
    """A layer whose `weight` is the packed NF4 codes, with its scales and tables as buffers (a mixin for
    Linear4bit and the 4-bit LoRA layers of lora/nf4.py): the bitsandbytes entries in and out of state dicts,
    dequantization, and dtype casts that leave the scales alone."""

    def set_tensors(self, tensors: dict, where: str = "") -> None:
        """Take the bitsandbytes entries (keys relative to the layer: "weight", "weight.absmax", ...)."""
        meta = NF4Meta.from_tensor(tensors[f"weight.{QUANT_STATE_KEY}"], where or "4-bit weight")
        if tuple(meta.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{where}: the 4-bit weight has shape {meta.shape}, the layer is "
                             f"({self.out_features}, {self.in_features})")
        missing = [f"weight.{k}" for k in QUANT_KEYS[:2] if f"weight.{k}" not in tensors]
        if meta.double_quant:
            missing += [f"weight.{k}" for k in QUANT_KEYS[2:] if f"weight.{k}" not in tensors]
        if missing:
            raise ValueError(f"{where}: 4-bit weight without {missing}")
        self.nf4_meta = meta
        self.weight = nn.Parameter(tensors["weight"], requires_grad=False)
        for key in QUANT_KEYS:
            t = tensors.get(f"weight.{key}")
            self._buffers[key] = t if t is not None else torch.empty(0, device=tensors["weight"].device)

    def nf4_tensors(self) -> dict:
        """The bitsandbytes entries of this weight (relative keys), as kernels.nf4 takes them."""
        out = {"weight": self.weight, f"weight.{QUANT_STATE_KEY}": self.nf4_meta.to_tensor()}
        for key in QUANT_KEYS:
            if self._buffers[key].numel():
                out[f"weight.{key}"] = self._buffers[key]
        return out

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight (out, in): fp32 products, one rounding to dtype (default: the original dtype)."""
        return dequantize_nf4(self.nf4_tensors(), dtype)

    # ----- bitsandbytes key names in state dicts ---------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.is_meta:  # a placeholder (before loading): only the packed weight's name and shape
            return
        for key, value in self.nf4_tensors().items():
            if key != "weight":
                destination[prefix + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        extra = {k[len(prefix):]: state_dict[k] for k in list(state_dict)
                 if k.startswith(prefix + "weight.")}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        ours = {prefix + k for k in extra}
        unexpected_keys[:] = [k for k in unexpected_keys if k not in ours]  # nn.Module knows no dotted names
        if prefix + "weight" in state_dict:
            try:
                self.set_tensors({"weight": self.weight.data, **extra}, where=prefix + "weight")
            except (KeyError, ValueError) as e:
                error_msgs.append(str(e) if not isinstance(e, KeyError) else
                                  f"{prefix}weight: no {prefix}weight.{QUANT_STATE_KEY} (not a 4-bit weight)")

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must not round the fp32 scales and tables: hide them as int32 bit patterns
        # (Module.to converts floating tensors only), then view them back.
        for key in QUANT_KEYS:
            if self._buffers[key].dtype == torch.float32:
                self._buffers[key] = self._buffers[key].view(torch.int32)
        try:
            return super()._apply(fn, recurse)
        finally:
            for key in QUANT_KEYS:
                if self._buffers[key].dtype == torch.int32:
                    self._buffers[key] = self._buffers[key].view(torch.float32)


class Linear4bit(NF4Weight, nn.Linear):
    """A frozen linear layer with an NF4 weight; weight is the packed uint8 Parameter ((out·in + 1) // 2, 1)."""

    kernel = "lora_linear"  # Phi3.set_kernels(lora_linear=False) switches the fused NF4 GEMM off (torch dequant)
    use_kernel = True

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: str = "bfloat16",
                 device=None):
        with torch.device("meta"):
            nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self.nf4_meta = NF4Meta(shape=(out_features, in_features), dtype=dtype, nested_offset=0.0)
        # placeholders until tensors are assigned (load_state_dict(assign=True) or from_linear)
        self.weight = nn.Parameter(torch.empty(((out_features * in_features + 1) // 2, 1), dtype=torch.uint8,
                                               device=device or "meta"), requires_grad=False)
        for key in QUANT_KEYS:
            self.register_buffer(key, torch.empty(0, device=device or "meta"), persistent=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device or "meta"), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64) -> "Linear4bit":
        """Quantize an nn.Linear's weight (on its device); the bias stays as it is."""
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                dtype=str(linear.weight.dtype).removeprefix("torch."))
        m.set_tensors(quantize_nf4(linear.weight.detach(), blocksize=blocksize))
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from phi3lora.kernels.nf4_lora import nf4_lora_linear, nf4_lora_linear_reference

        no_lora = x.new_zeros(0, self.in_features), x.new_zeros(self.out_features, 0)  # rank 0: the base GEMM
        if not self.use_kernel:
            return nf4_lora_linear_reference(x, self.nf4_tensors(), self.bias, *no_lora, 1.0)
        return nf4_lora_linear(x, self.nf4_tensors(), self.bias, *no_lora, 1.0, meta=self.nf4_meta)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", nf4 blocksize={self.nf4_meta.blocksize}"


def quantized_names(model: nn.Module) -> list[str]:
    """Names of the linears `quantize_model` turns into Linear4bit (plain nn.Linear ones only)."""
    return [n for n, m in model.named_modules()
            if type(m) is nn.Linear and n.rsplit(".", 1)[-1] in QUANTIZED_LINEARS]


def swap_in_4bit(model: nn.Module, names, dtype: str = "bfloat16") -> None:
    """Replace the named nn.Linear modules by empty (meta) Linear4bit ones, ready for load_state_dict(assign=True)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        setattr(parent, child, Linear4bit(old.in_features, old.out_features, bias=old.bias is not None, dtype=dtype))


def quantize_model(model: nn.Module, blocksize: int = 64) -> nn.Module:
    """Turn the model's decoder projections into Linear4bit in place (each quantized on its own device)."""
    for name in quantized_names(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Linear4bit.from_linear(getattr(parent, child), blocksize))
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Linear4bit) for m in model.modules())


def base_weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (packed codes, scales, tables, dense tensors)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total

