"""Read integer checkpoints made elsewhere (GPTQ v1/v2, AWQ GEMM, compressed-tensors
pack-quantized) into lowbit QuantLinear modules, for ``lowbit.load`` / ``eval`` / ``inspect``.

Every layout here is lowbit's integer arithmetic with another packing (``int_layouts.py``),
so a foreign module becomes an :class:`~lowbit.formats.integer.IntegerFormat` QuantLinear
holding exactly the checkpoint's codes, float16 scales and integer zeros: lowbit computes
what the checkpoint's own runtime computes.

A config can lie (a wrong ``bits``, ``group_size``, zero convention, or a config copied from
another model). Before a byte of a module is read, its tensors' shapes and dtypes are checked
against what the config implies for that module's shape in the model, and a mismatch says
what the tensors imply instead. While reading, the values are checked too: a GPTQ v1 zero
point of ``2**bits`` (a v2 file declared v1), zeros that contradict ``sym``, an act-order
``g_idx`` (lowbit keeps groups contiguous) and scales that float16 cannot hold exactly are
refused with a clear error, never turned into a garbage model.

The model is built from its config on the meta device and each tensor is read once, straight
into its module (the checkpoint is never held twice). ``model.lowbit_manifest`` records the
format of every module (with ``"source_format"``: where it came from), so the model can be
evaluated, inspected and exported to another target like any lowbit model.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.config import load_config
from lowbit.errors import LowbitError
from lowbit.export.int_layouts import AWQ_ORDER, unpack_int32
from lowbit.formats.integer import IntegerFormat, IntegerParams
from lowbit.lazy import StoredTensors, put_tensor
from lowbit.nn import QuantLinear, linear_shape, set_submodule
from lowbit.skeleton import empty_model, tensor_groups
from lowbit.sources import read_json
from lowbit.version import __version__

METHODS = ("gptq", "awq", "compressed-tensors")


def foreign_method(path: str | os.PathLike) -> str | None:
    """The quantization method of a directory this module reads (``gptq``, ``awq``,
    ``compressed-tensors``), or None."""
    config_file = Path(path).expanduser() / "config.json"
    try:
        quantization = read_json(config_file).get("quantization_config") if config_file.is_file() else None
    except (LowbitError, AttributeError):  # an unreadable config: the usual loaders say what is wrong
        return None
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    return method if method in METHODS else None


@dataclass(frozen=True)
class Layout:
    """What a foreign config says about one module: its parts' names, shapes and dtypes."""

    bits: int
    group_size: int | None  # None: one group per row
    symmetric: bool
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]]


def _words(n: int, bits: int) -> int:
    return (n * bits + 31) // 32


def _groups(columns: int, group_size: int | None) -> int:
    return 1 if group_size is None else -(-columns // group_size)


class Reader:
    """One foreign method: its config read once, then per module a layout and a conversion."""

    suffix: str  # the tensor that marks a quantized module (``qweight`` …)

    def __init__(self, config: dict, path: Path) -> None:
        self.config, self.path = config, path

    def _int(self, key: str, allowed: tuple[int, ...] | None = None) -> int:
        value = self.config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or (allowed and value not in allowed):
            raise LowbitError(f"{self.path}: quantization_config {key} is {value!r}, not one of {allowed or 'the whole numbers'}")
        return value

    def layout(self, name: str, shape: tuple[int, int]) -> Layout:
        raise NotImplementedError

    def convert(
        self, name: str, layout: Layout, shape: tuple[int, int], tensors: dict[str, torch.Tensor]
    ) -> tuple[IntegerFormat, dict]:
        """lowbit's format and parts for one module, from its stored tensors (checked by ``layout``)."""
        raise NotImplementedError

    def implied(self, name: str, shape: tuple[int, int], stored: dict[str, tuple]) -> str:
        """What the stored shapes imply, for the error message."""
        return ""


def _group_size(value: int, columns: int) -> int | None:
    return None if value in (-1, columns) else value


def _to_lowbit(
    name: str, layout: Layout, codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, path: Path
) -> tuple[IntegerFormat, dict]:
    """codes ``(out, in)``, zero ``(out, groups)`` (int), scale ``(out, groups)`` -> lowbit's format and parts."""
    bits = layout.bits
    if bool((zero < 0).any()) or bool((zero > 2**bits - 1).any()):
        raise LowbitError(
            f"{path}: {name} has zero points outside 0..{2**bits - 1} once read as the config says; the config's zero "
            "convention is wrong (a GPTQ v2 checkpoint declared v1, or the reverse)"
        )
    symmetric = bool((zero == 2 ** (bits - 1)).all())
    if layout.symmetric and not symmetric:
        raise LowbitError(
            f"{path}: {name}: the config says symmetric, but its zero points are not all {2 ** (bits - 1)}; "
            "the config's zero convention is wrong (a GPTQ v2 checkpoint declared v1, or the reverse)"
        )
    half = scale.to(torch.float16)
    if not torch.equal(half.float(), scale.float()):
        raise LowbitError(f"{path}: {name}'s scales ({scale.dtype}) do not fit float16 exactly; lowbit's integer formats keep float16 scales")
    fmt = IntegerFormat(bits, symmetric, layout.group_size)
    params = IntegerParams(half.float(), None if symmetric else zero.to(torch.uint8))
    return fmt, fmt.pack(codes, params)


class GPTQReader(Reader):
    suffix = "qweight"

    def __init__(self, config: dict, path: Path) -> None:
        super().__init__(config, path)
        self.bits = self._int("bits", (2, 3, 4, 8))
        self.group = self._int("group_size")
        checkpoint_format = config.get("checkpoint_format", "gptq")
        if checkpoint_format not in ("gptq", "gptq_v2"):
            raise LowbitError(f"{path}: GPTQ checkpoint_format {checkpoint_format!r} is not read (gptq, gptq_v2 are)")
        self.v2 = checkpoint_format == "gptq_v2"
        if config.get("desc_act"):
            raise LowbitError(
                f"{path}: this GPTQ checkpoint uses act-order (desc_act), whose permuted groups lowbit's contiguous "
                "layout cannot hold; load it with GPTQModel"
            )

    def layout(self, name: str, shape: tuple[int, int]) -> Layout:
        out, columns = shape
        group = _group_size(self.group, columns)
        groups = _groups(columns, group)
        return Layout(self.bits, group, bool(self.config.get("sym", False)), {
            "qweight": ((_words(columns, self.bits), out), torch.int32),
            "qzeros": ((groups, _words(out, self.bits)), torch.int32),
            "scales": ((groups, out), torch.float16),
            "g_idx": ((columns,), torch.int32),
        })  # fmt: skip

    def implied(self, name: str, shape: tuple[int, int], stored: dict[str, tuple]) -> str:
        columns = shape[1]
        notes = []
        if "qweight" in stored and stored["qweight"][0] and columns:
            notes.append(f"qweight implies {stored['qweight'][0] * 32 / columns:g} bits")
        if "scales" in stored and stored["scales"][0]:
            notes.append(f"scales imply a group size of {columns / stored['scales'][0]:g}")
        return "; ".join(notes)

    def convert(self, name, layout, shape, tensors):
        out, columns = shape
        group = layout.group_size or columns
        if "g_idx" in tensors and not torch.equal(tensors["g_idx"].long(), torch.arange(columns) // group):
            raise LowbitError(f"{self.path}: {name} has an act-order g_idx (permuted groups); lowbit keeps groups contiguous: load it with GPTQModel")
        codes = unpack_int32(tensors["qweight"].t().contiguous(), layout.bits, columns)
        zero = unpack_int32(tensors["qzeros"], layout.bits, out).t().to(torch.int16)
        if not self.v2:
            zero = zero + 1
        return _to_lowbit(name, layout, codes, zero, tensors["scales"].t(), self.path)


class AWQReader(Reader):
    suffix = "qweight"

    def __init__(self, config: dict, path: Path) -> None:
        super().__init__(config, path)
        self.bits = self._int("bits" if "bits" in config else "w_bit", (4,))
        self.group = self._int("group_size" if "group_size" in config else "q_group_size")
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise LowbitError(f"{path}: AWQ version {version!r} is not read (gemm is)")
        if config.get("zero_point") is False:
            raise LowbitError(f"{path}: AWQ without zero points is not read")

    def layout(self, name: str, shape: tuple[int, int]) -> Layout:
        out, columns = shape
        group = _group_size(self.group, columns)
        groups = _groups(columns, group)
        return Layout(4, group, False, {
            "qweight": ((columns, _words(out, 4)), torch.int32),
            "qzeros": ((groups, _words(out, 4)), torch.int32),
            "scales": ((groups, out), torch.float16),
        })  # fmt: skip

    def implied(self, name: str, shape: tuple[int, int], stored: dict[str, tuple]) -> str:
        columns = shape[1]
        if "scales" in stored and stored["scales"][0]:
            return f"scales imply a group size of {columns / stored['scales'][0]:g}"
        return ""

    def convert(self, name, layout, shape, tensors):
        out = shape[0]
        codes = unpack_int32(tensors["qweight"], 4, out, AWQ_ORDER).t().contiguous()
        zero = unpack_int32(tensors["qzeros"], 4, out, AWQ_ORDER).t().to(torch.int16)
        return _to_lowbit(name, layout, codes, zero, tensors["scales"].t(), self.path)


class CompressedTensorsReader(Reader):
    """compressed-tensors ``pack-quantized`` integer weights (config groups matched by
    class name ``Linear``, exact module name or ``re:`` pattern; ``ignore`` honoured)."""

    suffix = "weight_packed"

    def __init__(self, config: dict, path: Path) -> None:
        super().__init__(config, path)
        status = config.get("quantization_status")
        if status != "compressed":
            raise LowbitError(f"{path}: compressed-tensors quantization_status {status!r} is not read (compressed is)")
        groups = config.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise LowbitError(f"{path}: compressed-tensors config has no config_groups")
        self.groups = list(groups.values())
        self.ignore = config.get("ignore") or []

    @staticmethod
    def _matches(name: str, target: str) -> bool:
        if target.startswith("re:"):
            return re.match(target[3:], name) is not None
        return target in ("Linear", name)

    def _scheme(self, name: str) -> dict:
        if any(self._matches(name, pattern) and pattern != "Linear" for pattern in self.ignore):
            raise LowbitError(f"{self.path}: {name} holds packed weights but the config ignores it")
        for group in self.groups:
            if any(self._matches(name, target) for target in group.get("targets", [])):
                return group
        raise LowbitError(f"{self.path}: {name} holds packed weights but no config group targets it")

    def layout(self, name: str, shape: tuple[int, int]) -> Layout:
        out, columns = shape
        scheme = self._scheme(name)
        layout_name = scheme.get("format") or self.config.get("format")
        if layout_name != "pack-quantized":
            raise LowbitError(f"{self.path}: {name} is {layout_name}; lowbit reads pack-quantized integer weights only")
        weights = scheme.get("weights") or {}
        if weights.get("type") != "int" or weights.get("strategy") not in ("group", "channel"):
            raise LowbitError(f"{self.path}: {name}: weights {weights} are not integer per group or channel")
        if scheme.get("input_activations"):
            raise LowbitError(f"{self.path}: {name} quantizes its activations too, which lowbit does not read from compressed-tensors")
        bits = weights.get("num_bits")
        if bits not in range(2, 9):
            raise LowbitError(f"{self.path}: {name}: num_bits {bits!r} is not 2..8")
        group = weights.get("group_size") if weights.get("strategy") == "group" else None
        if group is not None and (not isinstance(group, int) or group < 1):
            raise LowbitError(f"{self.path}: {name}: group_size {group!r} is not a positive whole number")
        groups = _groups(columns, group)
        symmetric = bool(weights.get("symmetric", True))
        expected = {"weight_packed": ((out, _words(columns, bits)), torch.int32), "weight_scale": ((out, groups), None), "weight_shape": ((2,), None)}
        if not symmetric:
            expected["weight_zero_point"] = ((_words(out, bits), groups), torch.int32)
        return Layout(bits, group, symmetric, expected)

    def implied(self, name: str, shape: tuple[int, int], stored: dict[str, tuple]) -> str:
        columns = shape[1]
        notes = []
        if "weight_packed" in stored and len(stored["weight_packed"]) == 2 and columns:
            notes.append(f"weight_packed implies {stored['weight_packed'][1] * 32 / columns:g} bits")
        if "weight_scale" in stored and len(stored["weight_scale"]) == 2 and stored["weight_scale"][1]:
            notes.append(f"weight_scale implies a group size of {columns / stored['weight_scale'][1]:g}")
        return "; ".join(notes)

    def convert(self, name, layout, shape, tensors):
        out, columns = shape
        if [int(v) for v in tensors["weight_shape"].tolist()] != [out, columns]:
            raise LowbitError(f"{self.path}: {name}.weight_shape is {tensors['weight_shape'].tolist()}, the model's linear is {[out, columns]}")
        codes = unpack_int32(tensors["weight_packed"], layout.bits, columns)
        if layout.symmetric:
            zero = torch.full(tensors["weight_scale"].shape, 2 ** (layout.bits - 1), dtype=torch.int16)
        else:
            zero = unpack_int32(tensors["weight_zero_point"].t().contiguous(), layout.bits, out).t().to(torch.int16)
        return _to_lowbit(name, layout, codes, zero, tensors["weight_scale"], self.path)


READERS = {"gptq": GPTQReader, "awq": AWQReader, "compressed-tensors": CompressedTensorsReader}


def _reader(method: str, config: dict, path: Path) -> Reader:
    """The reader of ``method`` for this config; a config it cannot read is refused saying whose it is."""
    try:
        return READERS[method](config, path)
    except LowbitError as error:
        reason = str(error).removeprefix(f"{path}: ")
        raise LowbitError(f"{path} is quantized by another tool (quant_method {method!r}) in a form lowbit cannot read: {reason}") from None


def _check_module(path: Path, reader: Reader, name: str, shape: tuple[int, int], stored: StoredTensors) -> tuple[Layout, dict[str, str]]:
    layout = reader.layout(name, shape)
    keys, found = {}, {}
    for part, (expected_shape, dtype) in layout.expected.items():
        key = f"{name}.{part}"
        if key not in stored.entries:
            if part == "g_idx":
                continue
            raise LowbitError(f"{path}: {name} lacks {part}; the checkpoint is incomplete")
        entry = stored.entries[key]
        found[part] = entry.shape
        keys[part] = key
        if (dtype is not None and entry.dtype != dtype) or (part == "weight_scale" and entry.dtype_name not in ("F16", "BF16", "F32")):
            raise LowbitError(f"{path}: {key} is {entry.dtype_name}, not {dtype}; the config does not describe this checkpoint")
    for part, (expected_shape, _) in layout.expected.items():
        if part in found and tuple(found[part]) != expected_shape:
            implied = reader.implied(name, shape, found)
            raise LowbitError(
                f"{path}: {name}.{part} has shape {list(found[part])}, but the config ({layout.bits} bits, group size "
                f"{layout.group_size or 'per channel'}) implies {list(expected_shape)} for a {shape[0]}x{shape[1]} linear"
                + (f" ({implied})" if implied else "")
                + "; the config does not describe these tensors"
            )
    return layout, keys


def _open(path: Path) -> tuple[dict, str, Reader, StoredTensors, nn.Module]:
    """``(config, quant_method, reader, stored tensors, empty model)`` of a foreign checkpoint."""
    config_dict = read_json(path / "config.json")
    quantization = config_dict.get("quantization_config")
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if method not in READERS:
        raise LowbitError(f"{path} is not a GPTQ, AWQ or compressed-tensors checkpoint")
    reader = _reader(method, quantization, path)
    plain = {k: v for k, v in config_dict.items() if k not in ("quantization_config", "lowbit_export")}
    return config_dict, method, reader, StoredTensors(path), empty_model(load_config(plain))


def _checked_modules(path: Path, reader: Reader, model: nn.Module, stored: StoredTensors) -> dict[str, tuple[Layout, dict[str, str]]]:
    """Every quantized linear of the checkpoint, its tensors checked against what the config implies."""
    planned = {}
    for key in stored.entries:
        if not key.endswith(f".{reader.suffix}"):
            continue
        name = key[: -len(reader.suffix) - 1]
        try:
            shape = linear_shape(model.get_submodule(name))
        except AttributeError:
            raise LowbitError(f"{path}: {key} belongs to {name}, which is not a linear layer of this model") from None
        planned[name] = _check_module(path, reader, name, shape, stored)
    return planned


def load_foreign(path: str | os.PathLike) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` from a GPTQ, AWQ or compressed-tensors directory, quantized with
    lowbit QuantLinear modules holding the checkpoint's own codes, scales and zeros."""
    from transformers import AutoTokenizer

    path = Path(path)
    _, method, reader, stored, model = _open(path)
    model.tie_weights()
    planned = _checked_modules(path, reader, model, stored)
    if not planned:
        raise LowbitError(f"{path} is quantized by another tool (quant_method {method!r}), but holds no {reader.suffix} tensors")

    owner = {key: name for name, (_, keys) in planned.items() for key in keys.values()}
    biases = {f"{name}.bias": name for name in planned if getattr(model.get_submodule(name), "bias", None) is not None}
    alias_of = {name: group for group in tensor_groups(model) for name in group}
    unknown = [key for key in stored.entries if key not in owner and key not in biases and key not in alias_of]
    if unknown:
        raise LowbitError(f"{path} holds tensors this model does not have: {unknown[:5]}")

    waiting: dict[str, dict[str, torch.Tensor]] = {name: {} for name in planned}
    manifest_modules = {}
    for key, tensor in stored.read(stored.entries):
        name = owner.get(key) or biases.get(key)
        if name is None:
            value = put_tensor(model, key, tensor)
            for alias in alias_of[key]:
                if alias != key:
                    put_tensor(model, alias, value)
            continue
        waiting[name][key.rpartition(".")[2]] = tensor
        layout, keys = planned[name]
        bias_key = f"{name}.bias"
        if len(waiting[name]) == len(keys) + (bias_key in biases):
            got = waiting.pop(name)
            out, columns = linear_shape(model.get_submodule(name))
            fmt, parts = reader.convert(name, layout, (out, columns), got)
            set_submodule(model, name, QuantLinear(columns, out, fmt, parts, got.get("bias")))
            manifest_modules[name] = {"format": fmt.name, "spec": fmt.spec(), "source_format": method}
    missing = list(waiting)
    if missing:
        raise LowbitError(f"{path}: {missing[:3]} lack a bias the model needs; the checkpoint is incomplete")
    unset = [name for name, tensor in model.state_dict(keep_vars=True).items() if tensor.is_meta]
    if unset:
        raise LowbitError(f"{path} lacks tensors the model needs: {unset[:5]} (incomplete checkpoint?)")
    model.lowbit_manifest = {
        "quant_method": "lowbit",
        "lowbit_version": __version__,
        "source": str(path),
        "source_format": method,
        "plan": {"name": f"{method} checkpoint"},
        "modules": manifest_modules,
        "quantization_seconds": 0.0,
    }
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model.eval(), tokenizer


def inspect_foreign(path: str | os.PathLike) -> dict:
    """What ``lowbit inspect`` reports for a foreign checkpoint, from the file headers only:
    every quantized module is checked against its config (shapes, dtypes) and listed with the
    lowbit format its config describes (``gptq:int4-g128`` …), every other tensor as stored."""
    path = Path(path)
    config_dict, method, reader, stored, model = _open(path)
    tensors, owned = [], set()
    for name, (layout, keys) in _checked_modules(path, reader, model, stored).items():
        shape = linear_shape(model.get_submodule(name))
        owned.update(keys.values())
        fmt = IntegerFormat(layout.bits, layout.symmetric, layout.group_size)
        size = sum(stored.entries[key].nbytes for key in keys.values())
        tensors.append({"name": f"{name}.weight", "format": f"{method}:{fmt.name}", "shape": list(shape), "bytes": size, "weights": shape[0] * shape[1]})
    for key, entry in stored.entries.items():
        if key not in owned:
            count = math.prod(entry.shape)
            tensors.append({"name": key, "format": entry.dtype_name.lower(), "shape": list(entry.shape), "bytes": entry.nbytes, "weights": count})
    formats: dict[str, dict] = {}
    for tensor in tensors:
        group = formats.setdefault(tensor["format"], {"tensors": 0, "weights": 0, "bytes": 0})
        group["tensors"] += 1
        group["weights"] += tensor["weights"] or 0
        group["bytes"] += tensor["bytes"]
    for group in formats.values():
        group["bits_per_weight"] = 8 * group["bytes"] / group["weights"] if group["weights"] else None
    total = sum(t["bytes"] for t in tensors)
    parameters = sum(t["weights"] or 0 for t in tensors)
    return {
        "path": str(path), "kind": method, "architecture": (config_dict.get("architectures") or [config_dict.get("model_type")])[0],
        "model_type": config_dict.get("model_type"), "quantized_by": method, "source": None, "plan": None, "tensors": tensors,
        "parameters": parameters, "bytes": total, "bits_per_weight": 8 * total / parameters if parameters else None, "formats": formats,
    }  # fmt: skip
