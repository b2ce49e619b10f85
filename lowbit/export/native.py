"""lowbit's native checkpoint: a transformers directory with packed weights and a manifest.

Layout of ``OUT/``:

- ``config.json``: the model's transformers config, plus ``quantization_config`` = the
  manifest (``quant_method: "lowbit"``, lowbit version, source model, plan, and the format,
  algorithm and options of every quantized module);
- ``model.safetensors`` (or shards ``model-0000i-of-0000n.safetensors`` with
  ``model.safetensors.index.json`` above ``max_shard_bytes``): every tensor of the model's
  state dict. A quantized linear ``X`` is stored as its QTensor parts ``X.weight_packed``,
  ``X.weight_scale`` … (``X.bias`` when it has one); a tensor tied to another is stored once;
- the tokenizer files and ``generation_config.json`` when there are any.

Loading builds the model from its config with parameters on the meta device (nothing is
allocated twice), puts QuantLinear modules where the manifest says, and assigns the stored
tensors; sizes are checked against each format's exact ``storage_bytes``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.atomic import atomic_directory
from lowbit.formats import get_format
from lowbit.nn import PART_PREFIX, QuantLinear, linear_shape, set_submodule, unique_state_dict
from lowbit.sources import check_safetensors, read_json

MAX_SHARD_BYTES = 5 * 10**9
INDEX_FILE = "model.safetensors.index.json"


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_native(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer=None,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write ``model`` (quantized by lowbit) as a native checkpoint at ``path``."""
    manifest = getattr(model, "lowbit_manifest", None)
    if manifest is None:
        raise LowbitError("this model was not quantized by lowbit; quantize it first (lowbit.quantize)")
    path = Path(path)
    with atomic_directory(path, overwrite) as temporary:
        config = model.config.to_dict()
        config["quantization_config"] = manifest
        (temporary / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        shards = _shards({k: t.detach().contiguous() for k, t in unique_state_dict(model).items()}, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], temporary / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for number, shard in enumerate(shards, 1):
                name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, temporary / name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for s in shards for t in s.values())}, "weight_map": weight_map}
            (temporary / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(temporary)
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)
    return path


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        check_safetensors(file)
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def check_parts(path: Path, name: str, fmt, shape: tuple[int, int], parts: dict[str, torch.Tensor]) -> None:
    """A quantized module must hold exactly the parts its format stores, shapes and dtypes."""
    expected = fmt.part_layout(shape)
    found = {part: (tuple(t.shape), t.dtype) for part, t in parts.items()}
    if found != expected:
        raise LowbitError(
            f"{path}: {name} should hold {fmt.name} parts {expected} for shape {shape}, "
            f"found {found}; the checkpoint is corrupt"
        )


def check_stored_bytes(path: Path, name: str, fmt, shape: tuple[int, int], stored: int) -> None:
    """A quantized module must hold exactly the bytes its format takes for its shape."""
    if stored != fmt.storage_bytes(shape):
        raise LowbitError(
            f"{path}: {name} holds {stored} bytes, but {fmt.name} of shape {shape} takes "
            f"{fmt.storage_bytes(shape)}; the checkpoint is corrupt"
        )


def empty_model(config) -> nn.Module:
    """The model's modules with parameters on the meta device and real buffers (rotary tables …)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config, dtype=config.dtype)


def load_native(path: str | os.PathLike):
    """``(model, tokenizer)`` from a native checkpoint; the model is quantized, on the CPU."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    config_dict = read_json(path / "config.json")
    manifest = config_dict.pop("quantization_config", None) or {}
    if manifest.get("quant_method") != "lowbit":
        raise LowbitError(f"{path} is not a lowbit checkpoint (its config has no lowbit quantization_config)")
    modules = manifest.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise LowbitError(f"{path}: the manifest in config.json lists no quantized modules; the checkpoint is corrupt")
    config = AutoConfig.for_model(**config_dict)
    model = empty_model(config)
    tensors = _read_tensors(path)
    for name, entry in modules.items():
        prefix = f"{name}.{PART_PREFIX}"
        parts = {key[len(prefix) :]: tensors.pop(key) for key in list(tensors) if key.startswith(prefix)}
        try:
            shape = linear_shape(model.get_submodule(name))
        except AttributeError:
            raise LowbitError(f"{path}: the manifest names {name!r}, which this model does not have; the checkpoint is corrupt") from None
        fmt = get_format(entry["format"])
        check_parts(path, name, fmt, shape, parts)
        bias = tensors.pop(f"{name}.bias", None)
        set_submodule(model, name, QuantLinear(shape[1], shape[0], fmt.name, parts, bias))
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise LowbitError(f"{path} holds tensors this model does not have: {result.unexpected_keys[:5]}")
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise LowbitError(f"{path} lacks tensors the model needs: {missing[:5]} (incomplete checkpoint?)")
    model.lowbit_manifest = manifest
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model.eval(), tokenizer
