"""lowbit's native checkpoint: a transformers directory with packed weights and a manifest.

Layout of ``OUT/``:

- ``config.json``: the model's transformers config, plus ``quantization_config`` = the
  manifest (``quant_method: "lowbit"``, lowbit version, source model, plan, and the format,
  algorithm and options of every quantized module);
- ``model.safetensors`` (or shards ``model-0000i-of-0000n.safetensors`` with
  ``model.safetensors.index.json`` above ``max_shard_bytes``): every tensor of the model's
  state dict. A quantized linear ``X`` is stored as its QTensor parts ``X.weight_packed``,
  ``X.weight_scale`` … (``X.bias`` when it has one); a tensor tied to another is stored once.
  Each file's ``__metadata__["lowbit"]`` (JSON) holds the SHA-256 of every tensor in it and
  the format spec of every quantized module whose parts it holds, beside the parts;
- the tokenizer files and ``generation_config.json`` when there are any.

Tensors left unquantized (embeddings, norms, a kept ``lm_head``) are stored in the manifest's
``kept_dtype`` (16 bits by default: ``lowbit.api.kept_dtype``) and upcast on load to the
dtype the model computes in, the config's ``dtype`` (float32 for the default SmolLM2): the
file is small and the forward pass as fast and as exact as before. The pipeline has already
rounded them to ``kept_dtype``'s values, so the model in memory and the one loaded back give
the same logits.

``config.json`` also names, as ``transformers_weights``, a weights file that is a sentence
telling the reader to ``import lowbit``: a plain ``AutoModelForCausalLM.from_pretrained``
(transformers 5 reads that key to find the weights) then stops with that sentence in its
error instead of skipping the unknown ``quant_method`` and building a model with random
weights. ``import lowbit`` registers a quantizer with transformers
(``lowbit.integrations.transformers``) that clears it and loads the checkpoint.

Loading builds the model from its config with parameters on the meta device (nothing is
allocated twice), checks every stored tensor against it from the file headers (each
quantized module's parts against its format's exact layout), then reads the tensors one at
a time into QuantLinear modules where the manifest says and into the other modules. The
manifest's format of each module must be the spec stored beside its parts (two formats can
share a storage layout: ``int4-sym-g64`` and ``int4-g128`` …), and every tensor must have the
checksum written with it, so an edited checkpoint is refused rather than decoded wrongly.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.atomic import atomic_directory
from lowbit.config import load_config
from lowbit.lazy import FLOAT_DTYPES, INDEX_FILE, StoredTensors, put_tensor, tensor_groups
from lowbit.kernels.activation import activation_quantizer
from lowbit.nn import PART_PREFIX, QuantLinear, is_linear, linear_shape, quantized_linears, set_submodule, unique_state_dict
from lowbit.skeleton import check_parts, empty_model, manifest_format
from lowbit.sources import read_json

MAX_SHARD_BYTES = 5 * 10**9
#: ``config.json``'s ``transformers_weights``: not a file, so that transformers without lowbit's
#: quantizer refuses the checkpoint with this sentence rather than loading random weights
TRANSFORMERS_GUARD = (
    "this is a lowbit checkpoint: run `import lowbit` before from_pretrained (it registers lowbit with "
    "transformers), or load it with lowbit.load"
)
#: the key of each safetensors file's metadata that holds lowbit's checksums and format specs
METADATA_KEY = "lowbit"


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes, as stored (any dtype)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy() if flat.numel() else b"").hexdigest()


def _file_metadata(shard: dict[str, torch.Tensor], specs: dict[str, dict]) -> dict[str, str]:
    """A shard's safetensors metadata: its tensors' digests and the specs of the modules it holds parts of."""
    owners = {key.rpartition(f".{PART_PREFIX}")[0] for key in shard if f".{PART_PREFIX}" in key}
    record = {
        "sha256": {key: tensor_digest(tensor) for key, tensor in shard.items()},
        "formats": {name: specs[name] for name in sorted(owners) if name in specs},
    }
    return {"format": "pt", METADATA_KEY: json.dumps(record, sort_keys=True)}


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


def estimated_bytes(model: nn.Module, plan=None) -> int:
    """The bytes :func:`save_native` writes for ``model``'s tensors, from shapes alone (a model
    on the meta device will do): as it is, or with the linears ``plan`` quantizes at their
    format's exact size."""
    formats = {}
    if plan is not None:
        for name, module in model.named_modules():
            rule = plan.rule_for(name) if is_linear(module) else None
            if rule is not None and rule.format is not None:
                formats[f"{name}.weight"] = rule.format
    total = 0
    for name, tensor in unique_state_dict(model).items():
        fmt = formats.get(name)
        total += fmt.storage_bytes(tuple(tensor.shape)) if fmt else tensor.numel() * tensor.element_size()
    return total


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype ``model`` computes in: that of its input embeddings (a kept tensor)."""
    return model.get_input_embeddings().weight.dtype


def stored_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a native checkpoint of ``model`` holds (:func:`~lowbit.nn.unique_state_dict`),
    every floating tensor that is not a quantized part cast to the manifest's ``kept_dtype``."""
    kept = (getattr(model, "lowbit_manifest", None) or {}).get("kept_dtype")
    kept = getattr(torch, kept) if isinstance(kept, str) else None
    parts = {f"{name}.{PART_PREFIX}{part}" for name, module in quantized_linears(model).items() for part in module.part_names}
    state = {}
    for key, tensor in unique_state_dict(model).items():
        if kept is not None and key not in parts and tensor.is_floating_point():
            tensor = tensor.to(kept)
        state[key] = tensor.detach().contiguous()
    return state


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
    inputs = [getattr(model, "lowbit_source", None)]
    state = stored_state_dict(model)
    with atomic_directory(path, overwrite, inputs=inputs, needed_bytes=sum(t.numel() * t.element_size() for t in state.values())) as temporary:
        config = model.config.to_dict()
        config["quantization_config"] = manifest
        config["dtype"] = str(compute_dtype(model)).removeprefix("torch.")
        config["transformers_weights"] = TRANSFORMERS_GUARD
        (temporary / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        shards = _shards(state, max_shard_bytes)
        specs = {name: manifest_format(entry).spec() for name, entry in manifest["modules"].items()}
        if len(shards) == 1:
            save_file(shards[0], temporary / "model.safetensors", metadata=_file_metadata(shards[0], specs))
        else:
            weight_map = {}
            for number, shard in enumerate(shards, 1):
                name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, temporary / name, metadata=_file_metadata(shard, specs))
                weight_map.update(dict.fromkeys(shard, name))
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for s in shards for t in s.values())}, "weight_map": weight_map}
            (temporary / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(temporary)
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)
    return path


def _plan_modules(path: Path, model: nn.Module, modules: dict, stored: StoredTensors) -> dict[str, tuple]:
    """For each quantized module: ``(format, shape, {part: key}, bias key or None)``, every
    part checked against its format's layout from the file headers, before anything is read."""
    planned = {}
    for name, entry in modules.items():
        try:
            linear = model.get_submodule(name)
            shape = linear_shape(linear)
        except AttributeError:
            raise LowbitError(f"{path}: the manifest names {name!r}, which this model does not have; the checkpoint is corrupt") from None
        fmt = manifest_format(entry)
        prefix = f"{name}.{PART_PREFIX}"
        keys = {key[len(prefix) :]: key for key in stored.entries if key.startswith(prefix)}
        check_parts(path, name, fmt, shape, {part: (stored.entries[k].shape, stored.entries[k].dtype) for part, k in keys.items()})
        bias = f"{name}.bias" if getattr(linear, "bias", None) is not None else None
        planned[name] = (fmt, shape, keys, bias)
    return planned


def _tied_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """:func:`~lowbit.skeleton.tensor_groups`, with the ties the model declares
    (``all_tied_weights_keys``) merged in: inside transformers' ``from_pretrained`` the
    skeleton's tied parameters are not the same objects until the weights are loaded."""
    groups = [list(group) for group in tensor_groups(model)]
    where = {name: group for group in groups for name in group}
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        first, second = where.get(source), where.get(target)
        if first is None or second is None or first is second:
            continue
        first.extend(second)
        second.clear()
        where.update(dict.fromkeys(first, first))
    return [tuple(group) for group in groups if group]


def _check_plain_tensors(path: Path, model: nn.Module, planned: dict, stored: StoredTensors) -> dict[str, tuple[str, ...]]:
    """Every other tensor of the model is stored with its shape, and nothing else is;
    returns each stored name -> the other names sharing it (a tied lm_head)."""
    inside = tuple(f"{name}." for name in planned)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    quantized_keys = {key for _, _, keys, bias in planned.values() for key in (*keys.values(), bias) if key}
    aliases, missing = {}, []
    for group in _tied_groups(model):
        if group[0].startswith(inside):  # a quantized module's weight and bias
            continue
        present = [name for name in group if name in stored.entries]
        if present:
            aliases[present[0]] = tuple(name for name in group if name != present[0])
        elif any(name in parameters for name in group):
            missing.append(group[0])
    missing += [bias for _, _, _, bias in planned.values() if bias and bias not in stored.entries]
    if missing:
        raise LowbitError(f"{path} lacks tensors the model needs: {missing[:5]} (incomplete checkpoint?)")
    unexpected = [key for key in stored.entries if key not in aliases and key not in quantized_keys]
    if unexpected:
        raise LowbitError(f"{path} holds tensors this model does not have: {unexpected[:5]}")
    floating = {name for name, t in model.state_dict(keep_vars=True).items() if t.is_floating_point()}
    for name in aliases:
        if stored.entries[name].shape != shapes[name]:
            raise LowbitError(
                f"{path}: {name} has shape {list(stored.entries[name].shape)}, the model needs {list(shapes[name])}; "
                "the checkpoint is corrupt"
            )
        if (stored.entries[name].dtype_name in FLOAT_DTYPES) != (name in floating):
            raise LowbitError(f"{path}: {name} is stored as {stored.entries[name].dtype_name}, not a type it can have; the checkpoint is corrupt")
    return aliases


def _checksums(path: Path, planned: dict, stored: StoredTensors) -> dict[str, str]:
    """Every tensor's SHA-256 from its file's metadata, after checking that each module's
    format spec stored beside its parts is the manifest's."""
    digests: dict[str, str] = {}
    for file, metadata in stored.metadata.items():
        try:
            record = json.loads(metadata[METADATA_KEY])
            file_digests, formats = record["sha256"], record["formats"]
            if not isinstance(file_digests, dict) or not isinstance(formats, dict):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise LowbitError(
                f"{file} has no lowbit checksums in its metadata: it was written or edited by another tool; "
                "export the model again with lowbit"
            ) from None
        held = {key for key, entry in stored.entries.items() if entry.file == file}
        if set(file_digests) != held:
            raise LowbitError(f"{file}: its tensors are not those its checksums were written for; the checkpoint was edited")
        digests.update(file_digests)
        for name, (fmt, _, keys, _) in planned.items():
            if any(stored.entries[key].file == file for key in keys.values()) and formats.get(name) != fmt.spec():
                raise LowbitError(
                    f"{path}: the manifest says {name} is {fmt.name}, but its parts were written as "
                    f"{formats.get(name)}; the checkpoint was edited: export it again"
                )
    return digests


def check_checkpoint(path: Path, model: nn.Module, modules: dict, stored: StoredTensors) -> tuple[dict, dict, dict[str, str]]:
    """Check a native checkpoint's files (headers and metadata only, nothing read) against
    ``model`` (a skeleton with dense linears) and the manifest's ``modules``. Returns the
    quantized modules' plan (:func:`_plan_modules`), the plain tensors' aliases
    (:func:`_check_plain_tensors`) and every tensor's SHA-256."""
    planned = _plan_modules(path, model, modules, stored)
    aliases = _check_plain_tensors(path, model, planned, stored)
    return planned, aliases, _checksums(path, planned, stored)


def load_native(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """``(model, tokenizer)`` from a native checkpoint; the model is quantized, on the CPU.

    Every stored tensor is checked against the model its config describes (from the file
    headers) before any is read; then the tensors are read one at a time, straight into
    their modules, so the checkpoint is never held twice. Quantized parts keep their stored
    dtypes; the other tensors are upcast to the dtype the model computes in: ``dtype``, else
    the config's.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    config_dict = read_json(path / "config.json")
    config_dict.pop("transformers_weights", None)  # the guard against a plain transformers load
    manifest = config_dict.pop("quantization_config", None) or {}
    if not isinstance(manifest, dict) or manifest.get("quant_method") != "lowbit":
        raise LowbitError(f"{path} is not a lowbit checkpoint (its config has no lowbit quantization_config)")
    modules = manifest.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise LowbitError(f"{path}: the manifest in config.json lists no quantized modules; the checkpoint is corrupt")
    stored = StoredTensors(path)
    model = empty_model(load_config(config_dict), dtype)
    model.tie_weights()
    planned, aliases, digests = check_checkpoint(path, model, modules, stored)
    dtypes = {name: tensor.dtype for name, tensor in model.state_dict(keep_vars=True).items()}

    owner = {key: name for name, (_, _, keys, bias) in planned.items() for key in (*keys.values(), bias) if key}
    waiting: dict[str, dict[str, torch.Tensor]] = {name: {} for name in planned}
    for key, tensor in stored.read(stored.entries):
        if tensor_digest(tensor) != digests[key]:
            raise LowbitError(f"{path}: tensor {key!r} does not match the checksum written with it; the checkpoint was edited or damaged")
        if key not in owner:
            if tensor.is_floating_point() and tensor.dtype != dtypes[key]:
                tensor = tensor.to(dtypes[key])
            value = put_tensor(model, key, tensor)
            for alias in aliases[key]:
                put_tensor(model, alias, value)
            continue
        name = owner[key]
        waiting[name][key] = tensor
        fmt, shape, keys, bias = planned[name]
        if len(waiting[name]) == len(keys) + (bias is not None):
            got = waiting.pop(name)
            parts = {part: got[k] for part, k in keys.items()}
            held = got.get(bias)
            held = None if held is None else held.to(dtypes[bias])
            module = QuantLinear(shape[1], shape[0], fmt, parts, held)
            module.input_quantizer = activation_quantizer(modules[name].get("activations"))  # W8A8: as quantized
            set_submodule(model, name, module)
    model.lowbit_manifest = manifest
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model.eval(), tokenizer
