"""Lazy weights: a transformers model whose parameters stay on disk until they are needed.

``lazy_model(directory)`` builds the model from its ``config.json`` with every parameter on
the meta device (nothing allocated, nothing randomly initialised) and attaches
``model.lowbit_weights``, a :class:`LazyWeights` that knows, for each parameter and
persistent buffer of the model, the safetensors file and key holding it. The caller loads
what it needs when it needs it:

- ``materialize(prefix)``: every tensor whose name starts with ``prefix`` (one decoder
  layer: ``"model.layers.3."``);
- ``materialize_outside(prefix)``: everything else (embeddings, final norm, ``lm_head``);
- ``materialize_all()``; ``pending()`` lists the names still on the meta device.

Tensors are read one at a time into memory of their own (plain reads, no memory map that
would keep the file's pages resident), cast to the dtype the skeleton was built
in (the requested dtype, else the config's, else the checkpoint's first float dtype: what
transformers' ``dtype="auto"`` picks) and assigned into their modules. Nothing else keeps
the float weights: once the pipeline replaces a layer's linears, its float tensors are gone.

Before anything is allocated, the files are checked against the skeleton: every parameter
the model needs is stored (a tied ``lm_head`` shares the embedding and need not be), with
the shape the config implies and a float dtype, and nothing is stored that the model does
not have. A model family whose checkpoint keys transformers renames on load
(``conversion_mapping``) is refused with :class:`NeedsEagerLoading`; ``sources.load_model``
then loads it eagerly and says why.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.skeleton import empty_model, tensor_groups

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

#: safetensors dtype names -> torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
}  # fmt: skip
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
MAX_SAFETENSORS_HEADER = 100 * 2**20


_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1,
}  # fmt: skip


def check_safetensors(path: Path) -> list[str]:
    """Refuse a truncated or corrupt safetensors file before any loader reads it; return the
    names of its tensors.

    Every entry must have a known dtype, non-negative dimensions and exactly the bytes they
    take, and the entries must tile the data section: no gap, no overlap, nothing after.
    """
    size = path.stat().st_size
    bad = f"{path} is not a valid safetensors file"
    if size < 8:
        raise LowbitError(f"{bad}: only {size} bytes (truncated?)")
    with open(path, "rb") as f:
        (header_length,) = struct.unpack("<Q", f.read(8))
        if header_length > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise LowbitError(f"{bad}: its header claims {header_length} bytes, the file has {size} (truncated?)")
        try:
            header = json.loads(f.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise LowbitError(f"{bad}: its header is not JSON (corrupt)") from None
    if not isinstance(header, dict):
        raise LowbitError(f"{bad}: its header is not a JSON object (corrupt)")
    data_size = size - 8 - header_length
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            dtype, shape = info["dtype"], info["shape"]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end, *shape)):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise LowbitError(f"{bad}: tensor {name!r} has a malformed entry") from None
        if dtype not in _SAFETENSORS_DTYPE_BYTES:
            raise LowbitError(f"{bad}: tensor {name!r} has dtype {dtype!r}, which safetensors does not define (corrupt)")
        if any(dim < 0 for dim in shape):
            raise LowbitError(f"{bad}: tensor {name!r} has a negative dimension {shape} (corrupt)")
        expected = _SAFETENSORS_DTYPE_BYTES[dtype]
        for dim in shape:
            expected *= dim
        if not 0 <= start <= end <= data_size or end - start != expected:
            raise LowbitError(
                f"{bad}: tensor {name!r} lies at bytes {start}..{end} but the data section has {data_size} "
                f"bytes (truncated or corrupt: its {dtype} {shape} takes {expected}); re-download or re-export it"
            )
        spans.append((start, end, name))
    spans.sort()
    covered = 0
    for start, end, name in spans:
        if start != covered:
            what = "overlaps the tensor before it" if start < covered else f"leaves a gap of {start - covered} bytes before it"
            raise LowbitError(f"{bad}: tensor {name!r} {what} (corrupt)")
        covered = end
    if covered != data_size:
        raise LowbitError(f"{bad}: {data_size - covered} bytes after its last tensor belong to none (corrupt)")
    return [name for _, _, name in spans]


class NeedsEagerLoading(Exception):
    """This checkpoint cannot be loaded lazily; the message says why (for a warning)."""


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies (``offset``: from the file's start) and what it is, from its file's header."""

    file: Path
    dtype_name: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def dtype(self) -> torch.dtype | None:
        return SAFETENSORS_DTYPES.get(self.dtype_name)


def read_header(file: Path) -> tuple[dict, int]:
    """A safetensors file's tensor entries (its ``__metadata__`` left out), read by hand, and
    where its data section starts. The file must have passed ``sources.check_safetensors``."""
    header, data_start, _ = read_header_and_metadata(file)
    return header, data_start


def read_header_and_metadata(file: Path) -> tuple[dict, int, dict]:
    """Like :func:`read_header`, with the file's ``__metadata__`` (an empty dict when none)."""
    check_safetensors(file)
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    metadata = header.pop("__metadata__", None)
    return header, 8 + length, metadata if isinstance(metadata, dict) else {}


def _index(directory: Path) -> dict[str, str] | None:
    """The ``weight_map`` of a directory's safetensors index (tensor -> file), or None when there is none."""
    index = directory / INDEX_FILE
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise LowbitError(f"{index} is not a readable JSON object; the checkpoint is corrupt") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise LowbitError(f"{index} has no weight_map of tensor names to files; the checkpoint is corrupt")
    for file in set(weight_map.values()):
        if Path(file).name != file or not file.endswith(".safetensors"):
            raise LowbitError(f"{index} names {file!r}, not a .safetensors file of the directory; the checkpoint is corrupt")
    return weight_map


class StoredTensors:
    """The tensors of a directory's safetensors files, by name, read from headers only.

    With ``model.safetensors.index.json`` the files it names are read, and each must hold
    exactly the tensors the index assigns to it (other files in the directory are not
    read: what transformers loads is what the index says). Without one, the directory must
    hold ``model.safetensors`` and no other safetensors file: a stray file would otherwise
    decide which tensors are loaded. :meth:`read` loads the tensors asked for, one at a time.
    ``metadata`` holds each file's ``__metadata__``.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        weight_map = _index(self.directory)
        present = sorted(self.directory.glob("*.safetensors"))
        if weight_map is not None:
            files = sorted({self.directory / name for name in weight_map.values()})
        else:
            stray = [file.name for file in present if file.name != SINGLE_FILE]
            if stray:
                raise LowbitError(
                    f"{self.directory} holds {', '.join(stray)} beside {SINGLE_FILE} and no {INDEX_FILE} to say which "
                    "tensors to read; remove the stray files (or add the index of a sharded checkpoint)"
                    if len(present) > len(stray)
                    else f"{self.directory} holds {', '.join(stray)} but no {SINGLE_FILE} or {INDEX_FILE}; rename the "
                    f"file to {SINGLE_FILE} (transformers reads only that name)"
                )
            files = present
        self.entries: dict[str, StoredTensor] = {}
        self.metadata: dict[Path, dict] = {}
        for file in files:
            if not file.is_file():
                raise LowbitError(f"{self.directory / INDEX_FILE} names {file.name}, which is not there (incomplete download?)")
            header, data_start, self.metadata[file] = read_header_and_metadata(file)
            for key, info in header.items():
                if key in self.entries:
                    raise LowbitError(f"{self.directory}: tensor {key!r} is stored twice ({self.entries[key].file.name}, {file.name})")
                if weight_map is not None and weight_map.get(key) != file.name:
                    raise LowbitError(
                        f"{file} holds tensor {key!r}, which {INDEX_FILE} "
                        + (f"places in {weight_map[key]}" if key in weight_map else "does not list")
                        + "; the checkpoint is corrupt or mixed with another"
                    )
                start, end = info["data_offsets"]
                self.entries[key] = StoredTensor(file, info["dtype"], tuple(info["shape"]), data_start + start, end - start)
        if weight_map is not None:
            absent = [key for key in weight_map if key not in self.entries]
            if absent:
                raise LowbitError(
                    f"{self.directory / INDEX_FILE} lists tensors its files do not hold: {', '.join(absent[:5])}; "
                    "the checkpoint is incomplete"
                )

    def read(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, tensor)`` for each key, file by file, each read into memory of its own.

        Plain reads, not a memory map: a tensor mapped from the file would keep the whole
        file's mapping alive, and every page ever touched would stay in the process's
        resident memory after the tensor itself was dropped.
        """
        by_file: dict[Path, list[str]] = defaultdict(list)
        for key in keys:
            by_file[self.entries[key].file].append(key)
        for file, file_keys in by_file.items():
            with open(file, "rb") as f:
                for key in file_keys:
                    entry = self.entries[key]
                    data = torch.empty(entry.nbytes, dtype=torch.uint8)
                    f.seek(entry.offset)
                    if f.readinto(data.numpy()) != entry.nbytes:
                        raise LowbitError(f"{file} ends inside tensor {key!r} (truncated); re-download or re-export it")
                    yield key, data.view(entry.dtype).reshape(entry.shape)


def _tensor_at(model: nn.Module, name: str) -> torch.Tensor | None:
    """The parameter or buffer called ``name``, or None when the model no longer has it
    (the pipeline replaced its module)."""
    module_name, _, attribute = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    found = module._parameters.get(attribute)
    return found if found is not None else module._buffers.get(attribute)


def put_tensor(model: nn.Module, name: str, value: torch.Tensor) -> torch.Tensor:
    """Put ``value`` where the tensor ``name`` is: as a Parameter if that was one (the same
    Parameter object when ``value`` already is one, which keeps tied weights tied)."""
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters.get(attribute)
    if old is None:
        module._buffers[attribute] = value
        return value
    if not isinstance(value, nn.Parameter):
        value = nn.Parameter(value, requires_grad=old.requires_grad)
    module._parameters[attribute] = value
    return value


class LazyWeights:
    """Which file holds each of a meta-device model's tensors, and loading them on demand.

    ``aliases`` maps the name of every stored tensor (stored under that same name) to the
    other names sharing it (a tied ``lm_head.weight``); those get the very same Parameter.
    """

    def __init__(self, model: nn.Module, stored: StoredTensors, aliases: dict[str, tuple[str, ...]]) -> None:
        self.model = model
        self.stored = stored
        self.aliases = aliases

    def _is_pending(self, name: str) -> bool:
        tensor = _tensor_at(self.model, name)
        return tensor is not None and tensor.is_meta

    def pending(self) -> list[str]:
        """The names of the model's tensors still on the meta device."""
        return [name for name in self.aliases if self._is_pending(name)]

    def _load(self, selected: list[str]) -> None:
        for name, tensor in self.stored.read([name for name in selected if self._is_pending(name)]):
            target = _tensor_at(self.model, name)
            value = put_tensor(self.model, name, tensor.to(target.dtype))
            for alias in self.aliases[name]:
                if _tensor_at(self.model, alias) is target:  # still tied (quantizing lm_head unties it)
                    put_tensor(self.model, alias, value)

    def materialize(self, prefix: str) -> None:
        """Load every tensor whose name (or a tied name) starts with ``prefix``."""
        self._load([n for n, others in self.aliases.items() if any(a.startswith(prefix) for a in (n, *others))])

    def materialize_outside(self, prefix: str) -> None:
        """Load every tensor with a name outside ``prefix`` (embeddings, final norm, lm_head)."""
        self._load([n for n, others in self.aliases.items() if not all(a.startswith(prefix) for a in (n, *others))])

    def materialize_all(self) -> None:
        self._load(list(self.aliases))


def _checkpoint_dtype(stored: StoredTensors) -> torch.dtype:
    """The first float dtype stored: what transformers' ``dtype="auto"`` falls back to."""
    for entry in stored.entries.values():
        if entry.dtype_name in FLOAT_DTYPES:
            return entry.dtype
    return torch.float32


def _model_dtype(config, requested, stored: StoredTensors) -> torch.dtype:
    if requested is not None and requested != "auto":
        return requested if isinstance(requested, torch.dtype) else getattr(torch, str(requested).replace("torch.", ""))
    configured = getattr(config, "dtype", None)
    if isinstance(configured, str):
        configured = getattr(torch, configured.replace("torch.", ""), None)
    return configured if isinstance(configured, torch.dtype) else _checkpoint_dtype(stored)


def _match(model: nn.Module, stored: StoredTensors, directory: Path) -> dict[str, tuple[str, ...]]:
    """Each stored tensor's name -> the other names sharing it; refuse missing, extra,
    mis-shaped and non-float tensors."""
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    shapes = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    parameter_names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    aliases: dict[str, tuple[str, ...]] = {}
    missing, known = [], set()
    for group in tensor_groups(model):
        known.update(group)
        present = [name for name in group if name in stored.entries]
        if not present:
            if any(name in parameter_names for name in group):
                missing.append(group[0])
            continue  # a buffer the checkpoint does not store keeps its computed value
        aliases[present[0]] = tuple(name for name in group if name != present[0])
    extra = [k for k in stored.entries if k not in known and not any(p.search(k) for p in ignored)]
    wrong_shape = [
        f"{name} {list(stored.entries[name].shape)} (needs {list(shapes[name])})"
        for name in aliases
        if stored.entries[name].shape != shapes[name]
    ]
    not_float = [f"{name} ({stored.entries[name].dtype_name})" for name in aliases if stored.entries[name].dtype_name not in FLOAT_DTYPES]
    problems = [
        f"{label}: {', '.join(items[:5])}{' …' if len(items) > 5 else ''}"
        for label, items in (("missing", missing), ("not in the model", extra), ("wrong shape", wrong_shape), ("not a float type", not_float))
        if items
    ]
    if problems:
        raise LowbitError(
            f"{directory} does not hold the weights its config.json describes ({'; '.join(problems)}); "
            "the checkpoint is incomplete, corrupt or for another model"
        )
    return aliases


def lazy_model(directory: str | os.PathLike, dtype: torch.dtype | str | None = None) -> nn.Module:
    """The model of a transformers safetensors directory, every weight still on disk.

    The result has ``lowbit_weights`` (a :class:`LazyWeights`); it is in eval mode, with the
    directory's generation config. Raises :class:`NeedsEagerLoading` for a family whose
    checkpoint keys transformers would rename, and a LowbitError when the files do not
    hold exactly the tensors the config implies.
    """
    from transformers import GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from lowbit.config import load_config, read_raw_config

    directory = Path(directory)
    stored = StoredTensors(directory)
    if not stored.entries:
        raise NeedsEagerLoading(f"{directory} has no safetensors weights")
    raw = read_raw_config(directory)
    quantization = raw.get("quantization_config")
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        raise LowbitError(
            f"{directory} is quantized (quant_method {method!r}); lowbit quantizes unquantized models: give the original"
        )
    model_type = raw.get("model_type")
    if isinstance(model_type, str) and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise LowbitError(f"unsupported architecture in {directory}: transformers has no causal language model for {model_type!r}")
    config = load_config(raw)
    model = empty_model(config, _model_dtype(config, dtype, stored))
    model.tie_weights()  # a tied lm_head is not stored: it must be the embedding's Parameter
    try:
        from transformers.conversion_mapping import extract_weight_conversions_for_model

        conversions = extract_weight_conversions_for_model(model)
    except ImportError:  # transformers < 5 has no renaming table
        conversions = None
    if conversions:
        raise NeedsEagerLoading(f"transformers renames {config.model_type} checkpoint keys on load")
    aliases = _match(model, stored, directory)
    if (directory / "generation_config.json").is_file() and model.can_generate():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    model.lowbit_weights = LazyWeights(model, stored, aliases)
    return model.eval()
