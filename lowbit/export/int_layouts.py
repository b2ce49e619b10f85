"""Integer weights in the terms every integer runtime uses, and their int32 packings.

GPTQ, AWQ and compressed-tensors all store an integer weight as unsigned codes ``q``, a
float scale and an integer zero point per group of input features, dequantized as
``(q - zero) * scale``; they differ only in which dimension the codes are packed along,
in what order they sit inside each 32-bit word, and in how the zero is written. lowbit's
:class:`~lowbit.formats.integer.IntegerFormat` is the same arithmetic (asymmetric: integer
zero in ``0 .. 2**bits-1``; symmetric: offset-binary codes, i.e. zero ``2**(bits-1)``), with
float16 scales. So :func:`int_weight` reads a QuantLinear once into codes / scale / zero, and
each exporter only repacks them: the exported weights dequantize to exactly lowbit's.

Packing (:func:`pack_int32`): the codes of a row form one bit stream, code ``i`` at bits
``i*bits ..`` (least significant first), cut into little-endian 32-bit words. That is the
stream lowbit's own :func:`~lowbit.formats.packing.pack` writes into bytes, so it is
reused and the bytes are read as int32; for 2, 4 and 8 bits it is GPTQ's and
compressed-tensors' layout, and for 3 bits compressed-tensors' and GPTQ's straddling words.
AWQ interleaves the eight 4-bit codes of a word (``AWQ_ORDER``) before packing.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.formats import Format
from lowbit.formats.integer import IntegerFormat
from lowbit.formats.packing import pack, unpack

#: AWQ's GEMM layout: slot ``i`` of each 32-bit word holds code ``AWQ_ORDER[i]`` of its eight
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass(frozen=True, eq=False)
class IntWeight:
    """One integer weight, as runtimes see it: ``w = (codes - zero) * scale`` per group.

    ``codes``: uint8 ``(out, in)``; ``scale``: float16 ``(out, groups)``; ``zero``: uint8
    ``(out, groups)`` (``2**(bits-1)`` everywhere for a symmetric format); ``group_size``:
    the columns of a group (``in`` for one group per row).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """float32 ``(out, in)``: what every runtime computes from these parts (the oracle of tests)."""
        index = torch.arange(self.shape[1]) // self.group_size
        zero = self.zero.float().index_select(1, index)
        return (self.codes.float() - zero) * self.scale.float().index_select(1, index)


def int_weight(module) -> IntWeight:
    """A QuantLinear of an integer format as codes / scale / zero (per tensor becomes per channel,
    which is exact: every row repeats the one scale)."""
    fmt = module.format
    if not isinstance(fmt, IntegerFormat):
        raise LowbitError(f"{fmt.name} is not an integer format")
    codes, params = fmt.unpack(module.qtensor.parts, (module.out_features, module.in_features))
    rows = module.out_features
    scale = params.scale.to(torch.float16).expand(rows, -1).contiguous()
    if fmt.symmetric:
        zero = torch.full_like(scale, fmt.half, dtype=torch.uint8)
    else:
        zero = params.zero.to(torch.uint8).expand(rows, -1).contiguous()
    return IntWeight(codes, scale, zero, fmt.bits, fmt.group_size or module.in_features, fmt.symmetric)


def int_format_reason(fmt: Format, bits: tuple[int, ...], *, channel: bool = True, tensor: bool = True) -> str | None:
    """None when ``fmt`` is an integer format of one of ``bits`` whose grouping a target takes, else why not."""
    if not isinstance(fmt, IntegerFormat):
        return "it stores integer weights only"
    if fmt.bits not in bits:
        return f"its runtimes run {', '.join(map(str, bits))}-bit weights, not {fmt.bits}-bit"
    if fmt.per_tensor and not tensor:
        return "it has no per-tensor scales"
    if fmt.group_size is None and not fmt.per_tensor and not channel:
        return "it needs a group size (no per-channel scales)"
    return None


def partial_group_reason(fmt: IntegerFormat, in_features: int) -> str | None:
    """Why a weight of ``in_features`` columns has a partial last group, or None."""
    if fmt.group_size is not None and in_features % fmt.group_size:
        return (
            f"{in_features} input features are not a whole number of groups of {fmt.group_size} "
            "(a partial last group, which the runtime cannot read)"
        )
    return None


def _as_int32(data: torch.Tensor) -> torch.Tensor:
    """uint8 rows whose length is a multiple of 4 -> little-endian int32 words."""
    words = data.contiguous().reshape(-1).view(torch.int32).reshape(*data.shape[:-1], -1)
    if sys.byteorder == "big":  # the stream is little-endian by definition
        words = words.view(torch.uint8).reshape(*words.shape, 4).flip(-1).contiguous().view(torch.int32).squeeze(-1)
    return words


def _as_bytes(words: torch.Tensor) -> torch.Tensor:
    data = words.contiguous().view(torch.uint8)
    if sys.byteorder == "big":
        data = data.reshape(*words.shape, 4).flip(-1).reshape(*words.shape[:-1], -1)
    return data


def _interleave(codes: torch.Tensor, order: tuple[int, ...] | None, inverse: bool = False) -> torch.Tensor:
    if order is None:
        return codes
    width = len(order)
    if codes.shape[-1] % width:
        raise LowbitError(f"{codes.shape[-1]} codes are not a whole number of words of {width}")
    index = torch.tensor(order)
    if inverse:
        index = torch.argsort(index)
    lead = codes.shape[:-1]
    return codes.reshape(*lead, -1, width)[..., index].reshape(*lead, -1)


def pack_int32(codes: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """uint8 codes ``(rows, n)`` -> int32 ``(rows, ceil(n*bits/32))``: one LSB-first bit stream per
    row, zero-padded to whole words; ``order`` permutes each word's codes first (AWQ)."""
    data = pack(_interleave(codes, order), bits)
    padding = -data.shape[-1] % 4
    if padding:
        data = torch.nn.functional.pad(data, (0, padding))
    return _as_int32(data)


def unpack_int32(words: torch.Tensor, bits: int, n: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 ``(rows, words)`` -> uint8 codes ``(rows, n)``."""
    if words.dtype != torch.int32:
        raise LowbitError(f"packed weights must be int32, got {words.dtype}")
    needed = (n * bits + 31) // 32
    if words.shape[-1] != needed:
        raise LowbitError(f"{words.shape[-1]} int32 words cannot hold {n} codes of {bits} bits (that takes {needed})")
    data = _as_bytes(words)[..., : (n * bits + 7) // 8]
    return _interleave(unpack(data, bits, n), order, inverse=True)
