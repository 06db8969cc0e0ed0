"""What adapter folders of both kinds share (ours: native_io.py, PEFT's: peft_io.py): the error type, atomic writing,
strict reading of JSON and safetensors, the checks of an adapter against a model, and the one install step that
puts checked LoRA tensors into a model.

    install(model, specs, config, tensors, ...)   check every tensor against the model (fresh, or already holding
                                                  the same layers), then inject the layers and copy the tensors
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from phi3lora import atomic

from .inject import LayerSpec, LoraConfig, apply_specs, lora_layers, saved_modules, train_saved_modules
from .utils import lora_state_dict, mark_only_lora_as_trainable

CONFIG_NAME = "adapter_config.json"  # ours and PEFT's: load_adapter tells them apart by its peft_type field
MODEL_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size")


class AdapterWarning(UserWarning):
    """An adapter that loads but may not do what it did in training (e.g. onto another base model)."""


class AdapterError(ValueError):
    """An adapter folder that cannot be saved or loaded as asked; the message names the file, tensor or module."""


# ----- writing a folder atomically ---------------------------------------------------------------------------------
def write_adapter_dir(target, write) -> Path:
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
            if spec.use_dora:
                shapes[f"{name}.lora_magnitude_vector"] = (m.embedding_dim,)
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
            if spec.use_dora:
                shapes[f"{name}.lora_magnitude_vector"] = (m.out_features,)
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
        lines.append("shape mismatches:\n    " + listing(mismatched, "\n    "))
    if missing:
        lines.append(f"missing LoRA tensors ({len(missing)}): {listing(missing)}")
    if unexpected:
        lines.append(f"unexpected tensors ({len(unexpected)}): {listing(unexpected)}")
    raise AdapterError("\n  ".join(lines))


def listing(items: list[str], sep: str = ", ", limit: int = 20) -> str:
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
                            f"enable_lora={a.enable_lora} dora={a.use_dora} init={a.init_lora_weights} vs model "
                            f"{b.kind} r={b.r} alpha={b.lora_alpha} rslora={b.use_rslora} "
                            f"enable_lora={b.enable_lora} dora={b.use_dora} init={b.init_lora_weights}")
    if problems:
        raise AdapterError(f"{where}: the model's LoRA layers differ from the adapter's (load it into a fresh "
                           "base model instead):\n  " + "\n  ".join(problems[:20]))


def assign_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy into the model's parameters (cast to their dtype and device). Merged layers are unmerged first and
    merged again after, so they end up merged with the new adapter."""
    merged = [m for _, m in lora_layers(model) if m.merged]
    for m in merged:
        m.unmerge()
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights under each of their names
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)
    for m in merged:
        m.merge()


# ----- which base model ---------------------------------------------------------------------------------------------
def base_fingerprint(model: nn.Module) -> dict[str, list[float]]:
    """{parameter: 4 of its values} for the base weights outside the repeated blocks and the first block's norms
    (embedding, final norm, lm_head, layer 0's norms): cheap to take (a few small reads), yet two bases of the same
    shape (another seed, another fine-tune) differ in them. Left out: the projections (a 4-bit base stores them as
    codes, and a QLoRA adapter may go onto the bf16 base), weights of merged LoRA layers (they hold the adapter
    too), anything not floating-point."""
    merged = {f"{n}.{p}" for n, m in lora_layers(model) if m.merged for p in ("weight", "bias")}
    trained = set(getattr(getattr(model, "lora_config", None), "modules_to_save", ()))  # the adapter's, not the base's
    out = {}
    for name, p in model.named_parameters():
        in_block = ".layers." in name
        if (not p.is_floating_point() or "lora_" in name.rsplit(".", 1)[-1] or name in merged
                or trained & set(name.split(".")[:-1])
                or (in_block and not (".layers.0." in name and "norm" in name))):
            continue
        n = p.numel()
        if n:
            idx = torch.tensor(sorted({0, n // 3, 2 * n // 3, n - 1}), device=p.device)
            out[name] = [float(v) for v in p.detach().reshape(-1)[idx].float().cpu()]
    return out


def check_base(where, meta: dict, model: nn.Module) -> None:
    """Warn (AdapterWarning) when the model's base weights differ from those the adapter was saved with (its
    base_fingerprint), naming both bases. A tolerance of 2% covers the same base loaded in another dtype."""
    saved = meta.get("base_fingerprint")
    if not isinstance(saved, dict):
        return  # an adapter written before fingerprints were recorded
    mine = base_fingerprint(model)
    differ = [k for k in sorted(set(saved) & set(mine)) if len(saved[k]) != len(mine[k]) or not all(
        math.isclose(a, b, rel_tol=2e-2, abs_tol=1e-3) for a, b in zip(saved[k], mine[k]))]
    if differ:
        name = getattr(model, "name_or_path", None)
        warnings.warn(f"{where}: this adapter was trained on base model {meta.get('base_model')!r}, and this model "
                      f"({name!r}) has other weights (e.g. {listing(differ, limit=3)}); "
                      "it will not behave as in training: load it onto the base it was trained on",
                      AdapterWarning, stacklevel=3)


def install(model: nn.Module, specs: dict[str, LayerSpec], config: LoraConfig, tensors: dict[str, torch.Tensor],
            where, weights_path, context=()) -> nn.Module:
    """The one step both loaders end with. Checks tensors ({state-dict key: tensor}) against the model: a model
    without LoRA layers must be able to take specs (modules present, of the right kind and size), a model with
    LoRA layers must hold exactly specs; every key and shape must match, every value be finite (an AdapterError
    naming weights_path otherwise, context lines first). Only then is the model changed: fresh layers injected,
    only LoRA trainable, model.lora_config set, the tensors copied in (merged layers merged again). Returns model."""
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    fresh, problems = not lora_layers(model), []
    try:
        saved = saved_modules(model, config)  # modules_to_save: trained whole, their tensors in the adapter
    except ValueError as e:
        raise AdapterError(f"{where}: {e}") from None
    if fresh:
        expected, problems = expected_shapes(model, specs, config.bias)
    else:
        check_existing_layers(where, model, specs)
        expected = {k: tuple(v.shape) for k, v in lora_state_dict(model, config.bias).items()}
    expected.update({f"{n}.{k}": tuple(v.shape) for n, m in saved.items() for k, v in m.state_dict().items()})
    check_tensors(weights_path, found, expected, problems, context)
    poisoned = sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if poisoned:
        raise AdapterError(f"{weights_path}: NaN or infinite values in {len(poisoned)} tensors "
                           f"({listing(poisoned, limit=5)}): the adapter is broken (trained with too high a learning "
                           "rate?); use an earlier checkpoint's adapter")
    if fresh:
        apply_specs(model, specs)
        mark_only_lora_as_trainable(model, config.bias)
    train_saved_modules(model, saved)
    model.lora_config = config
    assign_tensors(model, tensors)
    return model
