"""LoRA for phi3mini with loralib's API (`import lora` runs microsoft/LoRA's README examples), plus injection into
a model, adapter files and PEFT interop. See layers.py for what deviates from loralib on purpose."""
from .adapter_files import AdapterError, AdapterWarning
from .native_io import load_adapter, load_adapter_for_cli, save_adapter
from .inject import LayerSpec, LoraConfig, inject, lora_layers, merge, print_trainable_parameters, unmerge
from .layers import Conv1d, Conv2d, Conv3d, ConvLoRA, Embedding, Linear, LoRALayer, MergedLinear
from .peft_io import export_peft, load_peft, vllm_max_lora_rank
from .utils import lora_state_dict, mark_only_lora_as_trainable

__all__ = [
    "LoRALayer", "Linear", "Embedding", "MergedLinear", "ConvLoRA", "Conv1d", "Conv2d", "Conv3d",
    "mark_only_lora_as_trainable", "lora_state_dict",
    "LoraConfig", "LayerSpec", "inject", "merge", "unmerge", "print_trainable_parameters", "lora_layers",
    "AdapterError", "AdapterWarning", "save_adapter", "load_adapter", "load_adapter_for_cli", "export_peft",
    "load_peft", "vllm_max_lora_rank",
]
