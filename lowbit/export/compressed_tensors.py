"""compressed-tensors checkpoints (``--to compressed-tensors``): what vLLM and transformers load.

One config group per distinct scheme of the plan (its ``targets``: ``["Linear"]`` when every
quantized linear shares one scheme, else the module names), the linears lowbit left dense
under ``ignore``, ``quantization_status: "compressed"``, and per module:

- **pack-quantized** (INT2..INT8 weight-only, sym or asym, per group or channel; lowbit's
  per-tensor scale is written per channel, the same values): ``weight_packed`` int32
  ``(out, ceil(in*bits/32))`` (signed values offset by ``2**(bits-1)``, one LSB-first bit stream
  per row: exactly lowbit's offset-binary codes), ``weight_scale`` ``(out, groups)``,
  ``weight_shape`` int64 ``[out, in]``, and for asym ``weight_zero_point`` int32, the zeros
  (minus ``2**(bits-1)``) packed along the outputs ``(ceil(out*bits/32), groups)``;
- **int-quantized** (W8A8: symmetric INT8 weights on a linear whose ``input_quantizer`` is
  lowbit's dynamic per-token INT8, as SmoothQuant sets it): ``weight`` int8, ``weight_scale``,
  and ``input_activations`` ``{int, 8 bits, strategy token, dynamic}``;
- **float-quantized** (FP8 E4M3 weights, per channel or tensor; W8A16, or W8A8 with lowbit's
  dynamic per-token FP8 activations, the ``w8a8-fp8`` preset): ``weight`` float8_e4m3fn,
  ``weight_scale`` ``(out, 1)`` or ``(1,)``, and for W8A8 ``input_activations``
  ``{float, 8 bits, strategy token, dynamic}``.

Scales are written in the model's dtype, because that is the dtype compressed-tensors,
transformers and vLLM create them in when loading (``initialize_qparams`` uses the weight's
dtype): a float32 or float16 model carries lowbit's float16 integer scales exactly; a scale
that the model's dtype would round (bfloat16 models; FP8's float32 scales in a 16-bit
model) is refused, never silently changed.

Why not the package's own compressors: they re-quantize a float weight from scale and zero
(``quantize(w / s)``), which may round a code differently from lowbit's; writing lowbit's
codes directly is exact, and the packing is the bit stream ``int_layouts.pack_int32`` shares
with GPTQ and AWQ. The tests prove it with the package's ``decompress`` and with
transformers' compressed-tensors loader.

Not written (refused naming a target that can): a partial last group (the package's
quantize/dequantize require whole groups), NF4, MXFP4, FP8 E5M2, asymmetric W8A8. vLLM (not runnable here) reads the same
names: ``CompressedTensorsWNA16.create_weights`` registers ``weight_packed`` (int32,
``packed_dim=1``), ``weight_scale``, ``weight_shape`` and, for asym, ``weight_zero_point``
packed along the outputs; ``CompressedTensorsW8A8Int8`` / ``W8A16Fp8`` / ``W8A8Fp8`` register
``weight`` and ``weight_scale``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.int_layouts import (
    int_format_reason,
    int_weight,
    pack_int32,
    partial_group_reason,
)
from lowbit.export.repack import dense_linears, model_dtype, write_repacked
from lowbit.formats import Format
from lowbit.formats.fp8 import FP8Format
from lowbit.formats.integer import IntegerFormat
from lowbit.kernels.activation import (
    fake_quantize_fp8_per_token,
    fake_quantize_int8_per_token,
)
from lowbit.nn import QuantLinear, quantized_linears

TARGET = "compressed-tensors"
PACK, INT, FLOAT = "pack-quantized", "int-quantized", "float-quantized"


def carries(fmt: Format) -> str | None:
    if isinstance(fmt, FP8Format):
        return None if fmt.variant == "e4m3" else "its FP8 weights are E4M3 only"
    return int_format_reason(fmt, tuple(range(2, 9)))


def _weight_args(fmt: Format) -> dict:
    if isinstance(fmt, FP8Format):
        strategy = "tensor" if fmt.per_tensor else "channel"
        return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "group_size": None, "dynamic": False}
    args = {"num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric, "dynamic": False}
    if fmt.group_size is not None:
        args.update(strategy="group", group_size=fmt.group_size)
    else:
        args.update(strategy="channel", group_size=None)
    if not fmt.symmetric:
        args["zp_dtype"] = "torch.int8"
    return args


ACTIVATIONS_INT8_TOKEN = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
ACTIVATIONS_FP8_TOKEN = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}


def scheme_of(name: str, module: QuantLinear) -> tuple[str, dict, dict | None]:
    """``(format, weights args, input activation args)`` of one quantized linear."""
    fmt, quantizer = module.format, module.input_quantizer
    if quantizer is None:
        return (FLOAT if isinstance(fmt, FP8Format) else PACK), _weight_args(fmt), None
    if quantizer is fake_quantize_fp8_per_token and isinstance(fmt, FP8Format):
        return FLOAT, _weight_args(fmt), ACTIVATIONS_FP8_TOKEN
    if quantizer is fake_quantize_int8_per_token and isinstance(fmt, IntegerFormat) and fmt.bits == 8 and fmt.symmetric:
        return INT, _weight_args(fmt), ACTIVATIONS_INT8_TOKEN
    raise LowbitError(
        f"{TARGET} cannot carry {name}: its W8A8 schemes are symmetric INT8 weights with per-token INT8 activations "
        f"and FP8 weights with per-token FP8 activations, not {fmt.name} with {getattr(quantizer, '__name__', quantizer)}"
    )


def _scale(scale: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``scale`` in ``dtype`` (the model's), refused when that would change a value."""
    converted = scale.to(dtype)
    if not torch.equal(converted.float(), scale.float()):
        raise LowbitError(
            f"{TARGET} cannot carry {name} exactly: its loaders keep scales in the dtype the model computes in "
            f"({str(dtype).removeprefix('torch.')}), which would round lowbit's scales; export to gptq or awq (float16 "
            "scales), or quantize a copy of the model loaded in float16 or float32"
        )
    return converted


def convert(name: str, module: QuantLinear, layout: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized linear (without the module name)."""
    fmt = module.format
    if layout == FLOAT:
        parts = module.qtensor.parts
        scale = parts["scale"].reshape(1) if fmt.per_tensor else parts["scale"].reshape(-1, 1)
        return {"weight": parts["data"].view(torch.float8_e4m3fn), "weight_scale": _scale(scale, dtype, name)}
    weight = int_weight(module)
    half = 2 ** (weight.bits - 1)
    scale = _scale(weight.scale, dtype, name)
    if layout == INT:
        return {"weight": (weight.codes.to(torch.int16) - half).to(torch.int8), "weight_scale": scale}
    tensors = {
        "weight_packed": pack_int32(weight.codes, weight.bits),
        "weight_scale": scale,
        "weight_shape": torch.tensor([module.out_features, module.in_features], dtype=torch.int64),
    }
    if not weight.symmetric:
        tensors["weight_zero_point"] = pack_int32(weight.zero.t().contiguous(), weight.bits).t().contiguous()
    return tensors


def quantization_config(schemes: dict[str, tuple[str, dict, dict | None]], ignore: list[str]) -> dict:
    """The ``quantization_config`` for ``schemes`` (module name -> scheme_of)."""
    groups: dict[str, list[str]] = {}
    for name, scheme in schemes.items():
        groups.setdefault(json.dumps(scheme, sort_keys=True), []).append(name)
    config_groups = {}
    for number, (key, names) in enumerate(groups.items()):
        layout, weights, activations = json.loads(key)
        config_groups[f"group_{number}"] = {
            "targets": ["Linear"] if len(groups) == 1 else names,
            "weights": weights,
            "input_activations": activations,
            "output_activations": None,
            "format": layout,
        }
    layouts = {scheme[0] for scheme in schemes.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": layouts.pop() if len(layouts) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


def write(model: nn.Module, path: str | os.PathLike, tokenizer, overwrite: bool) -> Path:
    modules = quantized_linears(model)
    for name, module in modules.items():
        reason = isinstance(module.format, IntegerFormat) and partial_group_reason(module.format, module.in_features)
        if reason:
            raise LowbitError(f"{TARGET} cannot carry {name}: {reason}")
    schemes = {name: scheme_of(name, module) for name, module in modules.items()}
    dtype = model_dtype(model)
    config = quantization_config(schemes, dense_linears(model))
    return write_repacked(
        model, path, tokenizer, overwrite, target=TARGET, quantization_config=config,
        convert=lambda name, module: convert(name, module, schemes[name][0], dtype),
    )  # fmt: skip
