"""llama.cpp's tensor types as lowbit formats: ``gguf-q8_0``, ``gguf-q4_k``, ``gguf-iq4_xs`` ….

Names are ``gguf-`` and the ggml type in lower case (``gguf-q4_0 gguf-q4_1 gguf-q5_0
gguf-q5_1 gguf-q8_0 gguf-q2_k gguf-q3_k gguf-q4_k gguf-q5_k gguf-q6_k gguf-iq4_nl
gguf-iq4_xs``, whichever :data:`BLOCK_TYPES` holds): no ``+`` or ``,``, so they read the same
in a plan file and on the command line.

The one stored part, ``blocks``, is uint8 ``(rows, bytes_per_row)`` and holds exactly the
``block_*`` structs llama.cpp writes for the rows, in order: a GGUF writer copies it into the
file and a GGUF reader wraps a tensor's bytes as a QTensor without conversion. Rows must be
a multiple of the type's block (:class:`BlockShapeError` otherwise, a LowbitError and a
ValueError naming llama.cpp's fallback type; choosing that type for such rows is the GGUF
mix's job, ``gguf_types.TENSOR_TYPE_FALLBACK``).

``quantize(w, importance=)`` writes the bytes llama.cpp's own quantizer writes
(``quantize_row_*_ref`` without importance, ``quantize_*`` with an imatrix), bit for bit:
each type's arithmetic is restated in ``gguf_numerics.py``. ``choose_params`` returns the
stored fields (:class:`GGUFParams`); ``encode`` rounds each weight to the nearest code under
them, which is what llama.cpp itself does in its final pass for the K types, while its search
keeps its own codes in a few cases (the legacy types round with the unrounded ``1/d``; a
sub-block whose stored scale is zero keeps the search's codes), so ``quantize`` is the
composed path that reproduces llama.cpp and ``encode``/``decode`` serve GPTQ. Both are
elementwise once each column has its sub-block's scale, so ``columns`` may be any slice (GPTQ
rounds one column at a time with params chosen for the whole matrix).

``quantize_ggml`` / ``dequantize_ggml`` do the same for any 2-D tensor (embeddings) by ggml
type name, for the GGUF writer and reader.

Everything runs on the weight's device. On a GPU the arithmetic is the same IEEE float32 (one
kernel per operation leaves no room for fused multiply-adds; divisions by constants are
tensor by tensor, ``gguf_numerics.quotient``): on an H100 every type writes the CPU's bytes,
which are llama.cpp's (``tests/test_gguf_gpu.py``, run there).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.formats.base import (
    Format,
    ScaleGroups,
    check_finite,
    check_matrix,
    column_range,
)
from lowbit.formats.gguf_block import BlockType, Fields
from lowbit.formats.gguf_iq import IQ_TYPES
from lowbit.formats.gguf_kquants import K_TYPES
from lowbit.formats.gguf_legacy import LEGACY_TYPES
from lowbit.formats.gguf_types import GGML_TYPES, TENSOR_TYPE_FALLBACK
from lowbit.qtensor import QTensor

#: every block type lowbit quantizes, by ggml type name
BLOCK_TYPES: dict[str, BlockType] = {block.name: block for block in (*LEGACY_TYPES, *K_TYPES, *IQ_TYPES)}

NAME_PATTERN = re.compile(r"^gguf-([a-z0-9_]+)$")


@dataclass(frozen=True, eq=False)
class GGUFParams:
    """The stored fields of every block, each ``(rows, blocks_per_row, ...)`` in its C type."""

    fields: Fields


def block_type(type_name: str) -> BlockType:
    """The block type called ``type_name`` (``"Q4_K"``, any case); ValueError if lowbit has none."""
    found = BLOCK_TYPES.get(type_name.upper())
    if found is None:
        raise ValueError(f"no GGUF block type {type_name!r}; lowbit quantizes {', '.join(BLOCK_TYPES)}")
    return found


class BlockShapeError(LowbitError, ValueError):
    """A row that is not a multiple of the type's block: the user's choice of format does not
    fit the model (a LowbitError, so the CLI prints it as one line)."""


def _blocks(block: BlockType, matrix: torch.Tensor) -> torch.Tensor:
    """``(rows, columns)`` -> float32 ``(rows, blocks, block_size)``, refusing partial blocks."""
    rows, columns = matrix.shape
    size = block.ggml.block_size
    if columns % size:
        fallback = TENSOR_TYPE_FALLBACK.get(block.name)
        usual = (
            f"; llama.cpp writes such a tensor as {fallback} (gguf-{fallback.lower()})"
            if fallback and columns % GGML_TYPES[fallback].block_size == 0
            else "; llama.cpp writes such a tensor as F16"
        )
        raise BlockShapeError(
            f"gguf-{block.name.lower()} stores rows in blocks of {size}: a row of {columns} weights "
            f"is not a multiple of it{usual}"
        )
    return matrix.float().reshape(rows, columns // size, size)


def _importance(block: BlockType, importance: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor | None:
    """The per-column importance, checked, as ``(blocks, block_size)`` on the weight's device."""
    columns = weight.shape[1]
    if importance is None:
        return None
    if tuple(importance.shape) != (columns,):
        raise ValueError(
            f"importance needs one weight per input column, shape ({columns},); got {tuple(importance.shape)}"
        )
    if not bool(torch.isfinite(importance).all()) or bool((importance < 0).any()):
        raise LowbitError("importance weights must be finite and non-negative")
    return importance.float().to(weight.device).reshape(-1, block.ggml.block_size)


#: weights quantized at once on a CPU: the searches run a few thousand tensor ops per chunk,
#: and a chunk this size keeps their operands in cache (2x faster than a 4096x4096 matrix at
#: once); elsewhere (a GPU) chunks only bound the temporaries (about 16 bytes a weight)
CHUNK_WEIGHTS = 1 << 18
CHUNK_WEIGHTS_ACCELERATOR = 1 << 26


def _quantize_blocks(block: BlockType, x: torch.Tensor, importance: torch.Tensor | None) -> tuple[Fields, torch.Tensor]:
    """``block.quantize`` over chunks of rows (every llama.cpp quantizer works row by row)."""
    chunk = CHUNK_WEIGHTS if x.device.type == "cpu" else CHUNK_WEIGHTS_ACCELERATOR
    step = max(1, chunk // (x.shape[1] * x.shape[2]))
    pieces = [block.quantize(x[start : start + step], importance) for start in range(0, x.shape[0], step)]
    if len(pieces) == 1:
        return pieces[0]
    fields = {name: torch.cat([piece[0][name] for piece in pieces]) for name in pieces[0][0]}
    return fields, torch.cat([piece[1] for piece in pieces])


def quantize_ggml(type_name: str, matrix: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """llama.cpp's bytes for ``matrix`` in type ``type_name``: uint8 ``(rows, bytes_per_row)``.

    ``importance`` (one non-negative weight per column, an imatrix entry) takes llama.cpp's
    ``quant_weights`` path; without it, the reference path ``llama-quantize`` takes.
    """
    block = block_type(type_name)
    check_matrix(matrix, block.name)
    check_finite(matrix, block.name)
    x = _blocks(block, matrix.detach())
    fields, codes = _quantize_blocks(block, x, _importance(block, importance, matrix))
    return block.to_bytes(codes, fields).reshape(matrix.shape[0], -1)


def dequantize_ggml(type_name: str, raw: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """float32 ``shape`` from the bytes of ``type_name`` blocks (``dequantize_row_*``)."""
    block = block_type(type_name)
    rows, columns = shape
    per_row = block.ggml.block_bytes * (columns // block.ggml.block_size)
    if columns % block.ggml.block_size or raw.numel() != rows * per_row or raw.dtype != torch.uint8:
        raise ValueError(
            f"{block.name} data for shape {tuple(shape)} is {rows * per_row} uint8 bytes in whole blocks; "
            f"got {raw.numel()} of {raw.dtype}"
        )
    fields, codes = block.from_bytes(raw.reshape(rows, -1, block.ggml.block_bytes))
    return block.decode(codes, fields).reshape(rows, columns)


@dataclass(frozen=True, repr=False)
class GGUFFormat(Format):
    """One llama.cpp block type as a format; ``type_name`` is the ggml name (``"q4_k"``)."""

    type_name: str
    family = "gguf"
    #: ``choose_params(w, importance=)`` takes llama.cpp's imatrix path (other families refuse it)
    supports_importance = True

    @property
    def name(self) -> str:
        return f"gguf-{self.type_name}"

    @property
    def block(self) -> BlockType:
        return block_type(self.type_name)

    def groups(self, shape: tuple[int, int]) -> ScaleGroups:
        return ScaleGroups(shape[0], shape[1], self.block.ggml.block_size)

    def storage_bytes(self, shape: tuple[int, int]) -> int:
        size = self.block.ggml
        if shape[1] % size.block_size:
            _blocks(self.block, torch.empty(shape, device="meta"))
        return shape[0] * shape[1] // size.block_size * size.block_bytes

    def choose_params(
        self,
        weight: torch.Tensor,
        *,
        clip: torch.Tensor | None = None,
        importance: torch.Tensor | None = None,
    ) -> GGUFParams:
        return self._quantize(weight, clip, importance)[0]

    def quantize(
        self,
        weight: torch.Tensor,
        *,
        clip: torch.Tensor | None = None,
        importance: torch.Tensor | None = None,
    ) -> QTensor:
        """llama.cpp's own bytes (its codes, which :meth:`encode` does not always reproduce)."""
        params, codes = self._quantize(weight, clip, importance)
        return QTensor(self, (weight.shape[0], weight.shape[1]), self.pack(codes, params))

    def _quantize(
        self,
        weight: torch.Tensor,
        clip: torch.Tensor | None,
        importance: torch.Tensor | None,
    ) -> tuple[GGUFParams, torch.Tensor]:
        check_matrix(weight, self.name)
        check_finite(weight, self.name)
        if clip is not None:
            raise ValueError(f"{self.name} chooses its scales by llama.cpp's own search; it has no clipping search")
        block = self.block
        x = _blocks(block, weight)
        if weight.is_meta:
            raw = torch.empty(
                (weight.shape[0], x.shape[1], block.ggml.block_bytes),
                dtype=torch.uint8,
                device="meta",
            )
            fields, codes = block.from_bytes(raw)
        else:
            fields, codes = _quantize_blocks(block, x, _importance(block, importance, weight))
        return GGUFParams(fields), codes.reshape(weight.shape[0], -1)

    def _column_grid(self, params: GGUFParams, span: range) -> list[torch.Tensor]:
        """The grid values of every column of ``span``, ``(rows, len(span))`` each."""
        block = self.block
        index = torch.arange(span.start, span.stop) // block.sub
        flat = [g.reshape(g.shape[0], -1) for g in block.grid(params.fields)]
        return [g.index_select(1, index.to(g.device)) for g in flat]

    def _whole_blocks(self, span: range) -> slice | None:
        size = self.block.ggml.block_size
        return slice(span.start // size, span.stop // size) if span.start % size == span.stop % size == 0 else None

    def encode(self, weight: torch.Tensor, params: GGUFParams, columns: slice | None = None) -> torch.Tensor:
        check_matrix(weight, self.name)
        span = column_range(columns, weight.shape[1])
        block, blocks = self.block, self._whole_blocks(span)
        if blocks is not None:
            fields = {k: v[:, blocks] for k, v in params.fields.items()}
            return block.encode(_blocks(block, weight), fields).reshape(weight.shape)
        return block.encode_values(weight.float(), *self._column_grid(params, span))

    def decode(
        self, codes: torch.Tensor, params: GGUFParams, columns: slice | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        span = column_range(columns, codes.shape[1])
        block, blocks = self.block, self._whole_blocks(span)
        if blocks is not None:
            fields = {k: v[:, blocks] for k, v in params.fields.items()}
            x = codes.reshape(codes.shape[0], -1, block.ggml.block_size)
            return block.decode(x, fields).reshape(codes.shape).to(dtype)
        return block.decode_values(codes, *self._column_grid(params, span)).to(dtype)

    def pack(self, codes: torch.Tensor, params: GGUFParams) -> dict[str, torch.Tensor]:
        block = self.block
        x = codes.reshape(codes.shape[0], -1, block.ggml.block_size)
        return {"blocks": block.to_bytes(x, params.fields).reshape(codes.shape[0], -1)}

    def unpack(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> tuple[torch.Tensor, GGUFParams]:
        block = self.block
        raw = parts["blocks"].reshape(shape[0], -1, block.ggml.block_bytes)
        fields, codes = block.from_bytes(raw)
        return codes.reshape(shape[0], -1), GGUFParams(fields)


def parse(name: str) -> GGUFFormat | None:
    """``gguf-<type>`` (lower case) for every type in :data:`BLOCK_TYPES`; None for any other
    name (``get_format`` then lists the whole grammar, these names included)."""
    match = NAME_PATTERN.match(name)
    if match is None or match.group(1).upper() not in BLOCK_TYPES:
        return None
    return GGUFFormat(match.group(1))
