"""One llama.cpp block type: quantize, encode, decode and its ``block_*`` struct bytes.

Every GGUF block format (``gguf_legacy.py``, ``gguf_kquants.py``, ``gguf_iq.py``) is a
:class:`BlockType` subclass registered in ``gguf_blocks.BLOCK_TYPES``. Its methods work on a
weight cut into blocks, ``(rows, blocks, block_size)`` float32, and on *fields*: a dict of
per-block tensors shaped ``(rows, blocks, ...)`` holding what the struct stores (float16 ``d``,
packed 6-bit scales …) in its C types. Codes are the unsigned integers the struct packs
(``L`` in the C code), uint8 ``(rows, blocks, block_size)``.

- ``quantize(x, importance)``: fields and codes exactly as llama.cpp's quantizer writes them
  (``quantize_row_*_ref`` without importance, ``quantize_*`` with ``quant_weights``);
- ``grid(fields)``: what every weight's value depends on, per sub-block of ``sub`` weights
  (a tuple of ``(rows, blocks, block_size // sub)`` float32 tensors: the sub-block's scale,
  its minimum …), so that ``encode_values`` (the nearest codes under stored fields: what
  GPTQ needs, one column at a time) and ``decode_values`` (``dequantize_row_*``, bit-exact)
  are elementwise and work on any column, broadcasting the grid;
- ``to_bytes`` / ``from_bytes``: codes and fields <-> the struct bytes, ``(rows, blocks, block_bytes)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from lowbit.formats.gguf_types import GGML_TYPES, GgmlType

Fields = dict[str, torch.Tensor]
Grid = tuple[torch.Tensor, ...]


class BlockType(ABC):
    """A ggml block type; ``name`` is its ``GGML_TYPES`` key (``"Q4_K"``), ``sub`` the number
    of consecutive weights that share a scale (the block, or a K-quant's sub-block)."""

    name: str
    sub: int

    @property
    def ggml(self) -> GgmlType:
        return GGML_TYPES[self.name]

    @abstractmethod
    def quantize(self, x: torch.Tensor, importance: torch.Tensor | None) -> tuple[Fields, torch.Tensor]:
        """llama.cpp's fields and codes for ``x`` ``(rows, blocks, block_size)``; ``importance``
        ``(blocks, block_size)`` is the same for every row (the imatrix of the input columns)."""

    @abstractmethod
    def grid(self, fields: Fields) -> Grid:
        """Per sub-block, what :meth:`encode_values` and :meth:`decode_values` need."""

    @abstractmethod
    def encode_values(self, x: torch.Tensor, *grid: torch.Tensor) -> torch.Tensor:
        """The nearest codes (uint8) of weights ``x`` under the grid values broadcast to them."""

    @abstractmethod
    def decode_values(self, codes: torch.Tensor, *grid: torch.Tensor) -> torch.Tensor:
        """What ``dequantize_row_*`` computes for ``codes``, elementwise."""

    @abstractmethod
    def to_bytes(self, codes: torch.Tensor, fields: Fields) -> torch.Tensor:
        """The ``block_*`` structs, uint8 ``(rows, blocks, block_bytes)``."""

    @abstractmethod
    def from_bytes(self, raw: torch.Tensor) -> tuple[Fields, torch.Tensor]:
        """Inverse of :meth:`to_bytes`: fields and codes."""

    def _by_sub(self, values: torch.Tensor) -> torch.Tensor:
        """``(rows, blocks, block_size)`` -> ``(rows, blocks, subs, sub)``."""
        return values.reshape(*values.shape[:-1], -1, self.sub)

    def encode(self, x: torch.Tensor, fields: Fields) -> torch.Tensor:
        """:meth:`encode_values` of whole blocks ``(rows, blocks, block_size)``."""
        grid = [g.unsqueeze(-1) for g in self.grid(fields)]
        return self.encode_values(self._by_sub(x), *grid).reshape(x.shape)

    def decode(self, codes: torch.Tensor, fields: Fields) -> torch.Tensor:
        """:meth:`decode_values` of whole blocks: ``dequantize_row_*``."""
        grid = [g.unsqueeze(-1) for g in self.grid(fields)]
        return self.decode_values(self._by_sub(codes), *grid).reshape(codes.shape)


def or_reduce(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Bitwise OR of the slices along ``dim``: fields shifted into disjoint bits of one byte or
    word (a chain of ORs; torch's integer sums over an inner dimension are many times slower)."""
    parts = values.unbind(dim)
    out = parts[0].clone()
    for part in parts[1:]:
        out |= part
    return out


def half_bytes(value: torch.Tensor) -> torch.Tensor:
    """A float16 field ``(rows, blocks)`` as its two little-endian bytes ``(rows, blocks, 2)``."""
    return value.to(torch.float16).contiguous().unsqueeze(-1).view(torch.uint8)


def half_from(raw: torch.Tensor, offset: int) -> torch.Tensor:
    """The float16 field stored at byte ``offset`` of each block."""
    return raw[..., offset : offset + 2].contiguous().view(torch.float16).squeeze(-1)


def u32_bytes(value: torch.Tensor) -> torch.Tensor:
    """An unsigned 32-bit field (held in int64) as four little-endian bytes."""
    shifts = torch.arange(0, 32, 8, device=value.device)
    return ((value.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8)


def u32_from(raw: torch.Tensor) -> torch.Tensor:
    """Four little-endian bytes -> the unsigned value (int64)."""
    shifts = torch.arange(0, 32, 8, device=raw.device)
    return or_reduce(raw.long() << shifts, -1)


def nibbles(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``low | high << 4`` of two code tensors of the same shape, as bytes."""
    return ((low.long() & 0xF) | ((high.long() & 0xF) << 4)).to(torch.uint8)


def split_nibbles(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return packed & 0xF, packed >> 4


def high_bits_u32(codes: torch.Tensor, bit: int) -> torch.Tensor:
    """``qh |= ((L[j] >> bit) & 1) << j`` over the 32 codes of a block (Q5_0 / Q5_1)."""
    flags = ((codes.long() >> bit) & 1) << torch.arange(codes.shape[-1], device=codes.device)
    return or_reduce(flags, -1)


def row_importance(importance: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """``(blocks, block_size)`` importance broadcast to every row ``(rows, blocks, block_size)``."""
    return None if importance is None else importance.float().unsqueeze(0).expand(rows, -1, -1)
