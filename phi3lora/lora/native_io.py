"""Our adapter format (PEFT's is peft_io.py): the LoRA tensors alone (safetensors) plus a JSON description,
written atomically, loaded strictly.

    DIR/adapter.safetensors   every tensor of lora_state_dict(model, config.bias) and of the modules_to_save
                              (lm_head.weight, ...), keys as in the model's state dict
                              (model.layers.0.self_attn.qkv_proj.lora_A, ...), in the parameters' dtype
    DIR/adapter_config.json   {"format": "phi3-lora-adapter", "format_version": 1, "lora": LoraConfig,
                               "layers": {module: LayerSpec}, "base_model": name_or_path,
                               "base_fingerprint": {param: 4 values}, "model": {sizes}, "tensors": {key: shape}}

`load_adapter` checks everything before it changes the model: a missing folder or file, a corrupt file, another
model size (the tensor is named with both shapes), other LoRA settings, missing or unexpected keys are each one
AdapterError. An adapter that fits a base model other than the one it was trained on (same shapes, other weights:
base_fingerprint) loads with an AdapterWarning. A folder holding a PEFT adapter (adapter_config.json with peft_type
"LORA") goes to `load_peft`; a checkpoint or run folder that holds an adapter/ is pointed at it.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from torch import nn

from phi3lora import console

from .adapter_files import (CONFIG_NAME, MODEL_KEYS, AdapterError, AdapterWarning, base_fingerprint, check_base,
                            install, model_info, read_json, read_tensors, save_tensors, write_adapter_dir)
from .inject import LayerSpec, LoraConfig, lora_layers, merge as merge_layers, saved_modules_state
from .peft_io import load_peft
from .utils import lora_state_dict

FORMAT = "phi3-lora-adapter"
FORMAT_VERSION = 1
WEIGHTS_NAME = "adapter.safetensors"


# ----- public API ---------------------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, dir, config: LoraConfig | None = None, fingerprint: dict | None = None) -> Path:
    """Write the model's LoRA tensors (lora_state_dict(model, config.bias)) and their description to dir,
    atomically (adapter_files.write_adapter_dir). Merged or not makes no difference: A and B are saved as they are.
    config defaults to model.lora_config (set by inject / load_adapter). fingerprint: adapter_files's
    base_fingerprint(model), taken beforehand (a base sharded over processes by FSDP cannot be read by one alone);
    by default it is taken now."""
    config = config if config is not None else getattr(model, "lora_config", None)
    if not isinstance(config, LoraConfig):
        raise AdapterError("save_adapter needs the LoraConfig (the model has no lora_config attribute)")
    layers = {n: m for n, m in lora_layers(model) if m.has_lora}
    if not layers:
        raise AdapterError("the model has no LoRA layers to save (call lora.inject first)")
    tensors = {**lora_state_dict(model, config.bias), **saved_modules_state(model, config)}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lora": config.to_dict(),
        "layers": {n: LayerSpec.of(m).to_dict() for n, m in layers.items()},
        "base_model": getattr(model, "name_or_path", None),
        "base_fingerprint": base_fingerprint(model) if fingerprint is None else fingerprint,
        "model": model_info(model),
        "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", ""),
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
    }

    def write(tmp: Path):
        save_tensors(tensors, tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))

    return write_adapter_dir(dir, write)


def load_adapter(model: nn.Module, dir) -> nn.Module:
    """Load an adapter folder (ours, or a PEFT LoRA folder) into model, in place; returns model.

    A model without LoRA layers gets them first, as the adapter describes (so a fresh base model works); a model
    with LoRA layers must have the adapter's. The loaded adapter replaces the current one; layers that were
    merged are merged again with the new one. Every check runs before the model is changed."""
    dir = Path(dir)
    if not dir.is_dir():
        raise AdapterError(f"{dir}: no such adapter folder")
    if not (dir / CONFIG_NAME).exists() and (dir / "adapter" / CONFIG_NAME).exists():
        # a training checkpoint (checkpoints/step-N) or a run folder holds its adapter one level down
        raise AdapterError(f"{dir}: not an adapter folder, but it holds one: point at {dir / 'adapter'}")
    meta = read_json(dir / CONFIG_NAME)
    if "peft_type" in meta:
        if meta["peft_type"] != "LORA":
            raise AdapterError(f"{dir / CONFIG_NAME}: peft_type {meta['peft_type']!r}; only LORA adapters load")
        return load_peft(model, dir)
    where = dir / CONFIG_NAME
    if meta.get("format") != FORMAT:
        raise AdapterError(f"{where}: not a {FORMAT} file (format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{where}: format_version {meta.get('format_version')!r} is not supported "
                           f"(this version reads {FORMAT_VERSION})")
    try:
        config = LoraConfig.from_dict(meta["lora"])
        specs = {n: LayerSpec.from_dict(d) for n, d in meta["layers"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise AdapterError(f"{where}: invalid adapter description ({type(e).__name__}: {e})") from None
    tensors = read_tensors(dir / WEIGHTS_NAME)

    info, saved_info = model_info(model), meta.get("model") or {}
    context = [f"the adapter was saved for {k}={saved_info[k]}, the model has {k}={info[k]}"
             for k in MODEL_KEYS if k in info and k in saved_info and info[k] != saved_info[k]]
    install(model, specs, config, tensors, where, dir / WEIGHTS_NAME, context)
    check_base(where, meta, model)  # after the strict checks: a warning only for an adapter that fits
    return model


def load_adapter_for_cli(model: nn.Module, dir, merge: bool = False, stderr=None) -> None:
    """load_adapter as the programs (chat, eval, serve) use it: any failure becomes one AdapterError naming the
    `--adapter` folder; an AdapterWarning (an adapter trained on other base weights) is printed as one plain
    `warning:` line, not in Python's warning format. merge: fold the adapter into the weights afterwards."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AdapterWarning)
            load_adapter(model, dir)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, OSError) as e:
        raise AdapterError(f"--adapter {dir}: {e}") from None
    for w in caught:
        if issubclass(w.category, AdapterWarning):
            console.warn(str(w.message), file=stderr or sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if merge:
        # W + s·B·A is computed in fp32 inside each layer and cast once to W's dtype (a bf16 sum drifts:
        # peft #1388); the model itself stays in its dtype, so merging needs no second copy of the weights
        merge_layers(model)
