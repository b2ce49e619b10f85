"""AWQ GEMM checkpoints (``--to awq``): what AutoAWQ, GPTQModel, transformers and vLLM load.

Each quantized linear ``X`` becomes (AutoAWQ's ``WQLinear_GEMM`` buffers; vLLM's
``AWQLinearMethod.create_weights``):

- ``X.qweight`` int32 ``(in, out / 8)``: codes packed along the *outputs*, eight per word in
  AWQ's order ``[0, 2, 4, 6, 1, 3, 5, 7]`` (slot ``i`` holds output ``8k + order[i]``);
- ``X.qzeros`` int32 ``(groups, out / 8)``: the zero points themselves (no ``- 1``), same order;
- ``X.scales`` float16 ``(groups, out)``; ``X.bias`` as it is.

``quantization_config``: ``quant_method: awq``, ``version: gemm``, ``bits: 4``,
``group_size``, ``zero_point: true``. AWQ is asymmetric by construction: a symmetric lowbit
format goes through exactly as zero point 8.

Refused before anything is written: anything but INT4 with a group size (AWQ kernels have
no per-channel or per-tensor scales), a plan mixing group sizes, a partial last group,
outputs that are not a multiple of 8, unquantized linears in the decoder layers, a quantized
lm_head (the checks shared with GPTQ: :func:`lowbit.export.gptq.uniform_format`).

vLLM (not runnable here) was checked by reading ``vllm/model_executor/layers/quantization/awq.py``:
``qweight`` int32 ``(in, out / pack_factor)`` with ``output_dim=1, packed_dim=1``, ``qzeros``
int32 ``(in / group_size, out / pack_factor)``, ``scales`` in the model's dtype ``(groups, out)``
(loaded float16 here), and its dequantization reverses the same order ``[0, 4, 1, 5, 2, 6, 3, 7]``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.gptq import uniform_format
from lowbit.export.int_layouts import (
    AWQ_ORDER,
    int_format_reason,
    int_weight,
    pack_int32,
)
from lowbit.export.repack import write_repacked
from lowbit.formats import Format
from lowbit.nn import QuantLinear, quantized_linears

TARGET = "awq"


def carries(fmt: Format) -> str | None:
    return int_format_reason(fmt, (4,), channel=False, tensor=False)


def convert(name: str, module: QuantLinear) -> dict[str, torch.Tensor]:
    """The AWQ GEMM tensors of one quantized linear (without the module name)."""
    weight = int_weight(module)
    return {
        "qweight": pack_int32(weight.codes.t().contiguous(), 4, AWQ_ORDER),
        "qzeros": pack_int32(weight.zero.t().contiguous(), 4, AWQ_ORDER),
        "scales": weight.scale.t().contiguous(),
    }


def quantization_config(group_size: int) -> dict:
    return {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": group_size, "zero_point": True,
            "modules_to_not_convert": None}  # fmt: skip


def write(model: nn.Module, path: str | os.PathLike, tokenizer, overwrite: bool) -> Path:
    _, group_size, _ = uniform_format(model, TARGET)
    for name, module in quantized_linears(model).items():
        if module.out_features % 8:
            raise LowbitError(f"awq cannot carry {name}: its {module.out_features} outputs are not a multiple of 8")
    config = quantization_config(group_size)
    return write_repacked(model, path, tokenizer, overwrite, target=TARGET, quantization_config=config, convert=convert)
