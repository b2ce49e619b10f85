"""Write a lowbit-quantized model as a transformers directory in another tool's layout.

GPTQ, AWQ and compressed-tensors checkpoints share everything but their quantized linears:
``config.json`` (the model's config with the target's ``quantization_config``), safetensors
with every kept tensor as it is, the tokenizer. :func:`write_repacked` does that shared part
once; each target gives a ``convert(name, module) -> {tensor name: tensor}`` for its linears.

Memory: the model is read one module at a time and each converted tensor is written to disk
as soon as it is made (:class:`ShardWriter`), in shards of at most ``max_shard_bytes``
(``model-0000i-of-0000n.safetensors`` and an index when there is more than one), so beside
the model there is only ever one module's converted tensors, never a second copy of it. The directory is built under a temporary name and renamed
into place at the end (``atomic.py``), so an interrupted export leaves no output.

``config.json`` also records, under ``lowbit_export``, that lowbit wrote it (version, target,
plan): loaders ignore the key; it says where a checkpoint came from.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lowbit.export.atomic import atomic_directory
from lowbit.lazy import INDEX_FILE
from lowbit.nn import PART_PREFIX, QuantLinear, quantized_linears, unique_state_dict
from lowbit.version import __version__

#: the largest safetensors shard of a repacked export (what hubs and loaders expect: a few GB)
MAX_SHARD_BYTES = 2 * 10**9
#: the key of config.json saying that lowbit wrote a repacked export
EXPORT_KEY = "lowbit_export"

Converter = Callable[[str, QuantLinear], dict[str, torch.Tensor]]


#: safetensors' names of the dtypes a repacked export writes
SAFETENSORS_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


def save_file(path: Path, header: dict[str, dict], data_path: Path) -> None:
    """Write one safetensors file at ``path``: the header of its tensors (offsets into the raw
    bytes at ``data_path``), then those bytes, copied in chunks (the streaming counterpart of
    safetensors' ``save_file``)."""
    encoded = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as out, open(data_path, "rb") as data:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        shutil.copyfileobj(data, out, 2**24)


class ShardWriter:
    """Writes tensors to numbered safetensors shards of at most ``max_bytes``, one tensor at a time.

    safetensors' own ``save_file`` needs every tensor of a file in memory at once (and
    serializes a copy of them), which for a shard of converted weights is a second copy of
    that much of the model. The format is simple enough to stream instead: each tensor's bytes
    are appended to a data file as it comes, and when the shard is complete the file is written
    as the 8-byte little-endian header length, the JSON header (names, dtypes, shapes, offsets;
    padded with spaces to a multiple of 8) and the data copied over in chunks. The tests read
    every shard back with safetensors itself.
    """

    def __init__(self, directory: Path, max_bytes: int = MAX_SHARD_BYTES) -> None:
        self.directory, self.max_bytes = directory, max_bytes
        self.files: list[list[str]] = []  # tensor names of each shard written
        self.total_bytes = 0
        self._open()

    def _open(self) -> None:
        self.data_path = self.directory / f"shard-{len(self.files)}.data"
        self.data = open(self.data_path, "wb")  # noqa: SIM115 (open across add() calls, closed by _close)
        self.header: dict[str, dict] = {}
        self.offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        if tensor.dtype not in SAFETENSORS_NAMES:
            raise TypeError(f"{name}: safetensors has no dtype for {tensor.dtype}")
        nbytes = tensor.numel() * tensor.element_size()
        if self.header and self.offset + nbytes > self.max_bytes:
            self._close()
            self._open()
        if nbytes:
            self.data.write(memoryview(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        self.header[name] = {"dtype": SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [self.offset, self.offset + nbytes]}
        self.offset += nbytes
        self.total_bytes += nbytes

    def _close(self) -> None:
        """Write the shard being collected as ``shard-N.tmp`` (header, then its data)."""
        self.data.close()
        save_file(self.directory / f"shard-{len(self.files)}.tmp", self.header, self.data_path)
        self.data_path.unlink()
        self.files.append(list(self.header))

    def finish(self) -> None:
        """Write what is pending and give the shards their final names (one file: ``model.safetensors``)."""
        self._close()
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
    max_shard_bytes: int | None = None,
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
        shards = ShardWriter(temporary, max_shard_bytes or MAX_SHARD_BYTES)
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
