"""Write a lowbit-quantized model as a transformers directory in another tool's layout.

GPTQ, AWQ and compressed-tensors checkpoints share everything but their quantized linears:
``config.json`` (the model's config with the target's ``quantization_config``), safetensors
with every kept tensor as it is, the tokenizer. :func:`write_repacked` does that shared part
once; each target gives a ``convert(name, module) -> {tensor name: tensor}`` for its linears.

Memory: the model is read one module at a time and the converted tensors are written in
shards of at most ``max_shard_bytes`` (``model-0000i-of-0000n.safetensors`` and an index
when there is more than one), so at most one shard of converted tensors exists beside the
model, never a second copy of it. The directory is built under a temporary name and renamed
into place at the end (``atomic.py``), so an interrupted export leaves no output.

``config.json`` also records, under ``lowbit_export``, that lowbit wrote it (version, target,
plan): loaders ignore the key; it says where a checkpoint came from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.export.atomic import atomic_directory
from lowbit.lazy import INDEX_FILE
from lowbit.nn import PART_PREFIX, QuantLinear, quantized_linears, unique_state_dict
from lowbit.version import __version__

#: safetensors shards of a repacked export; small, so the converted tensors held at once stay few
MAX_SHARD_BYTES = 2 * 10**9
#: the key of config.json saying that lowbit wrote a repacked export
EXPORT_KEY = "lowbit_export"

Converter = Callable[[str, QuantLinear], dict[str, torch.Tensor]]


class ShardWriter:
    """Collects tensors and writes them to numbered safetensors shards of at most ``max_bytes``."""

    def __init__(self, directory: Path, max_bytes: int = MAX_SHARD_BYTES) -> None:
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []  # tensor names of each shard written
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.detach().contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        save_file(self.pending, self.directory / f"shard-{len(self.files)}.tmp", metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        """Write what is pending and give the shards their final names (one file: ``model.safetensors``)."""
        if self.pending or not self.files:
            self._flush()
        count = len(self.files)
        if count == 1:
            (self.directory / "shard-0.tmp").rename(self.directory / "model.safetensors")
            return
        weight_map = {}
        for number, names in enumerate(self.files):
            final = f"model-{number + 1:05d}-of-{count:05d}.safetensors"
            (self.directory / f"shard-{number}.tmp").rename(self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a runtime builds this model's float parameters in: its embeddings'."""
    return model.get_input_embeddings().weight.dtype


def dense_linears(model: nn.Module) -> list[str]:
    """Names of the linear layers lowbit left unquantized (lm_head among them, usually)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def write_repacked(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer,
    overwrite: bool,
    *,
    target: str,
    quantization_config: dict,
    convert: Converter,
    extra_files: dict[str, dict] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write ``model`` at ``path``: its config with ``quantization_config``, each quantized linear
    as ``convert`` makes it, every other tensor as it is, ``extra_files`` (name -> JSON), the tokenizer."""
    path = Path(path)
    quantized = quantized_linears(model)
    owners = {f"{name}.{PART_PREFIX}{part}": name for name, module in quantized.items() for part in module.part_names}
    inputs = [getattr(model, "lowbit_source", None)]
    manifest = model.lowbit_manifest
    with atomic_directory(path, overwrite, inputs=inputs) as temporary:
        config = model.config.to_dict()
        config["quantization_config"] = quantization_config
        config[EXPORT_KEY] = {"version": __version__, "target": target, "plan": manifest.get("plan", {}).get("name")}
        (temporary / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        for name, content in (extra_files or {}).items():
            (temporary / name).write_text(json.dumps(content, indent=2) + "\n")
        shards = ShardWriter(temporary, max_shard_bytes)
        done: set[str] = set()
        for key, tensor in unique_state_dict(model).items():
            owner = owners.get(key)
            if owner is None:
                shards.add(key, tensor)
            elif owner not in done:
                done.add(owner)
                for name, converted in convert(owner, quantized[owner]).items():
                    shards.add(f"{owner}.{name}", converted)
        shards.finish()
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(temporary)
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)
    return path
