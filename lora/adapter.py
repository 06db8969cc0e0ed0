"""Adapter folders: the LoRA tensors alone (safetensors) plus a JSON description, written atomically, loaded
strictly.

    DIR/adapter.safetensors   every tensor of lora_state_dict(model, config.bias), keys as in the model's
                              state dict (model.layers.0.self_attn.qkv_proj.lora_A, ...), in the parameters' dtype
    DIR/adapter_config.json   {"format": "phi3-lora-adapter", "format_version": 1, "lora": LoraConfig,
                               "layers": {module: LayerSpec}, "base_model": ..., "model": {sizes},
                               "tensors": {key: shape}}

`load_adapter` checks everything before it changes the model: a missing folder or file, a corrupt file, another
model size (the tensor is named with both shapes), other LoRA settings, missing or unexpected keys are each one
AdapterError. A folder holding a PEFT adapter (adapter_config.json with peft_type "LORA") goes to `load_peft`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from phi3mini import atomic

from .inject import LayerSpec, LoraConfig, apply_specs, lora_layers
from .utils import lora_state_dict, mark_only_lora_as_trainable

FORMAT = "phi3-lora-adapter"
FORMAT_VERSION = 1
WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
MODEL_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size")


class AdapterError(ValueError):
    """An adapter folder that cannot be saved or loaded as asked; the message names the file, tensor or module."""


# ----- writing a folder atomically ---------------------------------------------------------------------------------
def write_dir_atomically(target, write) -> Path:
    """Call write(tmp_dir) on a fresh sibling folder and put it in place of target (phi3mini.atomic.write_dir: an
    error leaves target as it was). An existing target must be empty or an adapter folder (hold
    adapter_config.json): anything else is refused rather than replaced."""
    target = Path(target)
    if target.exists():
        if not target.is_dir():
            raise AdapterError(f"{target}: exists and is not a folder")
        if any(target.iterdir()) and not (target / CONFIG_NAME).exists():
            raise AdapterError(f"{target}: exists and is not an adapter folder (no {CONFIG_NAME}); "
                               "refusing to replace it")
    return atomic.write_dir(target, write)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    import safetensors.torch  # looked up at call time, so tests can make the write fail

    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    # through atomic.write_file for the umask's mode (safetensors alone creates the file 0600)
    meta = metadata or {"format": "pt"}
    atomic.write_file(path, lambda tmp: safetensors.torch.save_file(cpu, str(tmp), metadata=meta))


# ----- reading -----------------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    if not path.is_file():
        raise AdapterError(f"{path}: missing (not an adapter folder?)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return data


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU; a missing, truncated or corrupt file is an AdapterError."""
    from safetensors.torch import load_file

    if not path.is_file():
        pickles = sorted(p.name for p in path.parent.glob("*.bin"))
        hint = f" (found {pickles}: pickle files are not loaded; convert them to safetensors)" if pickles else ""
        raise AdapterError(f"{path}: missing{hint}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
        raise AdapterError(f"{path}: not a readable safetensors file, corrupt or incomplete "
                           f"({type(e).__name__}: {e})") from None


def model_info(model: nn.Module) -> dict:
    c = getattr(model, "config", None)
    return {k: getattr(c, k) for k in MODEL_KEYS if isinstance(getattr(c, k, None), int)}


# ----- checking an adapter against a model -------------------------------------------------------------------------
def expected_shapes(model: nn.Module, specs: dict[str, LayerSpec], bias: str) -> tuple[dict[str, tuple], list[str]]:
    """{state-dict key: shape} of the adapter tensors the model will hold once specs are injected (the model has
    no LoRA layers yet), and the problems found: a spec naming a module the model lacks, or of another type or
    size."""
    problems, shapes = [], {}
    modules = dict(model.named_modules())
    for name, spec in specs.items():
        m = modules.get(name)
        if m is None:
            problems.append(f"{name}: the adapter has LoRA for it, the model has no such module")
            continue
        if spec.kind == "Embedding":
            if not isinstance(m, nn.Embedding):
                problems.append(f"{name}: the adapter has an Embedding adapter, the model's module is a "
                                f"{type(m).__name__}")
                continue
            shapes[f"{name}.lora_A"] = (spec.r, m.num_embeddings)
            shapes[f"{name}.lora_B"] = (m.embedding_dim, spec.r)
        elif spec.kind in ("Linear", "MergedLinear"):
            if not isinstance(m, nn.Linear):
                problems.append(f"{name}: the adapter has a {spec.kind} adapter, the model's module is a "
                                f"{type(m).__name__}")
                continue
            if spec.kind == "Linear":
                shapes[f"{name}.lora_A"] = (spec.r, m.in_features)
                shapes[f"{name}.lora_B"] = (m.out_features, spec.r)
            else:
                if sum(spec.slice_sizes) != m.out_features:
                    problems.append(f"{name}: the adapter's slices {list(spec.slice_sizes)} sum to "
                                    f"{sum(spec.slice_sizes)}, the model's layer has {m.out_features} outputs")
                n = sum(spec.enable_lora)
                rows = sum(s for s, on in zip(spec.slice_sizes, spec.enable_lora) if on)
                shapes[f"{name}.lora_A"] = (spec.r * n, m.in_features)
                shapes[f"{name}.lora_B"] = (rows, spec.r)
            if bias == "all" or (bias == "lora_only" and m.bias is not None):
                if m.bias is not None:
                    shapes[f"{name}.bias"] = tuple(m.bias.shape)
        else:
            problems.append(f"{name}: layer kind {spec.kind!r} cannot be injected into a fresh model")
    if bias == "all":  # every other bias of the model too
        for k, v in model.state_dict().items():
            if "bias" in k and k not in shapes:
                shapes[k] = tuple(v.shape)
    return shapes, problems


def check_tensors(where, found: dict[str, tuple], expected: dict[str, tuple], problems=(), context=()) -> None:
    """One AdapterError listing the problems, shape mismatches (adapter vs model), missing and unexpected keys;
    context lines (e.g. the model sizes the adapter was saved for) come first."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [f"{k}: adapter {tuple(found[k])} vs model {tuple(expected[k])}"
                  for k in sorted(set(found) & set(expected)) if tuple(found[k]) != tuple(expected[k])]
    if not (missing or unexpected or mismatched or problems):
        return
    lines = [f"{where}: the adapter does not fit the model", *context, *problems]
    if mismatched:
        lines.append("shape mismatches:\n    " + _listing(mismatched, "\n    "))
    if missing:
        lines.append(f"missing LoRA tensors ({len(missing)}): {_listing(missing)}")
    if unexpected:
        lines.append(f"unexpected tensors ({len(unexpected)}): {_listing(unexpected)}")
    raise AdapterError("\n  ".join(lines))


def _listing(items: list[str], sep: str = ", ", limit: int = 20) -> str:
    return sep.join(items[:limit]) + (f"{sep}..." if len(items) > limit else "")


def check_existing_layers(where, model: nn.Module, specs: dict[str, LayerSpec]) -> None:
    """The model already has LoRA layers: they must be the adapter's (same modules, kinds, r, alpha, slices)."""
    have = {n: LayerSpec.of(m) for n, m in lora_layers(model) if m.has_lora}
    problems = [f"{n}: the adapter has LoRA here, the model does not" for n in sorted(set(specs) - set(have))]
    problems += [f"{n}: the model has LoRA here, the adapter does not" for n in sorted(set(have) - set(specs))]
    for n in sorted(set(have) & set(specs)):
        if not have[n].same_adapter(specs[n]):
            a, b = specs[n], have[n]
            problems.append(f"{n}: adapter {a.kind} r={a.r} alpha={a.lora_alpha} rslora={a.use_rslora} "
                            f"enable_lora={a.enable_lora} vs model {b.kind} r={b.r} alpha={b.lora_alpha} "
                            f"rslora={b.use_rslora} enable_lora={b.enable_lora}")
    if problems:
        raise AdapterError(f"{where}: the model's LoRA layers differ from the adapter's (load it into a fresh "
                           "base model instead):\n  " + "\n  ".join(problems[:20]))


def assign_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy into the model's parameters (cast to their dtype and device). Merged layers are unmerged first and
    merged again after, so they end up merged with the new adapter."""
    merged = [m for _, m in lora_layers(model) if m.merged]
    for m in merged:
        m.unmerge()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)
    for m in merged:
        m.merge()


# ----- public API ---------------------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, dir, config: LoraConfig | None = None) -> Path:
    """Write the model's LoRA tensors (lora_state_dict(model, config.bias)) and their description to dir,
    atomically (see write_dir_atomically). Merged or not makes no difference: A and B are saved as they are.
    config defaults to model.lora_config (set by inject / load_adapter)."""
    config = config if config is not None else getattr(model, "lora_config", None)
    if not isinstance(config, LoraConfig):
        raise AdapterError("save_adapter needs the LoraConfig (the model has no lora_config attribute)")
    layers = {n: m for n, m in lora_layers(model) if m.has_lora}
    if not layers:
        raise AdapterError("the model has no LoRA layers to save (call lora.inject first)")
    tensors = lora_state_dict(model, config.bias)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lora": config.to_dict(),
        "layers": {n: LayerSpec.of(m).to_dict() for n, m in layers.items()},
        "base_model": getattr(model, "name_or_path", None),
        "model": model_info(model),
        "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", ""),
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
    }

    def write(tmp: Path):
        save_tensors(tensors, tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))

    return write_dir_atomically(dir, write)


def load_adapter(model: nn.Module, dir) -> nn.Module:
    """Load an adapter folder (ours, or a PEFT LoRA folder) into model, in place; returns model.

    A model without LoRA layers gets them first, as the adapter describes (so a fresh base model works); a model
    with LoRA layers must have the adapter's. The loaded adapter replaces the current one; layers that were
    merged are merged again with the new one. Every check runs before the model is changed."""
    dir = Path(dir)
    if not dir.is_dir():
        raise AdapterError(f"{dir}: no such adapter folder")
    meta = read_json(dir / CONFIG_NAME)
    if "peft_type" in meta:
        if meta["peft_type"] != "LORA":
            raise AdapterError(f"{dir / CONFIG_NAME}: peft_type {meta['peft_type']!r}; only LORA adapters load")
        from .peft_io import load_peft
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
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    fresh, problems = not lora_layers(model), []
    if fresh:
        expected, problems = expected_shapes(model, specs, config.bias)
    else:
        check_existing_layers(where, model, specs)
        expected = {k: tuple(v.shape) for k, v in lora_state_dict(model, config.bias).items()}
    check_tensors(dir / WEIGHTS_NAME, found, expected, problems, context)

    if fresh:
        apply_specs(model, specs)
        mark_only_lora_as_trainable(model, config.bias)
    model.lora_config = config
    assign_tensors(model, tensors)
    return model

