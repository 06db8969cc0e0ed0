"""Hugging Face weight I/O: find a checkpoint (folder or Hub id), load it strictly, save it in the HF layout.

Loading builds the model on the meta device and assigns each tensor as it is read, converted to the requested
dtype and device, so no second full copy of the weights ever exists. Tensors are read from the safetensors file
with plain file reads (format: 8-byte little-endian header length, JSON header, raw little-endian data) rather
than a memory map, so the process's resident memory grows by the weights alone.
"""
from __future__ import annotations

import ctypes
import json
import struct
from pathlib import Path

import torch

from phi3lora import atomic
from .download import find_folder
from .config import ConfigError, Phi3Config


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded; the message names the file or tensors."""


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}

INDEX_NAME = "model.safetensors.index.json"


# ----- finding the files ----------------------------------------------------------------------------------------
def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by model.safetensors.index.json, or the one file."""
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{folder}: shard(s) {missing} named in {index.name} are missing")
        return files
    # model.safetensors alone when present, as transformers: an adapter_model.safetensors (or any other file) saved
    # next to it is not part of the model
    single = folder / "model.safetensors"
    files = [single] if single.exists() else sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found {pickles}: pickle files are not loaded; convert them to safetensors)" if pickles else ""
        raise CheckpointError(f"{folder}: no *.safetensors weight files{hint}")
    return files


# ----- reading safetensors ------------------------------------------------------------------------------------
def read_header(path: Path) -> tuple[dict, int]:
    """Header entries {name: {dtype, shape, data_offsets}} and the byte offset where tensor data starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 * 1024**2):
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} does not fit the file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has an unsupported entry {info!r}")
        start, end = info["data_offsets"]
        numel = 1
        for d in info["shape"]:
            numel *= d
        if end - start != numel * _DTYPES[info["dtype"]].itemsize or data_start + end > size:
            raise CheckpointError(f"{path}: tensor {name!r} data is truncated or its size disagrees with its shape "
                                  f"(the file may be corrupt or incompletely downloaded)")
    return header, data_start


STAGING_BYTES = 32 * 1024**2  # converting or moving reads tensors through a buffer this large


def _read_into(f, t: torch.Tensor) -> None:
    """Fill a contiguous CPU tensor with the next bytes of f, straight into its storage."""
    nbytes = t.numel() * t.element_size()
    view = (ctypes.c_char * nbytes).from_address(t.data_ptr())
    if f.readinto(view) != nbytes:
        raise CheckpointError(f"{f.name}: unexpected end of file")


def read_tensor(f, info: dict, data_start: int, dtype=None, device="cpu", staging: list | None = None):
    """One tensor, converted to dtype (floating tensors only) and moved to device.

    As stored on the CPU the bytes land directly in the result. Otherwise they pass, STAGING_BYTES at a time,
    through one reusable staging buffer (staging = [uint8 tensor]) and are converted into the result chunk by
    chunk: converting or moving never leaves freed tensor-sized holes behind (glibc keeps such holes, and the
    process would grow to about twice the weights), and the buffer stays small next to the largest tensor (the
    embedding, 394 MB in fp32 for Phi-3-mini).
    """
    start, end = info["data_offsets"]
    stored, shape = _DTYPES[info["dtype"]], info["shape"]
    if dtype is None or not stored.is_floating_point:
        dtype = stored
    device = torch.device(device)
    f.seek(data_start + start)
    if end == start:
        return torch.empty(shape, dtype=dtype, device=device)
    if dtype == stored and device.type == "cpu":
        out = torch.empty(shape, dtype=stored)
        _read_into(f, out)
        return out
    if staging is None:
        staging = [torch.empty(0, dtype=torch.uint8)]
    out = torch.empty(shape, dtype=dtype, device=device)
    flat, numel = out.view(-1), out.numel()
    per_chunk = max(1, STAGING_BYTES // stored.itemsize)  # elements per chunk
    for i in range(0, numel, per_chunk):
        n = min(per_chunk, numel - i)
        if staging[0].numel() < n * stored.itemsize:
            staging[0] = torch.empty(min(numel, per_chunk) * stored.itemsize, dtype=torch.uint8)
        raw = staging[0][: n * stored.itemsize]
        _read_into(f, raw)
        flat[i:i + n].copy_(raw.view(stored))  # converts dtype and moves device in one copy
    return out


def load_safetensors(path, device="cpu") -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file (small files: adapters, optimizer-free states)."""
    path = Path(path)
    header, data_start = read_header(path)
    with open(path, "rb") as f:
        return {name: read_tensor(f, info, data_start, device=device) for name, info in header.items()}


# ----- loading a model -----------------------------------------------------------------------------------------
def _weight_dtype(dtype):
    """None (as stored), a floating torch.dtype, or its name as transformers takes it ("bfloat16", "auto")."""
    if dtype is None or dtype == "auto":
        return None
    found = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        # a non-floating dtype would otherwise be applied to the weights (read_tensor converts floating tensors)
        raise CheckpointError(f"dtype {dtype!r} is not a floating-point torch dtype (e.g. torch.bfloat16, "
                              "\"float32\", or None to keep the checkpoint's)")
    return found


def _listing(names: list[str], limit: int = 20) -> str:
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def check_tensors(folder: Path, headers: dict, model, tied: bool) -> None:
    """Every tensor the model needs is in the files (headers: {path: (header, data_start)}), with its shape and a
    floating-point dtype where the model's is one; nothing else is there. One CheckpointError lists every problem,
    with a hint when a safetensors index is what leaves tensors out."""
    expected = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    found: dict[str, tuple[Path, dict]] = {}
    for path, (header, _) in headers.items():
        for name, info in header.items():
            found[name] = (path, info)
    if tied:
        found.pop("lm_head.weight", None)  # some tied checkpoints store it anyway
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    common = sorted(set(expected) & set(found))
    mismatched = [f"{k}: checkpoint {tuple(found[k][1]['shape'])} ({found[k][0].name}) vs model "
                  f"{tuple(expected[k].shape)}"
                  for k in common if tuple(found[k][1]["shape"]) != tuple(expected[k].shape)]
    # an integer tensor where the model has a float one (a quantized or corrupt file) cannot be a weight: converting
    # it would be wrong, and load_state_dict would fail later with a message naming nothing
    not_float = [f"{k} ({found[k][0].name}): stored as {_DTYPES[found[k][1]['dtype']]}".replace("torch.", "")
                 for k in common if expected[k].is_floating_point()
                 and not _DTYPES[found[k][1]["dtype"]].is_floating_point]
    if not (missing or unexpected or mismatched or not_float):
        return
    lines = [f"{folder}: checkpoint does not match the Phi-3 model built from its config.json"]
    if missing:
        lines.append(f"  missing tensors ({len(missing)}): {_listing(missing)}")
        lines += [f"  {hint}" for hint in index_hints(folder, headers, missing)]
    if unexpected:
        lines.append(f"  unexpected tensors ({len(unexpected)}): {_listing(unexpected)}")
    if mismatched:
        lines.append("  shape mismatches:\n    " + "\n    ".join(mismatched[:20]))
    if not_float:
        lines.append("  not floating-point (the model's weights are; a quantized checkpoint must be dequantized "
                     "first):\n    " + "\n    ".join(not_float[:20]))
    raise CheckpointError("\n".join(lines))


def index_hints(folder: Path, headers: dict, missing: list[str]) -> list[str]:
    """Why tensors are missing when model.safetensors.index.json chose the files: it leaves out a shard that holds
    them, or it maps them to a shard that does not."""
    index = folder / INDEX_NAME
    if not index.exists():
        return []
    weight_map = json.loads(index.read_text())["weight_map"]  # checkpoint_files read it already
    hints, left = [], set(missing)
    for path in sorted(folder.glob("*.safetensors")):
        if path in headers:
            continue
        try:
            held = sorted(left & set(read_header(path)[0]))
        except CheckpointError:
            continue
        if held:
            hints.append(f"{path.name} holds {len(held)} of them but {INDEX_NAME} does not list it: the index is "
                         "incomplete (add the file's tensors to its weight_map, or regenerate it)")
            left -= set(held)
    mapped = sorted(k for k in left if k in weight_map)
    if mapped:
        hints.append(f"{INDEX_NAME} maps {len(mapped)} of them to shards that do not hold them (e.g. {mapped[0]} -> "
                     f"{weight_map[mapped[0]]}): the index does not match its shards")
    elif left and not hints:
        hints.append(f"{INDEX_NAME}'s weight_map does not name them either: the index and its shards both leave them "
                     "out (an incomplete download or conversion?)")
    return hints


def load_pretrained(cls, path_or_hub_id, dtype=None, device=None, quantize: str = ""):
    """quantize="nf4": the decoder projections become 4-bit (phi3mini/quant.py), each quantized as soon as it is
    read, so the full-precision model never exists. A bitsandbytes 4-bit checkpoint loads 4-bit whatever quantize
    says (and is never quantized again)."""
    from .quant import QUANTIZE_CHOICES, quantized_names, swap_in_4bit  # here: quant imports kernels.nf4, so Triton
    if quantize not in QUANTIZE_CHOICES:
        raise CheckpointError(f"quantize={quantize!r}: choose one of {QUANTIZE_CHOICES}")
    dtype = _weight_dtype(dtype)
    folder = find_folder(path_or_hub_id, CheckpointError)  # a Hub id: downloaded (phi3mini.download)
    try:
        config = Phi3Config.from_hf(folder / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    files = checkpoint_files(folder)
    device = torch.device(device) if device is not None else torch.device("cpu")

    with torch.device("meta"):
        model = cls(config)
    # check names, shapes and dtypes of every file before reading any data; a bitsandbytes 4-bit checkpoint
    # (its projections stored as NF4) loads 4-bit whatever quantize says, never quantized again
    headers = {path: read_header(path) for path in files}
    prequantized = prequantized_modules(headers)
    swap_in_4bit(model, prequantized)
    check_tensors(folder, without_4bit_entries(headers, prequantized), model, config.tie_word_embeddings)
    expected = {k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    raw = {name for header, _ in headers.values() for name in header
           if any(name.startswith(m + ".weight") for m in prequantized)}
    four_bit = set()
    if quantize == "nf4" and not prequantized:  # quantize each projection as it is read
        names = quantized_names(model)
        swap_in_4bit(model, names)
        four_bit = {n + ".weight" for n in names}

    state = {}
    staging: list = [torch.empty(0, dtype=torch.uint8)]
    for path in files:
        header, data_start = headers[path]
        with open(path, "rb") as f:
            for name, info in header.items():
                if name in raw:  # a bitsandbytes entry: codes and fp32 scales exactly as stored
                    state[name] = read_tensor(f, info, data_start, None, device, staging)
                elif name in four_bit:  # quantize now: one dense tensor at a time
                    state.update(_quantized(name, read_tensor(f, info, data_start, dtype, device, staging)))
                elif name in expected:
                    state[name] = read_tensor(f, info, data_start, dtype, device, staging)
    del staging
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary.reset_parameters(device)
    gen_path = folder / "generation_config.json"
    if gen_path.exists():
        try:
            model.generation_config = json.loads(gen_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{gen_path}: not valid JSON ({e})") from None
    model.name_or_path = str(path_or_hub_id)
    return model.eval()


def prequantized_modules(headers: dict) -> list[str]:
    """Modules whose weight the files store as bitsandbytes 4-bit (they have a quant-state entry)."""
    from phi3lora.kernels.nf4 import QUANT_STATE_KEY

    suffix = ".weight." + QUANT_STATE_KEY
    return sorted(name[: -len(suffix)] for header, _ in headers.values() for name in header if name.endswith(suffix))


def without_4bit_entries(headers: dict, modules: list[str]) -> dict:
    """headers without the 4-bit weights' side entries (weight.absmax, ...): Linear4bit checks those itself."""
    side = tuple(m + ".weight." for m in modules)
    return {path: ({k: v for k, v in header.items() if not k.startswith(side)}, start)
            for path, (header, start) in headers.items()} if modules else headers


def _quantized(name: str, dense: torch.Tensor) -> dict:
    """A dense "x.weight" as its bitsandbytes NF4 entries "x.weight", "x.weight.absmax", ..."""
    from phi3lora.kernels.nf4 import quantize_nf4

    prefix = name[: -len("weight")]
    return {prefix + k: v for k, v in quantize_nf4(dense).items()}


# ----- saving ----------------------------------------------------------------------------------------------------
def save_pretrained(model, out_dir, max_shard_bytes: int = 5 * 1024**3) -> None:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A model with LoRA layers (the lora package) saves as a plain Phi-3 only once the adapters are folded in:
    # the lora_A / lora_B tensors are not part of the Hugging Face layout, and dropping them unmerged would
    # silently lose the adapter.
    unmerged = [n for n, m in model.named_modules() if getattr(m, "r", 0) > 0 and not getattr(m, "merged", True)]
    if unmerged:
        raise CheckpointError(f"{len(unmerged)} LoRA layers are not merged (first: {unmerged[0]}): call "
                              "lora.merge(model) before save_pretrained, or save the adapter alone with "
                              "lora.save_adapter")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if "lora_" not in k.rsplit(".", 1)[-1]}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    # split into shards in key order, each at most max_shard_bytes (a single larger tensor gets its own)
    shards: list[dict] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    # each file under a temporary name, then renamed (phi3mini.atomic): a crash never leaves a half-written file
    for name, shard in zip(names, shards):
        atomic.write_file(out / name, lambda tmp, shard=shard: save_file(shard, str(tmp), metadata={"format": "pt"}))
    config = model.config.to_hf()
    dtypes = {v.dtype for k, v in state.items() if v.is_floating_point() and ".weight." not in k}  # not 4-bit scales
    from .quant import is_quantized, quantization_config
    if is_quantized(model):
        config["quantization_config"] = quantization_config(next(iter(dtypes), torch.bfloat16))
    config["torch_dtype"] = str(dtypes.pop() if len(dtypes) == 1 else torch.float32).replace("torch.", "")
    index = out / INDEX_NAME
    if len(shards) > 1:
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        total = sum(v.numel() * v.element_size() for v in state.values())
        atomic.write_file(index, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    elif index.exists():
        index.unlink()
    for stale in out.glob("model*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    atomic.write_file(out / "config.json", json.dumps(config, indent=2))
    if model.generation_config:
        atomic.write_file(out / "generation_config.json", json.dumps(model.generation_config, indent=2))
