"""What a checkpoint or GGUF file holds, read from headers only (no weights are loaded).

For each tensor: its name, format (a lowbit format for native checkpoints, the dtype for a
plain transformers checkpoint, the ggml type for GGUF), logical shape, stored bytes and bits
per weight; plus totals and the architecture.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from lowbit.config import load_config
from lowbit.errors import LowbitError
from lowbit.lazy import StoredTensors
from lowbit.nn import PART_PREFIX, linear_shape
from lowbit.skeleton import check_stored_bytes, empty_model, manifest_format
from lowbit.sources import read_gguf_layout, read_json, resolve_model


def _skeleton(config: dict):
    """The model's modules on the meta device, to read each linear's logical shape."""
    return empty_model(load_config(config))


def _linear_shape(path: Path, skeleton, name: str) -> tuple[int, int]:
    try:
        return linear_shape(skeleton.get_submodule(name))
    except AttributeError:
        raise LowbitError(f"{path}: the manifest names {name!r}, which the model its config describes does not have; the checkpoint is corrupt") from None


def _inspect_directory(path: Path, native: bool) -> dict:
    config = read_json(path / "config.json")
    headers = dict(StoredTensors(path).entries)
    manifest = config.get("quantization_config", {}) if native else {}
    modules = manifest.get("modules") if isinstance(manifest, dict) else None
    if native and not isinstance(modules, dict):
        raise LowbitError(f"{path}: the manifest in config.json lists no quantized modules; the checkpoint is corrupt")
    skeleton = _skeleton(config) if modules else None
    tensors = []
    for name, entry in (modules or {}).items():
        prefix = f"{name}.{PART_PREFIX}"
        stored = sum(headers.pop(key).nbytes for key in [k for k in headers if k.startswith(prefix)])
        fmt = manifest_format(entry)
        shape = _linear_shape(path, skeleton, name)
        check_stored_bytes(path, name, fmt, shape, stored)
        tensors.append({"name": f"{name}.weight", "format": fmt.name, "shape": list(shape), "bytes": stored, "weights": shape[0] * shape[1]})
    for name, info in headers.items():
        count = 1
        for dim in info.shape:
            count *= dim
        tensors.append({"name": name, "format": info.dtype_name.lower(), "shape": list(info.shape), "bytes": info.nbytes, "weights": count})
    return {
        "architecture": (config.get("architectures") or [config.get("model_type")])[0],
        "model_type": config.get("model_type"),
        "quantized_by": "lowbit" if native else None,
        "source": manifest.get("source"),
        "plan": (manifest.get("plan") or {}).get("name"),
        "tensors": tensors,
    }


def _inspect_gguf(path: Path) -> dict:
    from gguf import GGMLQuantizationType

    layout = read_gguf_layout(path)
    tensors = []
    for tensor in layout.tensors:
        count = 1
        for dim in tensor.shape:
            count *= dim
        tensors.append(
            {"name": tensor.name, "format": f"gguf:{GGMLQuantizationType(tensor.ggml_type).name}", "shape": list(tensor.shape),
             "bytes": tensor.nbytes, "weights": count}
        )  # fmt: skip
    architecture = layout.architecture
    return {"architecture": architecture, "model_type": architecture, "quantized_by": "gguf", "source": None, "plan": None, "tensors": tensors}


def inspect_checkpoint(path: str | os.PathLike) -> dict:
    """Summary and per-tensor listing of a native checkpoint, HF directory or GGUF file."""
    source = resolve_model(path)
    if source.kind == "hub":
        raise LowbitError(f"inspect reads local files; {path} is not one")
    if source.gguf_file:
        report = _inspect_gguf(Path(source.path) / source.gguf_file)
    else:
        report = _inspect_directory(Path(source.path), native=source.kind == "native")
    if not any(tensor["weights"] for tensor in report["tensors"]):
        raise LowbitError(f"{path} holds no weights (no tensors, or only empty ones); it is not a usable model")
    by_format: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "weights": 0, "bytes": 0})
    for tensor in report["tensors"]:
        group = by_format[tensor["format"]]
        group["tensors"] += 1
        group["weights"] += tensor["weights"] or 0
        group["bytes"] += tensor["bytes"]
    for group in by_format.values():
        group["bits_per_weight"] = 8 * group["bytes"] / group["weights"] if group["weights"] else None
    total_bytes = sum(t["bytes"] for t in report["tensors"])
    parameters = sum(t["weights"] or 0 for t in report["tensors"])
    return {
        "path": str(path),
        "kind": source.kind,
        **report,
        "parameters": parameters,
        "bytes": total_bytes,
        "bits_per_weight": 8 * total_bytes / parameters if parameters else None,
        "formats": dict(by_format),
    }
