"""The sizing report: memory a model needs in each format, whether it fits, and how it was counted.

A format *fits* when weights + KV cache + activations + overhead <= GPU memory. Every report
carries ``ASSUMPTIONS`` (how each figure is counted, in general) and ``notes`` (what is
particular to this model).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lowbit.advisor.gguf_mixes import GGUF_F32_KINDS, GGUF_MIXES, GGUF_PREFIX, GGUF_TYPES
from lowbit.advisor.memory import (
    FULL_ATTENTION,
    GB,
    RUNTIME_OVERHEAD_BYTES,
    SLIDING_ATTENTION,
    GiB,
    activation_bytes,
    kv_cache_bytes,
    layer_types,
    parse_memory,
)
from lowbit.advisor.shapes import ParameterShape, parameter_shapes, sizing_config
from lowbit.advisor.weights import canonical_format_name, linear_bits_per_weight, weight_bytes_of_shapes
from lowbit.arch import KNOWN_ARCHITECTURES
from lowbit.config import ConfigSource, read_raw_config
from lowbit.formats.gguf_types import TENSOR_TYPE_FALLBACK

#: How every figure is counted; each report carries this under "assumptions".
ASSUMPTIONS = {
    "lowbit_formats": (
        "the linear layers of the decoder blocks (attention q/k/v/o, MLP gate/up/down, every expert "
        "included) take the format's exact storage size, scales, zero points and partial groups "
        "included; token embeddings and lm_head stay in 16 bits (bf16) as lowbit keeps them by "
        "default, and so do norms, biases and MoE routers; in fp32 everything is fp32."
    ),
    "gguf": (
        "each tensor gets the type llama.cpp's llama-quantize gives it in that mix "
        "(llama_tensor_get_type, no importance matrix), with its fallbacks for rows that are not a "
        "multiple of a block; token_embd and output are quantized as the mix says; norms, biases and "
        "routers are F32. Tensor data only: a .gguf file adds metadata and the tokenizer (a few MB)."
    ),
    "kv_cache": (
        "K and V of every layer, num_key_value_heads x head_dim values per token (GQA aware), 16 bits "
        "per value; sliding-window layers keep at most their window."
    ),
    "activations": (
        "one forward over batch x context tokens with fused attention: per token 2 x hidden + 3 x MLP "
        "width values in 16 bits, plus fp32 logits of the last token of each sequence; runtimes that "
        "feed the prompt in chunks (llama.cpp, vLLM) need less."
    ),
    "overhead": "1 GiB for the CUDA context, library workspaces and allocator fragmentation.",
    "fits": (
        "weights + KV cache + activations + overhead <= GPU memory. GB = 10^9 bytes, GiB = 2^30 bytes; "
        "a card sold as '24 GB' has 24 GiB."
    ),
}

LOWBIT_FORMATS = (
    "fp32", "bf16", "fp16", "fp8", "int8", "int4-g32", "int4-g128", "nf4", "nf4-dq", "mxfp4", "int3-g128", "int2-g64",
)  # fmt: skip
#: Formats a report covers unless told otherwise: lowbit's, then llama.cpp's mixes.
DEFAULT_FORMATS = LOWBIT_FORMATS + tuple(GGUF_PREFIX + mix for mix in GGUF_MIXES)


def size_report(
    config_or_path: ConfigSource,
    *,
    context: int = 4096,
    batch: int = 1,
    gpu_memory: str | int | None = None,
    formats: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Memory the model needs in each format, from its config alone; JSON-serializable.

    Keys: ``model`` (name, architecture, model_type), ``parameters``, ``context``, ``batch``,
    ``weights``, ``bits_per_weight`` (per format, stored bits per weight of the decoder's linear
    layers, scales included: what compare and eval report) and ``bits_per_parameter`` (the
    weights' bytes averaged over every parameter, embeddings included),
    ``kv_cache_bytes``, ``activation_bytes``, ``overhead_bytes``, ``total_bytes`` (per format:
    weights + KV cache + activations + overhead), with ``gpu_memory`` also ``gpu_memory_bytes``
    and ``fits`` (per format), then ``assumptions`` (how everything is counted) and ``notes``
    (what is particular to this model).
    """
    raw = read_raw_config(config_or_path)
    config = sizing_config(raw)
    shapes = parameter_shapes(config)
    requested = [formats] if isinstance(formats, str) else formats or DEFAULT_FORMATS
    names = list(dict.fromkeys(canonical_format_name(name) for name in requested))
    parameters = sum(p.numel for p in shapes)
    weights = {name: weight_bytes_of_shapes(config, shapes, name, keep_embeddings=True) for name in names}
    kv_cache = kv_cache_bytes(config, context, batch)
    activations = activation_bytes(config, context, batch)
    report: dict[str, Any] = {
        "model": _model_identity(raw, config),
        "parameters": parameters,
        "context": context,
        "batch": batch,
        "weights": weights,
        "bits_per_weight": {name: round(linear_bits_per_weight(config, shapes, name), 4) for name in names},
        "bits_per_parameter": {name: round(8 * size / parameters, 4) for name, size in weights.items()},
        "kv_cache_bytes": kv_cache,
        "activation_bytes": activations,
        "overhead_bytes": RUNTIME_OVERHEAD_BYTES,
        "total_bytes": {name: size + kv_cache + activations + RUNTIME_OVERHEAD_BYTES for name, size in weights.items()},
    }
    if gpu_memory is not None:
        memory = parse_memory(gpu_memory)
        report["gpu_memory_bytes"] = memory
        report["fits"] = {name: total <= memory for name, total in report["total_bytes"].items()}
    report["assumptions"] = dict(ASSUMPTIONS)
    report["notes"] = _notes(raw, config, shapes, context)
    return report


def _model_identity(raw: dict[str, Any], config: dict[str, Any]) -> dict[str, str | None]:
    architectures = raw.get("architectures") or config.get("architectures") or [None]
    model_type = config.get("model_type") or raw.get("model_type")
    source = raw.get("_name_or_path")
    name = Path(source).name.removesuffix(".json") if source else architectures[0] or model_type or "model"
    return {"name": name, "architecture": architectures[0], "model_type": model_type}


def _notes(raw: dict[str, Any], config: dict[str, Any], shapes: list[ParameterShape], context: int) -> list[str]:
    """What the reader of this model's figures should know beyond the general assumptions."""
    notes = []
    if isinstance(raw.get("text_config"), dict):
        notes.append(
            f"multimodal config ({raw.get('model_type')}): sized its text_config only; the vision or "
            "audio tower is not counted."
        )
    model_type = config.get("model_type")
    if model_type not in KNOWN_ARCHITECTURES:
        notes.append(f"model_type {model_type!r} is not in lowbit's architecture table; the Llama layout was assumed.")
    longest = config.get("max_position_embeddings")
    if isinstance(longest, int) and not isinstance(longest, bool) and context > longest:
        notes.append(
            f"a context of {context:,} tokens is beyond this model's maximum of {longest:,} "
            "(max_position_embeddings): the KV cache and activations are sized as asked, but the model "
            "was not trained for it."
        )
    notes += _sliding_window_notes(config, context)
    notes += _gguf_row_notes(shapes)
    quantization = raw.get("quantization_config")
    if isinstance(quantization, dict):
        notes.append(
            f"the config carries a quantization_config ({quantization.get('quant_method', 'unknown method')}): "
            "the figures are for this architecture in each format, not the size of that checkpoint's files."
        )
    return notes


def _sliding_window_notes(config: dict[str, Any], context: int) -> list[str]:
    kinds = Counter(layer_types(config))
    notes = []
    window = config.get("sliding_window")
    if kinds[SLIDING_ATTENTION] and window:
        capped = " (it caps the KV cache at this context)" if window < context else ""
        notes.append(
            f"{kinds[SLIDING_ATTENTION]} of {config['num_hidden_layers']} layers use a sliding window of "
            f"{window} tokens{capped}; a runtime that keeps the full cache for them needs more."
        )
    elif kinds[SLIDING_ATTENTION]:
        notes.append("layer_types names sliding layers but the config gives no sliding_window: counted as full.")
    others = sorted(set(kinds) - {FULL_ATTENTION, SLIDING_ATTENTION})
    if others:
        notes.append(f"layer types {', '.join(others)} are counted as full attention, an upper bound.")
    return notes


def _gguf_row_notes(shapes: list[ParameterShape]) -> list[str]:
    """Which row lengths do not fill whole GGUF blocks, and what llama.cpp does about it."""
    rows = sorted({p.shape[-1] for p in shapes if len(p.shape) == 2 and p.kind not in GGUF_F32_KINDS})
    k_block, legacy_block = GGUF_TYPES["Q4_K"].block_size, GGUF_TYPES["Q4_0"].block_size
    partial_k_rows = [str(row) for row in rows if row % k_block]
    partial_legacy_rows = [str(row) for row in rows if row % legacy_block]
    fallbacks = "; ".join(
        f"{k_quant} -> {fallback}" for k_quant, fallback in TENSOR_TYPE_FALLBACK.items() if k_quant.endswith("_K")
    )
    notes = []
    if partial_k_rows:
        notes.append(
            f"rows of {', '.join(partial_k_rows)} values are not a multiple of {k_block}: GGUF K-quant mixes "
            f"store those tensors in llama.cpp's fallback types ({fallbacks})."
        )
    if partial_legacy_rows:
        notes.append(
            f"rows of {', '.join(partial_legacy_rows)} values are not a multiple of {legacy_block}: llama.cpp "
            "keeps those tensors in F16 for K-quant mixes and refuses Q4_0 … Q8_0; they are counted as F16."
        )
    return notes


def format_report(report: dict[str, Any]) -> str:
    """A table of ``size_report``'s figures for a terminal: one row per format, sizes in GB."""
    model, kv_cache, fits = report["model"], report["kv_cache_bytes"], report.get("fits")
    architecture = model["architecture"]
    title = model["name"] if architecture in (None, model["name"]) else f"{model['name']} ({architecture})"
    lines = [
        f"{title}: {report['parameters'] / 1e9:.2f} billion parameters",
        f"context {report['context']} x batch {report['batch']}: KV cache {_gb(kv_cache)} GB, "
        + f"activations {_gb(report['activation_bytes'])} GB, overhead {_gb(report['overhead_bytes'])} GB",
    ]
    if fits is not None:
        memory = report["gpu_memory_bytes"]
        lines.append(f"GPU memory: {_gb(memory)} GB ({memory / GiB:.2f} GiB)")
    header = (
        f"{'format':<14} {'bits/weight':>11} {'bits/param':>10} {'weights GB':>11} {'weights+KV GB':>14} {'total GB':>9}"
    )
    header += "  fits" if fits is not None else ""
    lines += ["", header, "-" * len(header)]
    for name, size in report["weights"].items():
        row = (
            f"{name:<14} {report['bits_per_weight'][name]:>11.2f} {report['bits_per_parameter'][name]:>10.2f} {_gb(size):>11} "
            + f"{_gb(size + kv_cache):>14} {_gb(report['total_bytes'][name]):>9}"
        )
        lines.append(row + (f"  {'yes' if fits[name] else 'no'}" if fits is not None else ""))
    lines += [
        "",
        "bits/weight: stored bits per weight of the decoder's linear layers, scales and zeros included (as in "
        + "compare and eval); bits/param: all weights' bytes over all parameters, embeddings included.",
        "total = weights + KV cache + activations + overhead. GB = 10^9 bytes.",
        "lowbit formats keep embeddings and lm_head in bf16; the JSON report lists every assumption.",
    ]
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)


def _gb(size: int) -> str:
    return f"{size / GB:.2f}"
