"""GPTQ checkpoints (``--to gptq``, ``--to gptq-v2``): what GPTQModel, transformers and vLLM load.

Each quantized linear ``X`` becomes (layouts as GPTQModel's ``TorchQuantLinear`` registers
them and vLLM's ``GPTQLinearMethod.create_weights`` declares them):

- ``X.qweight`` int32 ``(in * bits / 32, out)``: the codes of each output column packed along
  the input features, LSB first (3-bit codes straddle words);
- ``X.qzeros`` int32 ``(groups, out * bits / 32)``: the zero points packed along the outputs;
- ``X.scales`` float16 ``(groups, out)``; ``X.g_idx`` int32 ``(in,)`` = column // group size;
- ``X.bias`` as it is.

Zero convention: checkpoint format ``gptq`` (v1, the default, what most runtimes assume)
stores ``zero - 1`` and its readers add the 1 back; ``gptq_v2`` stores the zero itself. A v1
file cannot hold a zero of 0 (it would be written as ``2**bits - 1`` and read back as
``2**bits``: the classic "!!!!" output), so such a weight is refused with a pointer to
``gptq-v2``. A symmetric format is written as ``sym: true`` with its zero ``2**(bits-1)``.

``quantization_config`` (config.json) and ``quantize_config.json``: ``quant_method: gptq``,
``bits``, ``group_size`` (-1 per channel), ``desc_act: false``, ``sym``, ``checkpoint_format``.
lowbit's act-order GPTQ keeps groups contiguous (static groups), so ``g_idx`` is always the
trivial one and ``desc_act`` false: no permutation is needed at run time.

What the format cannot say is refused before anything is written: formats other than
INT2/3/4/8, a plan with more than one bit width / group size, a partial last group, a
packed dimension that is not a whole number of 32-bit words, linears inside the decoder
layers left unquantized (GPTQ loaders quantize every one of them), a quantized lm_head.

vLLM (not runnable here) was checked by reading ``vllm/model_executor/layers/quantization/gptq.py``:
the same four tensor names, int32 ``qweight`` with ``input_dim=0, packed_dim=0``, int32
``qzeros`` with ``packed_dim=1``, float16 ``scales`` ``(groups, out)``, int32 ``g_idx`` ``(in,)``;
``checkpoint_format == "gptq_v2"`` selects the v2 zeros (its PR 26092).
"""

from __future__ import annotations

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
from lowbit.export.repack import dense_linears, write_repacked
from lowbit.formats import Format
from lowbit.nn import QuantLinear, quantized_linears

BITS = (2, 3, 4, 8)
FORMATS = {"gptq": "gptq", "gptq-v2": "gptq_v2"}


def carries(fmt: Format) -> str | None:
    return int_format_reason(fmt, BITS)


def uniform_format(model: nn.Module, target: str) -> tuple[int, int | None, bool]:
    """``(bits, group_size, symmetric)`` shared by every quantized linear, after checking what a
    single-format runtime (GPTQ, AWQ) needs of the whole model; a LowbitError otherwise."""
    quantized = quantized_linears(model)
    layouts = {(m.format.bits, m.format.group_size) for m in quantized.values()}
    if len(layouts) > 1:
        raise LowbitError(
            f"{target} holds one bit width and group size per model; this plan mixes "
            f"{sorted(layouts, key=str)}: export it to compressed-tensors, which takes one per module"
        )
    dense = [name for name in dense_linears(model) if name != "lm_head" and not name.endswith(".lm_head")]
    if dense:
        raise LowbitError(
            f"{target} loaders quantize every linear of the decoder layers, but {dense[:3]} "
            f"({len(dense)} in all) stayed unquantized: export to compressed-tensors, which lists them as ignored"
        )
    for name, module in quantized.items():
        if name.split(".")[-1] == "lm_head":
            raise LowbitError(f"{target}: a quantized lm_head is not written; export to compressed-tensors instead")
        reason = partial_group_reason(module.format, module.in_features)
        if reason:
            raise LowbitError(f"{target} cannot carry {name}: {reason}")
    (bits, group_size), = layouts
    return bits, group_size, all(m.format.symmetric for m in quantized.values())


def _check_words(name: str, module: QuantLinear, bits: int) -> None:
    for what, size in (("input", module.in_features), ("output", module.out_features)):
        if size * bits % 32:
            raise LowbitError(f"gptq cannot carry {name}: its {size} {what} features are not whole 32-bit words of {bits}-bit codes")


def convert(module: QuantLinear, v2: bool) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one quantized linear (without the module name)."""
    weight = int_weight(module)
    zero = weight.zero.to(torch.int16)
    if not v2:
        if bool((zero == 0).any()):
            raise LowbitError(
                "a group has zero point 0, which GPTQ's v1 zero convention (zero - 1) cannot store; "
                "export with --to gptq-v2"
            )
        zero = zero - 1
    columns = torch.arange(module.in_features, dtype=torch.int32)
    return {
        "qweight": pack_int32(weight.codes, weight.bits).t().contiguous(),
        "qzeros": pack_int32(zero.t().contiguous().to(torch.uint8), weight.bits),
        "scales": weight.scale.t().contiguous(),
        "g_idx": columns // weight.group_size,
    }


def quantization_config(bits: int, group_size: int | None, symmetric: bool, checkpoint_format: str) -> dict:
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size or -1,
        "desc_act": False,
        "sym": symmetric,
        "lm_head": False,
        "true_sequential": True,
        "static_groups": False,
        "pack_dtype": "int32",
        "checkpoint_format": checkpoint_format,
        "meta": {"quantizer": ["lowbit"]},
    }


def writer(target: str):
    """The ``write`` of exporter ``target`` (``gptq`` or ``gptq-v2``)."""
    checkpoint_format = FORMATS[target]

    def write(model: nn.Module, path: str | os.PathLike, tokenizer, overwrite: bool) -> Path:
        bits, group_size, symmetric = uniform_format(model, target)
        for name, module in quantized_linears(model).items():
            _check_words(name, module, bits)
        config = quantization_config(bits, group_size, symmetric, checkpoint_format)

        def convert_module(name: str, module: QuantLinear) -> dict[str, torch.Tensor]:
            try:
                return convert(module, checkpoint_format == "gptq_v2")
            except LowbitError as error:
                raise LowbitError(f"{target} cannot carry {name}: {error}") from None

        return write_repacked(
            model, path, tokenizer, overwrite, target=target, quantization_config=config,
            convert=convert_module, extra_files={"quantize_config.json": config},
        )  # fmt: skip

    return write
