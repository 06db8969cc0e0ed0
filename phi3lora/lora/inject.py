"""Put LoRA into an existing model by swapping modules in place: `LoraConfig`, `inject`, `merge`, `unmerge`.

Each targeted nn.Linear / nn.Embedding is replaced by a LoRA layer that holds the very same weight Parameter (no
copy; the new layer is built on the meta device, so no second weight is ever allocated). On Phi-3, qkv_proj
becomes a MergedLinear with one adapter per enabled q / k / v slice (slice sizes from the model config, unequal
under grouped-query attention); every other target becomes a Linear (or Embedding).

Choices, documented here once:
- LoRA parameters get the base weight's dtype (fp32 on an fp32 model, bf16 on a bf16 one) unless `inject(...,
  dtype=)` says otherwise; the layers cast them to the input's dtype in forward, so a trainer may keep them in fp32.
- Injected layers have merge_weights=False: eval() does not fold the adapter into the weights (which in bf16
  would change the frozen weights a little on every eval/train round trip). Merge explicitly with `merge(model)`.
- `inject` freezes everything but the adapters (and the biases config.bias names), as peft does.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from .layers import BASE_CHANGING, ConvLoRA, Embedding, Linear, LoRALayer, MergedLinear, check_init
from .utils import BIAS_MODES, mark_only_lora_as_trainable

ALL_LINEAR = "all-linear"  # peft's shorthand: every nn.Linear except the output layer (lm_head)


@dataclass
class LoraConfig:
    """What to adapt and how. target_modules are last name components ("qkv_proj" matches
    model.layers.N.self_attn.qkv_proj), or "all-linear"; enable_lora switches the q, k, v slices of qkv_proj."""
    # metadata: the help text and constraints train.py's flags and checks are generated from (training/config.py)
    r: int = field(default=16, metadata={"help": "LoRA rank", "above": 0})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA scaling numerator (scale alpha/r)", "above": 0})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on LoRA input", "min": 0, "below": 1})
    target_modules: tuple = field(default=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
                                  metadata={"help": "layers that get LoRA (last name components, or all-linear)"})
    enable_lora: tuple = field(default=(True, True, True),
                               metadata={"help": "LoRA on the q, k, v slices of qkv_proj", "length": 3})
    bias: str = field(default="none", metadata={"help": "biases to train (Phi-3 has none)", "choices": BIAS_MODES})
    use_rslora: bool = field(default=False, metadata={"help": "scale alpha/sqrt(r)"})
    use_dora: bool = field(default=False, metadata={"help": "DoRA: a trained magnitude per output row times the "
                                                             "direction of W + s·B·A", "aliases": ("--use-dora",)})
    init_lora_weights: str = field(default="kaiming", metadata={
        "help": "adapter init as peft's: kaiming (True), gaussian, pissa, pissa_niter_K, olora (the last three "
                "change the base weights to a residual)", "aliases": ("--init-lora-weights",)})
    # peft's modules_to_save: whole modules trained (and saved with the adapter) rather than adapted, in place
    modules_to_save: tuple = field(default=(), metadata={
        "help": "modules trained fully and saved with the adapter (last name components, e.g. lm_head,embed_tokens)",
        "aliases": ("--modules-to-save",)})

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        self.enable_lora = tuple(self.enable_lora)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        alpha = self.lora_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"LoraConfig.lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoraConfig.bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"LoraConfig.target_modules must be a non-empty list of module names, "
                             f"got {self.target_modules!r}")
        if not self.enable_lora or not all(isinstance(e, bool) for e in self.enable_lora):
            raise ValueError(f"LoraConfig.enable_lora must be booleans (q, k, v), got {self.enable_lora!r}")
        if not any(self.enable_lora):
            raise ValueError("LoraConfig.enable_lora is all False: qkv_proj would get no adapter")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoraConfig.use_rslora must be a bool, got {self.use_rslora!r}")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"LoraConfig.use_dora must be a bool, got {self.use_dora!r}")
        try:
            self.init_lora_weights = check_init(self.init_lora_weights)
        except ValueError as e:
            raise ValueError(f"LoraConfig.{e}") from None
        if self.base_changing and not all(self.enable_lora):
            raise ValueError(f"init_lora_weights={self.init_lora_weights!r} puts one adapter over the whole fused "
                             f"qkv_proj (as peft): enable_lora must be all True, got {self.enable_lora!r}")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = (self.modules_to_save,)
        self.modules_to_save = tuple(self.modules_to_save or ())
        if not all(isinstance(t, str) and t for t in self.modules_to_save):
            raise ValueError(f"LoraConfig.modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        both = sorted(set(self.modules_to_save) & set(self.target_modules))
        if both:
            raise ValueError(f"{both} are in both target_modules and modules_to_save: a module is either adapted "
                             "(LoRA) or trained fully, not both")

    @property
    def base_changing(self) -> bool:
        """An init after which the targeted weights hold the residual W − s·B₀·A₀ (PiSSA, OLoRA)."""
        return self.init_lora_weights.startswith(BASE_CHANGING)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"], d["enable_lora"] = list(self.target_modules), list(self.enable_lora)
        d["modules_to_save"] = list(self.modules_to_save)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LoraConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class LayerSpec:
    """One LoRA layer as built by inject, enough to build it again (adapter files record these)."""
    kind: str  # "Linear" | "MergedLinear" | "Embedding"
    r: int
    lora_alpha: float
    lora_dropout: float = 0.0
    use_rslora: bool = False
    enable_lora: tuple | None = None  # MergedLinear only
    slice_sizes: tuple | None = None  # MergedLinear only
    use_dora: bool = False
    init_lora_weights: str = "kaiming"  # a base-changing one is re-run on load, giving the same residual

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("enable_lora", "slice_sizes"):
            d[k] = list(d[k]) if d[k] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LayerSpec":
        d = dict(d)
        for k in ("enable_lora", "slice_sizes"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)

    @classmethod
    def of(cls, m: LoRALayer) -> "LayerSpec":
        """The spec of an existing layer (fan_in_fan_out and conv layers have none: inject never builds them)."""
        p = m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0
        if isinstance(m, ConvLoRA) or getattr(m, "fan_in_fan_out", False):
            kind = type(m).__name__ + ("(fan_in_fan_out)" if getattr(m, "fan_in_fan_out", False) else "")
            return cls(kind, m.r, m.lora_alpha, p, m.use_rslora)
        variants = dict(use_dora=getattr(m, "use_dora", False), init_lora_weights=getattr(m, "init_lora_weights",
                                                                                          "kaiming"))
        if isinstance(m, MergedLinear):
            return cls("MergedLinear", m.r, m.lora_alpha, p, m.use_rslora, tuple(m.enable_lora), tuple(m.slice_sizes),
                       **variants)
        kind = "Linear" if isinstance(m, Linear) else type(m).__name__  # a 4-bit Linear is a Linear adapter
        if kind == "Embedding":
            return cls(kind, m.r, m.lora_alpha, p, m.use_rslora, use_dora=variants["use_dora"])
        return cls(kind, m.r, m.lora_alpha, p, m.use_rslora, **variants)

    def same_adapter(self, other: "LayerSpec") -> bool:
        """Equal in everything that decides the tensors' meaning (dropout aside; alpha up to float rounding)."""
        a, b = self.to_dict(), other.to_dict()
        for d in (a, b):
            del d["lora_dropout"], d["lora_alpha"]
        return a == b and math.isclose(self.lora_alpha, other.lora_alpha, rel_tol=1e-12)


# ----- finding things ---------------------------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    """(name, layer) for every LoRA layer in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer)]


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of the linear and embedding modules that can take LoRA (not LoRA layers already)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding)) and not isinstance(m, LoRALayer)}


def leaf_name(name: str) -> str:
    """The last part of a dotted module name: model.layers.0.self_attn.qkv_proj -> qkv_proj."""
    return name.rsplit(".", 1)[-1]


def qkv_slice_sizes(model: nn.Module, out_features: int) -> list[int]:
    """[q, k, v] row counts of a fused qkv projection: from the model config (heads, kv heads, head_dim),
    else three equal slices."""
    c = getattr(model, "config", None)
    heads = getattr(c, "num_attention_heads", None)
    if heads:
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        kv = getattr(c, "num_key_value_heads", None) or heads
        sizes = [heads * head_dim, kv * head_dim, kv * head_dim]
        if sum(sizes) == out_features:
            return sizes
        raise ValueError(f"qkv_proj has {out_features} outputs but the config says q, k, v = {sizes}")
    if out_features % 3:
        raise ValueError(f"qkv_proj has {out_features} outputs, not three equal slices, and the model has no "
                         "config to read the q/k/v sizes from")
    return [out_features // 3] * 3


def plan(model: nn.Module, config: LoraConfig) -> dict[str, LayerSpec]:
    """{module name: LayerSpec} for every module the config targets; a target matching nothing is an error."""
    candidates = adaptable_modules(model)
    targets = set(config.target_modules)
    if ALL_LINEAR in targets:
        if targets != {ALL_LINEAR}:
            raise ValueError(f"target_modules {sorted(targets)}: '{ALL_LINEAR}' cannot be combined with names")
        chosen = [n for n, m in candidates.items() if isinstance(m, nn.Linear) and leaf_name(n) != "lm_head"]
        if not chosen:
            raise ValueError("target_modules 'all-linear': the model has no nn.Linear module besides lm_head")
    else:
        chosen = [n for n in candidates if leaf_name(n) in targets]
        missing = sorted(targets - {leaf_name(n) for n in chosen})
        if missing:
            others = {leaf_name(n): type(m).__name__ for n, m in model.named_modules() if n}
            wrong_type = [f"{t} (a {others[t]})" for t in missing if t in others]
            raise ValueError(
                f"target_modules {missing} match no nn.Linear / nn.Embedding module of the model"
                + (f" ({', '.join(wrong_type)} cannot take LoRA)" if wrong_type else "")
                + f"; its linear and embedding modules are named: {sorted({leaf_name(n) for n in candidates})}")
    specs = {}
    for name in chosen:
        m = candidates[name]
        common = dict(r=config.r, lora_alpha=config.lora_alpha, use_rslora=config.use_rslora)
        variants = dict(use_dora=config.use_dora, init_lora_weights=config.init_lora_weights)
        if isinstance(m, nn.Embedding):
            # loralib's Embedding: no dropout, and its own init (A zero, B normal) whatever init_lora_weights says,
            # PiSSA / OLoRA included: peft's Embedding does the same, so its base embedding stays unchanged
            specs[name] = LayerSpec("Embedding", **common, use_dora=config.use_dora)
        elif config.base_changing and _is_4bit(m):
            raise ValueError(f"{name}: init_lora_weights={config.init_lora_weights!r} needs the full-precision "
                             "weight; a 4-bit base has none (as in peft: initialise on the bf16/fp32 base)")
        elif leaf_name(name) == "qkv_proj" and not config.base_changing:
            if len(config.enable_lora) != 3:
                raise ValueError(f"enable_lora needs three flags (q, k, v) for qkv_proj, got {config.enable_lora}")
            specs[name] = LayerSpec("MergedLinear", lora_dropout=config.lora_dropout,
                                    enable_lora=tuple(config.enable_lora),
                                    slice_sizes=tuple(qkv_slice_sizes(model, m.out_features)), **common, **variants)
        else:  # PiSSA / OLoRA on qkv_proj: one rank-r adapter over q, k and v, as peft (an SVD of the fused W)
            specs[name] = LayerSpec("Linear", lora_dropout=config.lora_dropout, **common, **variants)
    return specs


def _is_4bit(m: nn.Module) -> bool:
    """An NF4 layer (phi3mini.quant): duck-typed, so `import phi3lora.lora` imports neither quant nor Triton."""
    return hasattr(m, "nf4_tensors")


# ----- swapping modules --------------------------------------------------------------------------------------------
def build_layer(old: nn.Module, spec: LayerSpec, dtype: torch.dtype | None = None) -> LoRALayer:
    """A LoRA layer around old's own weight (and bias) Parameter; fresh A and B on the weight's device."""
    weight = old.weight
    kw = dict(r=spec.r, lora_alpha=spec.lora_alpha, merge_weights=False, use_rslora=spec.use_rslora)
    variants = dict(use_dora=spec.use_dora, init_lora_weights=spec.init_lora_weights)
    with torch.device("meta"):  # no second weight is allocated or initialised
        if spec.kind == "Embedding":
            if not isinstance(old, nn.Embedding):
                raise ValueError(f"an Embedding adapter needs an nn.Embedding, not {type(old).__name__}")
            new = Embedding(old.num_embeddings, old.embedding_dim, padding_idx=old.padding_idx,
                            max_norm=old.max_norm, norm_type=old.norm_type,
                            scale_grad_by_freq=old.scale_grad_by_freq, sparse=old.sparse, use_dora=spec.use_dora,
                            **kw)
        elif spec.kind in ("Linear", "MergedLinear"):
            if not isinstance(old, nn.Linear):
                raise ValueError(f"a {spec.kind} adapter needs an nn.Linear, not {type(old).__name__}")
            kw.update(lora_dropout=spec.lora_dropout, bias=old.bias is not None, **variants)
            linear, merged = Linear, MergedLinear
            if _is_4bit(old):  # a 4-bit base keeps its NF4 weight (lora/nf4.py)
                from .nf4 import Linear4bitLoRA as linear, MergedLinear4bitLoRA as merged
            if spec.kind == "Linear":
                new = linear(old.in_features, old.out_features, **kw)
            else:
                new = merged(old.in_features, old.out_features, enable_lora=list(spec.enable_lora),
                             slice_sizes=list(spec.slice_sizes), **kw)
        else:
            raise ValueError(f"cannot build a LoRA layer of kind {spec.kind!r}")
    new.weight = weight
    if _is_4bit(old):
        new.take_4bit(old)
    if getattr(old, "bias", None) is not None:
        new.bias = old.bias
    lora_dtype = dtype if dtype is not None else (weight.dtype if weight.is_floating_point() else torch.float32)
    new._materialize_lora(weight.device, lora_dtype)
    if new.has_lora:
        weight.requires_grad_(False)
    new.train(old.training)
    return new


def apply_specs(model: nn.Module, specs: dict[str, LayerSpec], dtype: torch.dtype | None = None) -> None:
    for name, spec in specs.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, build_layer(getattr(parent, child), spec, dtype))


def inject(model: nn.Module, config: LoraConfig, dtype: torch.dtype | None = None) -> nn.Module:
    """Swap every module whose last name component is in config.target_modules for its LoRA layer, in place;
    freeze all but the adapters (and config.bias's biases); record config as model.lora_config. Returns model.

    The new layers keep the old weight Parameters (no copy) and start with B = 0 (Embedding: A = 0), so the model
    computes exactly what it did. LoRA parameters take the weight's dtype unless dtype is given."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a lora.LoraConfig, got {type(config).__name__}")
    existing = lora_layers(model)
    if existing:
        raise ValueError(f"the model already has LoRA layers ({existing[0][0]}, ...): inject into a fresh model, "
                         "or load an adapter into this one with lora.load_adapter")
    saved = saved_modules(model, config)  # checked before anything changes
    apply_specs(model, plan(model, config), dtype)
    mark_only_lora_as_trainable(model, config.bias)
    train_saved_modules(model, saved)
    model.lora_config = config
    return model


# ----- modules_to_save ---------------------------------------------------------------------------------------------
# peft wraps each such module in a ModulesToSaveWrapper that trains a copy and keeps the original (for
# disable_adapter / unload). Here the module itself is unfrozen and trained in place: no second copy of a
# vocab x hidden matrix, and the state-dict keys stay the model's own (lm_head.weight). The original is not kept in
# memory: it is the base checkpoint's, so loading the base again (without the adapter) gives it back.
def saved_modules(model: nn.Module, config: LoraConfig) -> dict[str, nn.Module]:
    """{name: module} of the modules config.modules_to_save names (by last name component, as target_modules);
    a name that matches nothing, or a module with no parameters, is a ValueError."""
    if not config.modules_to_save:
        return {}
    wanted = set(config.modules_to_save)
    found = {n: m for n, m in model.named_modules() if n and leaf_name(n) in wanted}
    missing = sorted(wanted - {leaf_name(n) for n in found})
    if missing:
        names = sorted({leaf_name(n) for n, _ in model.named_modules() if n})
        raise ValueError(f"modules_to_save {missing} match no module of the model; its modules are named: "
                         f"{names[:30]}")
    empty = sorted(n for n, m in found.items() if not any(True for _ in m.parameters()))
    if empty:
        raise ValueError(f"modules_to_save: {empty} have no parameters to train")
    lora_inside = sorted(n for n, m in found.items() if any(isinstance(x, LoRALayer) for x in m.modules()))
    if lora_inside:
        raise ValueError(f"modules_to_save: {lora_inside} hold LoRA layers; a module is either adapted or trained "
                         "fully, not both")
    return found


def train_saved_modules(model: nn.Module, saved: dict[str, nn.Module]) -> None:
    """Unfreeze every parameter of the saved modules. A parameter shared with a module outside them (tied
    embeddings: lm_head and embed_tokens hold one matrix, as in Phi-4-mini) gets its own copy first, as peft's
    trained copy is its own, and the config stops declaring the tie: training lm_head must not change the input
    embeddings (and save_pretrained must then write both matrices)."""
    if not saved:
        return
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    mine = Counter(id(p) for m in saved.values() for p in m.parameters(recurse=True))
    for name, m in saved.items():
        for pname, p in list(m.named_parameters(recurse=False)):
            if owners[id(p)] > mine[id(p)]:  # shared with a module left frozen (both saved: they stay tied)
                copy = nn.Parameter(p.detach().clone())
                setattr(m, pname, copy)
                owners[id(p)] -= 1
                config = getattr(model, "config", None)
                if getattr(config, "tie_word_embeddings", False):
                    config.tie_word_embeddings = False
                warnings.warn(f"modules_to_save: {name}.{pname} was shared with another module (tied embeddings); "
                              f"{name} gets its own copy and is trained alone (the tie is undone)", stacklevel=3)
        for p in m.parameters():
            p.requires_grad_(True)


def saved_modules_state(model: nn.Module, config: LoraConfig | None) -> dict[str, torch.Tensor]:
    """{state-dict key: tensor} of the modules config.modules_to_save names (model.layers.0.mlp... keys as the
    model's state dict has them): what an adapter file holds besides the LoRA tensors."""
    if config is None or not config.modules_to_save:
        return {}
    return {f"{n}.{k}": v for n, m in saved_modules(model, config).items() for k, v in m.state_dict().items()}


# ----- merging -----------------------------------------------------------------------------------------------------
def _untie_before_merge(model: nn.Module, layers) -> None:
    """A weight shared with another module (tied embeddings: lm_head and embed_tokens hold one matrix) cannot take
    an adapter's ΔW without changing the other module too. Such a layer gets its own copy of the weight first, and
    a config that declares the tie stops declaring it, so save_pretrained writes both matrices and transformers
    loads the merged model with the same outputs."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for name, m in layers:
        weight = m._base_weight()
        if not m.has_lora or uses[id(weight)] <= 1:
            continue
        warnings.warn(f"{name}'s weight is shared with another module (tied embeddings): merging gives {name} its "
                      f"own copy ({weight.numel() * weight.element_size() / 2**20:.0f} MiB) and unties them",
                      stacklevel=3)
        copy = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        if isinstance(m, ConvLoRA):
            m.conv.weight = copy
        else:
            m.weight = copy
        uses[id(weight)] -= 1
        config = getattr(model, "config", None)
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W += s·B·A, computed in fp32, rounded once). Merging a merged layer
    does nothing. The forward pass then costs what the base model's does. An adapter on a tied weight (lm_head or
    embed_tokens of a tied-embedding model such as Phi-4-mini) unties it first: see `_untie_before_merge`."""
    if any(_is_4bit(m) for m in model.modules()):  # they become dense dequant(W4) + s·B·A, with a warning
        from .nf4 import merge_4bit
        merge_4bit(model)
    layers = lora_layers(model)
    _untie_before_merge(model, [(n, m) for n, m in layers if not m.merged])
    for _, m in layers:
        m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged adapter out of its weight again (W -= s·B·A; exact in fp32 up to rounding)."""
    for _, m in lora_layers(model):
        m.unmerge()
    return model


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Print peft's summary line and return (trainable, total) parameter counts (shared tensors counted once)."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    pct = 100.0 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")
    return trainable, total
