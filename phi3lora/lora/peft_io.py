"""PEFT interop: write our adapters as peft LoRA folders and read peft LoRA folders into our model, exactly.

peft's format (adapter_config.json + adapter_model.safetensors): one adapter per module, keys
base_model.model.<module>.lora_A.weight (r, in) and .lora_B.weight (out, r) (embeddings: .lora_embedding_A (r, num),
.lora_embedding_B (dim, r)), scaling lora_alpha / r (rsLoRA: / sqrt(r)), per-module r and alpha through
rank_pattern / alpha_pattern (regex keys matched against the end of the module name).

Our MergedLinear has no one-to-one peft form: it carries one rank-r adapter per enabled slice of a fused
projection (q, k, v of qkv_proj). It is the same map as a single adapter of rank r' = r·n_enabled with
    A' = lora_A (r·n, in)           the enabled slices' A blocks, stacked (as MergedLinear already stores them)
    B' = block-structured (out, r·n): slice e's rows hold its B in columns [e·r, (e+1)·r), disabled slices are zero
    alpha' = s·r'  (rsLoRA: s·sqrt(r')), so that peft's scaling alpha'/r' equals ours, s,
since x·A'ᵀ·B'ᵀ puts slice e's x·A_eᵀ·B_eᵀ on its own rows and nothing elsewhere.

One r for every reader: vLLM (vllm/lora/peft_helper.py) reads only r, lora_alpha, target_modules, bias, use_rslora,
use_dora and modules_to_save, applies the one scaling lora_alpha / r (rsLoRA: / sqrt(r)) to every module, takes each
module's rank from its tensors, and refuses r above its --max-lora-rank; rank_pattern / alpha_pattern are ignored.
So export_peft writes r = the largest rank of any adapter (r·n_enabled of a MergedLinear qkv_proj: 48 for r 16 on
q, k and v), lora_alpha = s0·r (s0: the most common scaling), and folds s / s0 into B where a module's scaling
differs. peft, which sizes modules from rank_pattern, finds the modules of smaller rank there, each with the alpha
that gives s0 at its rank in alpha_pattern. Both readers then compute exactly our s·B·A for every module.

split_fused=True writes qkv_proj as q_proj / k_proj / v_proj and gate_up_proj as gate_proj / up_proj (for servers
that refuse LoRA on fused modules, vllm #4915): a plain adapter's A is copied to each part and B sliced by rows; a
MergedLinear slice keeps its own A_e, B_e (rank r) and a disabled slice gets no adapter. transformers' Phi-3 has
no split modules, so such a folder is for other runtimes; `load_peft` reads it back (fusing the parts again).

`load_peft` injects one layer per peft adapter: a plain Linear (rank from the tensors) on qkv_proj, gate_up_proj
and every other linear, an Embedding on embeddings; split q/k/v or gate/up adapters with one rank and alpha become
a MergedLinear on the fused module. DoRA (use_dora) round-trips: peft's key <module>.lora_magnitude_vector (out,)
is our layer's parameter of the same name; modules_to_save (peft's key base_model.model.lm_head.weight for the
trained copy of lm_head) become the model's own weights, trained in place (inject.py). Features it cannot honour
are refused, naming the field: lora_bias, trained biases, trainable tokens, layer replication, initialisations
that rewrite the base weights (PiSSA, CorDA, OLoRA, LoftQ, LoRA-GA: such a folder goes onto the residual base peft
saved; one converted with path_initial_model_for_weight_conversion says init_lora_weights=True and loads) and the
other non-LoRA variants.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapter_files import CONFIG_NAME, AdapterError, install, read_json, read_tensors, save_tensors, write_adapter_dir
from .inject import (LayerSpec, LoraConfig, adaptable_modules, leaf_name, lora_layers, qkv_slice_sizes,
                     saved_modules_state)
from .layers import ConvLoRA, Embedding, Linear, MergedLinear
from .utils import lora_state_dict

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel wraps the LoraModel which wraps the transformers model
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
PART_OF = {part: fused for fused, parts in FUSED.items() for part in parts}
# peft config fields that ask for more than plain LoRA: refused when set
REFUSED = ("lora_bias", "trainable_token_indices", "layer_replication", "use_qalora",
           "alora_invocation_tokens", "target_parameters", "use_bdlora", "arrow_config", "kasa_config",
           "velora_config", "monteclora_config", "megatron_config")
# init_lora_weights values after which peft's base weights are no longer the pretrained ones: peft re-runs these
# initialisations when it loads the folder (W - s·B₀·A₀, or a quantized W), which this loader cannot reproduce
BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def _number(x: float):
    """An int when x is (nearly) integral, for tidy JSON."""
    return int(round(x)) if math.isclose(x, round(x), rel_tol=0, abs_tol=1e-9) else x


def _fused_slices(model: nn.Module, name: str, m) -> list[int]:
    if isinstance(m, MergedLinear):
        return list(m.slice_sizes)
    out = m.out_features
    if leaf_name(name) == "qkv_proj":
        return qkv_slice_sizes(model, out)
    if out % 2:
        raise ValueError(f"{name}: {out} outputs cannot split into gate and up halves")
    return [out // 2, out // 2]


def _peft_adapters(model: nn.Module, split_fused: bool):
    """[(module name, is_embedding, A, B, r, scaling, DoRA magnitude or None)] in peft's terms, one entry per
    peft adapter. A layer initialised with PiSSA / OLoRA is written for the ORIGINAL base, as peft's
    save_pretrained(path_initial_model_for_weight_conversion=...) converts it: the weight holds W − s·B₀·A₀, so
    s·B·A − s·B₀·A₀ = s·[B | −B₀]·[A ; A₀] is the update to W, a rank-2r adapter with the same scaling."""
    out = []
    for name, m in lora_layers(model):
        if not m.has_lora:
            continue
        if isinstance(m, ConvLoRA) or getattr(m, "fan_in_fan_out", False):
            raise ValueError(f"{name}: {type(m).__name__} (fan_in_fan_out={getattr(m, 'fan_in_fan_out', False)}) "
                             "has no peft equivalent this exporter writes")
        A, B, s = m.lora_A.detach(), m.lora_B.detach(), m.scaling
        mag = m.lora_magnitude_vector.detach() if getattr(m, "use_dora", False) else None
        rank = m.r
        if "lora_A_init" in m._buffers:  # a Linear (PiSSA / OLoRA never build a MergedLinear)
            if mag is not None:
                raise ValueError(f"{name}: DoRA with init_lora_weights={m.init_lora_weights!r} has no exact form on "
                                 "the original base (the norm is of the residual weight); peft cannot convert it "
                                 "either")
            A = torch.cat([A, m.lora_A_init.to(A.dtype)], 0)    # (2r, in)
            B = torch.cat([B, -m.lora_B_init.to(B.dtype)], 1)   # (out, 2r)
            rank = 2 * m.r
        parent, _, last = name.rpartition(".")
        prefix = parent + "." if parent else ""
        split = split_fused and last in FUSED
        if isinstance(m, Embedding):
            out.append((name, True, A, B, m.r, s, mag))
        elif isinstance(m, MergedLinear):
            if split and len(FUSED[last]) == len(m.slice_sizes):
                if mag is not None and not all(m.enable_lora):
                    raise ValueError(f"{name}: split_fused with DoRA needs every slice enabled (a disabled slice "
                                     "has a trained magnitude but no adapter to carry it)")
                # each enabled slice keeps its own rank-r adapter; a disabled slice has none. DoRA's norm is per
                # row, so each part's magnitude is its rows' share
                parts = [part for part, on in zip(FUSED[last], m.enable_lora) if on]
                enabled_sizes = [size for size, on in zip(m.slice_sizes, m.enable_lora) if on]  # B's row blocks
                mags = mag.split(enabled_sizes) if mag is not None else [None] * len(parts)
                for part, A_e, B_e, m_e in zip(parts, A.split(m.r), B.split(enabled_sizes), mags):
                    out.append((prefix + part, False, A_e, B_e, m.r, s, m_e))
            else:
                n = sum(m.enable_lora)
                out.append((name, False, A, m.full_B(), m.r * n, s, mag))  # rank r·n block form (module docstring)
        elif isinstance(m, Linear):
            if split:
                start = 0
                for part, size in zip(FUSED[last], _fused_slices(model, name, m)):
                    m_e = mag[start:start + size] if mag is not None else None
                    out.append((prefix + part, False, A, B[start:start + size], rank, s, m_e))  # A copied, B by rows
                    start += size
            else:
                out.append((name, False, A, B, rank, s, mag))
        else:
            raise ValueError(f"{name}: cannot export a {type(m).__name__}")
    return out


def export_peft(model: nn.Module, dir, config: LoraConfig | None = None, base_model_name_or_path: str | None = None,
                split_fused: bool = False) -> Path:
    """Write the model's adapters as a peft LoRA folder (adapter_config.json + adapter_model.safetensors) that
    `peft.PeftModel.from_pretrained(transformers Phi3ForCausalLM, dir)` loads with the same outputs, and that a
    reader of only r / lora_alpha (vLLM: one scaling for every module) loads the same way: see "One r" in the
    module docstring. MergedLinear becomes a rank r·n_enabled adapter with a block-structured B. Written
    atomically. A server needs a maximum LoRA rank of at least the top-level r (`vllm_max_lora_rank`)."""
    config = config if config is not None else getattr(model, "lora_config", None)
    if lora_state_dict(model, config.bias if config else "none").keys() - lora_state_dict(model).keys():
        raise ValueError(f"bias={config.bias!r}: exporting trained biases to peft is not supported")
    adapters = _peft_adapters(model, split_fused)
    if not adapters:
        raise ValueError("the model has no LoRA layers to export (call lora.inject first)")
    rslora = config.use_rslora if config else False

    def peft_alpha(r, s):  # alpha that gives scaling s at rank r under peft's rule
        return s * (math.sqrt(r) if rslora else r)

    # One top-level r and lora_alpha that are right for every module, for readers that use nothing else (vLLM):
    # r = the largest rank, alpha the one giving the most common scaling s0 at that rank, and an adapter with
    # another scaling carries s / s0 in its B. peft sizes each module from rank_pattern, so modules of another
    # rank are named there, with the alpha that gives s0 at their rank in alpha_pattern.
    dora = {mag is not None for *_, mag in adapters}
    if len(dora) > 1:
        raise ValueError("some LoRA layers use DoRA and others not: peft's use_dora is one setting for all")
    use_dora = dora == {True}
    r0 = max(r for *_, r, _, _ in adapters)
    s0 = Counter(s for *_, s, _ in adapters).most_common(1)[0][0]
    alpha0 = peft_alpha(r0, s0)
    adapters = [(name, emb, A, B if math.isclose(s, s0, rel_tol=1e-12) else (B.float() * (s / s0)).to(B.dtype), r, s0,
                 mag) for name, emb, A, B, r, s, mag in adapters]

    # rank_pattern / alpha_pattern: a module-name suffix when all its modules agree, else full module names
    rank_pattern, alpha_pattern = {}, {}
    groups: dict[str, list] = {}
    for name, _, _, _, r, _, _ in adapters:
        groups.setdefault(leaf_name(name), []).append((name, r))
    for suffix, members in groups.items():
        uniform = len({r for _, r in members}) == 1
        for name, r in (members[:1] if uniform else members):
            if r != r0:
                key = suffix if uniform else name
                rank_pattern[key], alpha_pattern[key] = r, _number(peft_alpha(r, s0))

    # modules_to_save: peft saves its trained copy under the module's own key (base_model.model.lm_head.weight),
    # without the wrapper's modules_to_save.<adapter name> infix, and puts it back there when it loads
    tensors = {PREFIX + k: v for k, v in saved_modules_state(model, config).items()}
    for name, emb, A, B, _, _, mag in adapters:
        if emb:
            tensors[f"{PREFIX}{name}.lora_embedding_A"], tensors[f"{PREFIX}{name}.lora_embedding_B"] = A, B
        else:
            tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"] = A, B
        if mag is not None:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = mag  # peft's key (no ".weight")
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None),
        "revision": None,
        "inference_mode": True,
        "r": r0,
        "lora_alpha": _number(alpha0),
        "lora_dropout": config.lora_dropout if config else 0.0,
        "target_modules": sorted(groups),
        "exclude_modules": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": rslora,
        "use_dora": use_dora,
        "lora_bias": False,
        "init_lora_weights": True,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": list(config.modules_to_save) if config and config.modules_to_save else None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }

    def write(tmp: Path):
        save_tensors(tensors, tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2))

    return write_adapter_dir(dir, write)


def vllm_max_lora_rank(r: int) -> int:
    """The smallest --max-lora-rank vLLM accepts for an adapter of top-level rank r: a power of two from 8 to
    512 (vLLM's allowed values) not below r."""
    if r > 512:
        raise ValueError(f"rank {r} is above 512, the largest --max-lora-rank vLLM accepts")
    return max(8, 1 << (r - 1).bit_length())


# ----- reading ------------------------------------------------------------------------------------------------------
def _pattern_value(patterns: dict, module: str, default):
    """peft's rule: the first pattern key k (a regex) with re.match(rf"(.*\\.)?({k})$", module) decides."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _parse_keys(where: Path, tensors: dict, modules_to_save=()) -> tuple[dict, dict, dict]:
    """peft keys -> ({module: {"A", "B", "embedding"}}, {module: base weight}, {our key: tensor of a module of
    modules_to_save}); unknown keys are an error."""
    suffixes = {".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False),
                ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True),
                ".lora_magnitude_vector": ("M", False)}
    adapters, base, saved, unexpected = {}, {}, {}, []
    for key, t in tensors.items():
        rest = key[len(PREFIX):] if key.startswith(PREFIX) else None
        for suffix, (which, emb) in suffixes.items():
            if rest is not None and rest.endswith(suffix):
                entry = adapters.setdefault(rest[: -len(suffix)], {"embedding": emb})
                entry["embedding"] = entry["embedding"] or emb
                entry[which] = t
                break
        else:
            if rest is not None and rest.endswith(".base_layer.weight"):
                base[rest[: -len(".base_layer.weight")]] = t
            elif rest is not None and set(rest.split(".")[:-1]) & set(modules_to_save):
                saved[rest] = t
            else:
                unexpected.append(key)
    incomplete = [f"{PREFIX}{m}." + (f"lora_embedding_{w}" if e["embedding"] else f"lora_{w}.weight")
                  for m, e in adapters.items() for w in ("A", "B") if w not in e]  # the file's own key names
    if unexpected or incomplete or not adapters:
        lines = [f"{where}: not a LoRA adapter this loader understands"]
        if unexpected:
            lines.append(f"unexpected tensors ({len(unexpected)}): {', '.join(sorted(unexpected)[:20])}")
        if incomplete:
            lines.append(f"missing tensors: {', '.join(sorted(incomplete)[:20])}")
        if not adapters:
            lines.append("no LoRA tensors")
        raise AdapterError("\n  ".join(lines))
    return adapters, base, saved


@dataclass(frozen=True)
class _PeftSettings:
    """The fields of a peft adapter_config.json this loader honours (the rest are refused or irrelevant)."""
    r: int
    lora_alpha: float
    use_rslora: bool
    lora_dropout: float
    rank_pattern: dict
    alpha_pattern: dict
    use_dora: bool = False
    modules_to_save: tuple = ()


def _read_peft_config(cfg_path: Path) -> _PeftSettings:
    """adapter_config.json, with every field that asks for more than plain LoRA refused by name."""
    cfg = read_json(cfg_path)
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}; only LORA adapters load")
    for field in REFUSED:
        if cfg.get(field) not in (None, False, [], {}, ""):
            raise AdapterError(f"{cfg_path}: {field}={cfg[field]!r} is not supported (plain LoRA only)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise AdapterError(f"{cfg_path}: init_lora_weights={init!r}: this adapter was saved without conversion and "
                           "goes onto the residual base peft saved with it (W - s·B₀·A₀), not onto the original "
                           "model; not supported. Save it with peft's save_pretrained(..., "
                           "path_initial_model_for_weight_conversion=...) for an adapter on the original base")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{cfg_path}: bias={cfg['bias']!r} is not supported (trained biases); only 'none'")
    try:
        r0, alpha0 = int(cfg["r"]), float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{cfg_path}: r / lora_alpha missing or invalid ({e})") from None
    saved = cfg.get("modules_to_save") or ()
    if isinstance(saved, str):
        saved = (saved,)
    return _PeftSettings(r0, alpha0, bool(cfg.get("use_rslora", False)), float(cfg.get("lora_dropout") or 0.0),
                         cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}, bool(cfg.get("use_dora")),
                         tuple(leaf_name(m) for m in saved))  # peft matches them by the end of the module name


def _check_base_weights(weights: Path, base: dict, modules: dict) -> None:
    """peft saves embedding / lm_head base weights alongside their adapters: they must be the model's."""
    for name, w in base.items():
        m = modules.get(name)
        if m is None or not hasattr(m, "weight") or m.weight.shape != w.shape or not torch.equal(
                m.weight.detach().cpu(), w.to(m.weight.dtype)):
            raise AdapterError(f"{weights}: {PREFIX}{name}.base_layer.weight differs from the model's weight "
                               "(the adapter was trained with changed base weights, e.g. resized embeddings); "
                               "this loader keeps the model's weights and cannot honour it")


def _fuse_parts(model, fused: str, parts: dict, dropout: float, rslora: bool, problems: list):
    """Split q/k/v (gate/up) adapters of one fused module -> (MergedLinear LayerSpec, A, B), or None after adding
    what is wrong to problems. parts: {part name: (LayerSpec, {"A", "B"})}."""
    names = FUSED[leaf_name(fused)]
    kinds = {(s.r, s.lora_alpha) for s, _ in parts.values()}
    if len(kinds) != 1:
        problems.append(f"{fused}: its split adapters {sorted(parts)} have different r / alpha {sorted(kinds)}; "
                        "only equal ones fuse exactly")
        return None
    spec0 = next(iter(parts.values()))[0]
    m = dict(model.named_modules())[fused]
    sizes = _fused_slices(model, fused, m) if isinstance(m, nn.Linear) else None
    if sizes is None or len(sizes) != len(names):
        problems.append(f"{fused}: not a fused linear module the split adapters can go onto")
        return None
    # each part's shapes, checked here with the file's key names (and before torch.cat could fail on them)
    parent, _, _ = fused.rpartition(".")
    bad = []
    for n, size in zip(names, sizes):
        if n in parts:
            for which, want in (("A", (spec0.r, m.in_features)), ("B", (size, spec0.r))):
                got = tuple(parts[n][1][which].shape)
                if got != want:
                    bad.append(f"{PREFIX}{parent + '.' if parent else ''}{n}.lora_{which}.weight: "
                               f"adapter {got} vs model {want}")
    if bad:
        problems += bad
        return None
    enable = tuple(n in parts for n in names)
    if spec0.use_dora and not all(enable):
        problems.append(f"{fused}: DoRA on only {sorted(parts)} of {list(names)}: the other rows would need a "
                        "magnitude of their own, which the file lacks")
        return None
    spec = LayerSpec("MergedLinear", spec0.r, spec0.lora_alpha, dropout, rslora, enable, tuple(sizes),
                     use_dora=spec0.use_dora)
    mag = torch.cat([parts[n][1]["M"] for n in names]) if spec0.use_dora else None  # the norm is per row
    return (spec, torch.cat([parts[n][1]["A"] for n in names if n in parts]),
            torch.cat([parts[n][1]["B"] for n in names if n in parts]), mag)


def load_peft(model: nn.Module, dir) -> nn.Module:
    """Load a peft LoRA folder into model (fresh, or already holding the same layers); returns model.
    The result computes what peft computes on the transformers model with the same weights."""
    dir = Path(dir)
    if not dir.is_dir():
        raise AdapterError(f"{dir}: no such adapter folder")
    cfg_path = dir / CONFIG_NAME
    st = _read_peft_config(cfg_path)
    weights = dir / WEIGHTS_NAME
    adapters, base, saved = _parse_keys(weights, read_tensors(weights), st.modules_to_save)
    modules = dict(model.named_modules())
    _check_base_weights(weights, base, modules)

    # one LayerSpec and our tensors per module; split parts grouped onto their fused module
    specs, ours, problems = {}, {}, []
    groups: dict[str, dict] = {}
    for name, e in adapters.items():
        r = e["A"].shape[0]
        r_cfg = _pattern_value(st.rank_pattern, name, st.r)
        if r != r_cfg:
            problems.append(f"{name}: lora_A has rank {r} but the config gives r={r_cfg}")
        alpha = float(_pattern_value(st.alpha_pattern, name, st.lora_alpha))
        if ("M" in e) != st.use_dora:
            problems.append(f"{name}: use_dora={st.use_dora} but the file has "
                            f"{'a' if 'M' in e else 'no'} lora_magnitude_vector for it")
            continue
        spec = LayerSpec("Embedding" if e["embedding"] else "Linear", r, alpha,
                         0.0 if e["embedding"] else st.lora_dropout, st.use_rslora, use_dora=st.use_dora)
        parent, _, last = name.rpartition(".")
        fused = (parent + "." if parent else "") + PART_OF.get(last, "")
        if name not in modules and last in PART_OF and fused in modules:
            groups.setdefault(fused, {})[last] = (spec, e)
            continue
        if name not in modules:
            names = list(adaptable_modules(model)) + [n for n, _ in lora_layers(model)]
            candidates = sorted({leaf_name(n) for n in names})
            problems.append(f"{name}: the adapter has LoRA for it, the model has no such module "
                            f"(its linear and embedding modules are named {candidates})")
            continue
        specs[name], ours[f"{name}.lora_A"], ours[f"{name}.lora_B"] = spec, e["A"], e["B"]
        if spec.use_dora:
            ours[f"{name}.lora_magnitude_vector"] = e["M"]
    for fused, parts in groups.items():
        done = _fuse_parts(model, fused, parts, st.lora_dropout, st.use_rslora, problems)
        if done is not None:
            specs[fused], ours[f"{fused}.lora_A"], ours[f"{fused}.lora_B"], mag = done
            if mag is not None:
                ours[f"{fused}.lora_magnitude_vector"] = mag
    if problems:
        raise AdapterError(f"{dir}: the PEFT adapter does not fit the model:\n  " + "\n  ".join(problems[:20]))

    qkv = [s.enable_lora for n, s in specs.items() if s.kind == "MergedLinear" and leaf_name(n) == "qkv_proj"]
    try:
        config = LoraConfig(r=st.r, lora_alpha=_number(st.lora_alpha), lora_dropout=st.lora_dropout,
                            target_modules=tuple(sorted({leaf_name(n) for n in specs})),
                            enable_lora=qkv[0] if qkv else (True, True, True), bias="none", use_rslora=st.use_rslora,
                            use_dora=st.use_dora, modules_to_save=st.modules_to_save)
    except ValueError as e:
        raise AdapterError(f"{cfg_path}: {e}") from None
    return install(model, specs, config, {**ours, **saved}, cfg_path, weights)
