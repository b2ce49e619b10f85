"""MLX export: a directory that ``mlx_lm.load`` reads, written without mlx installed.

Layout of ``OUT/`` (what ``mlx_lm.convert`` writes for a quantized model):

- ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` with
  ``model.safetensors.index.json`` above ``max_shard_bytes``). A quantized linear ``X`` is
  stored as MLX's ``X.weight`` (uint32 ``(out, in*bits/32)``), ``X.scales`` and ``X.biases``
  (``(out, in/group_size)``; affine: ``w = scales * q + biases`` per group along the input),
  plus ``X.bias`` when the layer has one. An MXFP4 linear is ``X.weight`` and ``X.scales``
  (the E8M0 bytes, uint8), no biases. Every other tensor is written as lowbit holds it, under
  its transformers name (mlx-lm's ``sanitize`` maps those names as it does for any HF model).
- ``config.json``: the model's transformers config with ``quantization`` =
  ``{"group_size", "bits", "mode"}`` (the most common format; mlx-lm quantizes with it), one
  entry per module whose format differs (``{"group_size", "bits", "mode"}``) or that lowbit
  kept in float (``false``: embeddings, ``lm_head`` …), mirrored as ``quantization_config``
  as mlx-lm writes it; ``lowbit_export`` says that lowbit wrote it (version, target, plan),
  as every repacked export does.
- the tokenizer files and ``generation_config.json``.

Why the conversion is exact. MLX packs a row's codes as one least-significant-bit-first
bit stream viewed as little-endian uint32 words, for every width (2, 3, 4, 5, 6, 8): byte for
byte what ``formats/packing.py`` writes, so ``X.weight`` is lowbit's ``packed`` part viewed
as uint32 (whole groups of 32+ columns make every row a whole number of words). lowbit's
asymmetric ``w = (q - zero) * scale`` is MLX's ``scale * q + bias`` with
``bias = -scale * zero``; a symmetric format's offset codes give ``bias = -scale * 2**(bits-1)``.
The scales and biases are written in the model's dtype (MLX promotes a layer with float32
scales in a 16-bit model to float32, so the layout mlx-lm runs is the model's own dtype).
In a float32 model this is exact: a float16 scale times an integer below 256 needs at most 19
significant bits, so bias and ``scale * q + bias`` are exact in float32, and MLX's weights are
lowbit's bit for bit. In a float16 or bfloat16 model MLX computes ``scale * q + bias`` in that
dtype (two roundings, and a bfloat16 scale drops three of float16's bits), so weights differ by
a few units in the last place (for 8-bit codes in bfloat16, up to about one quantization step);
the export warns and says how to get an exact one (quantize the model in float32). Every
tensor lowbit keeps in float (embeddings, norms) is written in the dtype the model computes
in, so MLX computes in it too: for a float32 model (the default SmolLM2) that is float32. MXFP4's codes and
E8M0 scales are the OCP layout on both sides and map exactly in any dtype.

Two config keys are adapted for mlx-lm 0.32: transformers 5 writes ``rope_parameters``,
mlx-lm's model arguments read ``rope_theta`` / ``rope_scaling`` (and would silently take their
own defaults), so those are added (:func:`legacy_rope`); a quantized ``lm_head`` of a model
that tied it to the embeddings unties it. mlx-lm applies no sliding window to Mistral or
Gemma 2, so their exports warn that past the window they are other models.

What MLX cannot carry is refused, naming a target that can: NF4, FP8 (MLX's ``mxfp8`` has
power-of-two scales per 32, not a float scale per channel), 7-bit integers, per-channel or
per-tensor scales, group sizes other than 32, 64 and 128, and partial last groups (MLX needs
whole groups along the input; checked before anything is written). Layers kept by a float
format (``fp16`` …) are written as plain float weights.

The writer streams: each module is converted on its own (a packed weight is a view of
lowbit's bytes; only scales and biases are new) and a shard is written as soon as it is full
(:func:`write_shards`; mlx ships no writer that runs without mlx itself).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.atomic import atomic_directory
from lowbit.export.repack import EXPORT_KEY, MAX_SHARD_BYTES, model_dtype
from lowbit.formats import Format
from lowbit.lazy import INDEX_FILE
from lowbit.nn import PART_PREFIX, QuantLinear, is_linear, quantized_linears, unique_state_dict
from lowbit.version import __version__

#: integer widths MLX's affine mode packs
MLX_BITS = (2, 3, 4, 5, 6, 8)
#: group sizes MLX's affine mode runs
MLX_GROUP_SIZES = (32, 64, 128)
#: MXFP4's block, fixed by the OCP spec on both sides
MXFP4_GROUP = 32
TARGET = "mlx"


def carries(fmt: Format) -> str | None:
    """None when MLX holds ``fmt`` with no loss, else why it cannot."""
    if fmt.family in ("float", "mxfp4"):
        return None
    if fmt.family != "int":
        return f"MLX quantizes affine integers (2-6 or 8 bits, groups of 32/64/128) and MXFP4, not {fmt.family}"
    if fmt.bits not in MLX_BITS:
        return f"MLX packs {', '.join(map(str, MLX_BITS))}-bit integers, not {fmt.bits}-bit"
    if fmt.per_tensor or fmt.group_size is None:
        return f"MLX scales groups of {'/'.join(map(str, MLX_GROUP_SIZES))} weights along the input, not whole rows or tensors"
    if fmt.group_size not in MLX_GROUP_SIZES:
        return f"MLX runs group sizes {'/'.join(map(str, MLX_GROUP_SIZES))}, not {fmt.group_size}"
    return None


def group_size(fmt: Format) -> int | None:
    """The group MLX quantizes ``fmt`` with (None for a float format, written dense)."""
    if fmt.family == "float":
        return None
    return MXFP4_GROUP if fmt.family == "mxfp4" else fmt.group_size


def quantization_entry(fmt: Format) -> dict | bool:
    """``fmt`` as an entry of mlx-lm's ``quantization`` config (False: a dense weight)."""
    size = group_size(fmt)
    if size is None:
        return False
    if fmt.family == "mxfp4":
        return {"group_size": size, "bits": 4, "mode": "mxfp4"}
    return {"group_size": size, "bits": fmt.bits, "mode": "affine"}


def check_layers(model: nn.Module) -> None:
    """Refuse, before writing, a layer MLX would need a partial last group for, or one that quantizes its inputs."""
    for name, module in quantized_linears(model).items():
        if module.input_quantizer is not None:
            raise LowbitError(f"MLX runs weight-only layers; {name} quantizes its inputs too; export it to native")
        size = group_size(module.format)
        if size is not None and module.in_features % size:
            dividing = [g for g in MLX_GROUP_SIZES if module.in_features % g == 0]
            hint = f"use a group size that divides it ({', '.join(f'g{g}' for g in dividing)})" if dividing else "native can carry it"
            raise LowbitError(
                f"MLX needs whole groups: {name} has {module.in_features} input features, not a multiple of "
                f"{module.format.name}'s group of {size}; {hint}"
            )


def module_tensors(name: str, module: QuantLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One QuantLinear's tensors in MLX's layout, names included; scales and biases in ``dtype``."""
    fmt = module.format
    parts = {part: getattr(module, PART_PREFIX + part).detach().cpu() for part in module.part_names}
    if fmt.family == "float":
        tensors = {f"{name}.weight": parts["data"]}
    elif fmt.family == "mxfp4":
        tensors = {f"{name}.weight": _as_words(parts["packed"]), f"{name}.scales": parts["exponent"].contiguous()}
    else:
        _, params = fmt.unpack(parts, (module.out_features, module.in_features))
        zero = torch.full_like(params.scale, fmt.half) if fmt.symmetric else params.zero.float()
        tensors = {
            f"{name}.weight": _as_words(parts["packed"]),
            f"{name}.scales": params.scale.to(dtype),
            f"{name}.biases": (-(params.scale * zero)).to(dtype),  # exact in float32, then one rounding
        }
    if module.bias is not None:
        tensors[f"{name}.bias"] = module.bias.detach().cpu()
    return tensors


def _as_words(packed: torch.Tensor) -> torch.Tensor:
    """lowbit's packed bytes as MLX's little-endian uint32 words (the same bits; whole groups of
    32 or more columns make every row a whole number of words)."""
    return packed.contiguous().view(torch.uint32)


def mlx_tensors(model: nn.Module, dtype: torch.dtype) -> Iterator[dict[str, torch.Tensor]]:
    """The model's tensors in MLX's layout, one module (or one plain tensor) at a time, in state-dict order."""
    quantized = quantized_linears(model)
    done: set[str] = set()
    for key, tensor in unique_state_dict(model).items():
        owner = key.rpartition(".")[0]
        if owner not in quantized:
            yield {key: tensor.detach().cpu()}
        elif owner not in done:
            done.add(owner)
            yield module_tensors(owner, quantized[owner], dtype)


def quantization_config(model: nn.Module) -> dict | None:
    """mlx-lm's ``quantization``: the most common entry as the default, every other quantized
    module's own entry, and ``false`` for every linear and embedding kept in float."""
    entries = {name: quantization_entry(module.format) for name, module in quantized_linears(model).items()}
    counts = Counter(json.dumps(entry, sort_keys=True) for entry in entries.values() if entry)
    if not counts:
        return None
    default = json.loads(counts.most_common(1)[0][0])
    config: dict = dict(default)
    for name, module in model.named_modules():
        if name in entries:
            if entries[name] != default:
                config[name] = entries[name]
        elif name and (is_linear(module) or isinstance(module, nn.Embedding)):
            config[name] = False
    return config


def legacy_rope(config: dict) -> dict:
    """``rope_theta`` and ``rope_scaling`` from transformers 5's ``rope_parameters``: mlx-lm's
    model arguments read the older keys and would otherwise fall back to their own defaults
    (Qwen2's 1e6 instead of a config's 1e4: wrong logits, no error)."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope or "rope_theta" in config:
        return {}  # absent, already written the old way, or nested per layer type
    legacy = {"rope_theta": rope["rope_theta"]}
    kind = rope.get("rope_type", "default")
    if kind != "default" and config.get("rope_scaling") is None:
        legacy["rope_scaling"] = {**{k: v for k, v in rope.items() if k != "rope_theta"}, "type": kind}
    return legacy


def mlx_config(model: nn.Module, dtype: torch.dtype) -> dict:
    """The config.json of the export: the model's config, mlx-lm's quantization, lowbit's manifest."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    quantization = quantization_config(model)
    if quantization is not None:
        config["quantization"] = quantization
        config["quantization_config"] = quantization  # mlx-lm mirrors it for the hub's file view
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if config.get("tie_word_embeddings") and isinstance(output, QuantLinear):
        config["tie_word_embeddings"] = False  # lowbit quantized lm_head on its own: it is no longer the embedding
    config.update(legacy_rope(config))
    config["dtype"] = str(dtype).removeprefix("torch.")
    config[EXPORT_KEY] = {"version": __version__, "target": TARGET, "plan": model.lowbit_manifest.get("plan", {}).get("name")}
    return config


#: model types whose sliding-window attention mlx-lm 0.32 does not apply (Mistral runs as Llama
#: with every layer global; its Gemma 2 has one causal mask): outputs differ past the window
UNSLID = ("mistral", "gemma2")


def _warn_if_unslid(config: dict) -> None:
    window = config.get("sliding_window")
    if config.get("model_type") in UNSLID and window:
        warnings.warn(
            f"mlx-lm runs {config['model_type']} without its sliding window of {window} tokens: beyond that much "
            "context its outputs differ from lowbit's (and transformers')",
            stacklevel=3,
        )


def _warn_if_inexact(model: nn.Module, dtype: torch.dtype) -> None:
    if dtype != torch.float32 and any(m.format.family == "int" for m in quantized_linears(model).values()):
        warnings.warn(
            f"MLX dequantizes integer weights as scale * q + bias in {str(dtype).removeprefix('torch.')}, so they "
            "differ from lowbit's by a few units in the last place; a model quantized in float32 "
            "(lowbit.quantize(lowbit.load(MODEL, dtype='float32'), ...)) exports exactly",
            stacklevel=3,
        )


def write_shards(groups: Iterator[dict[str, torch.Tensor]], directory: Path, max_shard_bytes: int) -> None:
    """Write tensor groups as they come, a shard file as soon as the next group would overflow it;
    one file is ``model.safetensors``, more are numbered with an index, as mlx-lm writes them.

    Not ``repack.ShardWriter``: MLX's packed weights are uint32, which that writer's dtype table
    does not hold; safetensors' ``save_file`` does. A shard's converted tensors are mostly views
    of lowbit's parts (only scales and biases are new), so holding one shard costs little.
    """
    shards: list[dict[str, torch.Tensor]] = []
    pending: dict[str, torch.Tensor] = {}
    size = 0
    for group in groups:
        nbytes = sum(t.numel() * t.element_size() for t in group.values())
        if pending and size + nbytes > max_shard_bytes:
            save_file(pending, directory / f".shard-{len(shards)}", metadata={"format": "mlx"})
            shards.append(dict.fromkeys(pending))
            pending, size = {}, 0
        pending.update({name: tensor.contiguous() for name, tensor in group.items()})
        size += nbytes
    save_file(pending, directory / f".shard-{len(shards)}", metadata={"format": "mlx"})
    shards.append(dict.fromkeys(pending))
    if len(shards) == 1:
        (directory / ".shard-0").rename(directory / "model.safetensors")
        return
    weight_map = {}
    for number, names in enumerate(shards):
        final = f"model-{number + 1:05d}-of-{len(shards):05d}.safetensors"
        (directory / f".shard-{number}").rename(directory / final)
        weight_map.update(dict.fromkeys(names, final))
    total = sum((directory / name).stat().st_size for name in set(weight_map.values()))
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def estimated_bytes(model: nn.Module) -> int:
    """About what the export writes: the model's tensors as lowbit holds them (scales and biases
    in the model's dtype take at most twice lowbit's float16 scales)."""
    return 2 * sum(t.numel() * t.element_size() for t in unique_state_dict(model).values())


def save_mlx(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer=None,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write ``model`` (quantized by lowbit, every format one :func:`carries`) as an MLX directory at ``path``."""
    if getattr(model, "lowbit_manifest", None) is None:
        raise LowbitError("this model was not quantized by lowbit; quantize it first (lowbit.quantize)")
    if sys.byteorder != "little":
        raise LowbitError("MLX's packed words are little-endian; export on a little-endian machine")
    check_layers(model)
    dtype = model_dtype(model)
    _warn_if_inexact(model, dtype)
    if tokenizer is None:
        warnings.warn(f"no tokenizer to write: mlx_lm.load needs one; copy the model's tokenizer files into {path}", stacklevel=3)
    inputs = [getattr(model, "lowbit_source", None)]
    with atomic_directory(path, overwrite, inputs=inputs, needed_bytes=estimated_bytes(model)) as temporary:
        config = mlx_config(model, dtype)
        _warn_if_unslid(config)
        write_shards(mlx_tensors(model, dtype), temporary, max_shard_bytes)
        (temporary / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(temporary)
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)
    return Path(path)
