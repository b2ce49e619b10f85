"""What every weight format provides, and the grouping helper most of them share.

A *format* is a pure description of how a float weight matrix becomes bytes and back:
``quantize`` returns a :class:`~lowbit.qtensor.QTensor`, ``dequantize`` inverts it, and
``storage_bytes`` says, from the shape alone, exactly how many bytes the QTensor will hold
(codes, scales and zero points together). ``bits_per_weight`` is derived from that, so a
size printed anywhere in lowbit is the size of the bytes that are really stored.

Weights are 2-D: rows are output features, columns are input features, and groups of
columns share a scale. When a row is not a multiple of the group size, its last group is
partial and has a scale of its own (as GPTQ does).

Formats that can shrink their range for a clipping search (see ``algorithms/rtn.py``)
accept ``clip_ratio``: one factor in (0, 1] per scale group, shaped ``clip_shape(shape)``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lowbit.qtensor import QTensor


@dataclass(frozen=True)
class Groups:
    """Columns of a ``rows x columns`` matrix cut into groups of ``size`` (last may be partial)."""

    columns: int
    size: int

    @property
    def count(self) -> int:
        return math.ceil(self.columns / self.size)

    @property
    def padding(self) -> int:
        return self.count * self.size - self.columns

    def split(self, matrix: torch.Tensor) -> torch.Tensor:
        """``(rows, columns)`` -> ``(rows, count, size)``, the partial group padded with zeros.

        Zero padding never changes a group's scale: every format here keeps zero
        representable and takes its range from ``max(|w|)`` or ``[min(w, 0), max(w, 0)]``.
        """
        if self.padding:
            matrix = torch.nn.functional.pad(matrix, (0, self.padding))
        return matrix.reshape(matrix.shape[0], self.count, self.size)

    def merge(self, grouped: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`split`: drop the padding again."""
        return grouped.reshape(grouped.shape[0], -1)[:, : self.columns]


def check_matrix(weight: torch.Tensor, format_name: str) -> None:
    if weight.dim() != 2:
        raise ValueError(f"{format_name} quantizes 2-D weights, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"{format_name} quantizes float weights, got {weight.dtype}")


def round_to_float16(values: torch.Tensor) -> torch.Tensor:
    """Round scales to what float16 storage keeps, saturating instead of overflowing."""
    finfo = torch.finfo(torch.float16)
    return values.clamp(-finfo.max, finfo.max).to(torch.float16).float()


def safe_divisor(scale: torch.Tensor) -> torch.Tensor:
    """A scale of zero only occurs for an all-zero group; dividing by one keeps its codes at zero."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


class Format(ABC):
    """A weight format: name, exact storage size, quantize and dequantize."""

    name: str
    #: formats whose range can be shrunk by a clipping search accept ``clip_ratio``
    supports_clip: bool = False

    @abstractmethod
    def quantize(self, weight: torch.Tensor, clip_ratio: torch.Tensor | None = None) -> QTensor:
        """Quantize a ``(out_features, in_features)`` float weight."""

    @abstractmethod
    def dequantize(self, qtensor: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight that ``qtensor`` stands for."""

    @abstractmethod
    def storage_bytes(self, shape: tuple[int, int]) -> int:
        """Exact bytes of every stored part (codes, scales, zeros) for a weight of ``shape``."""

    def part_layout(self, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every stored part, found by quantizing on the meta device."""
        parts = self.quantize(torch.zeros(shape, device="meta")).parts
        return {name: (tuple(t.shape), t.dtype) for name, t in parts.items()}

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        return 8 * self.storage_bytes(shape) / (shape[0] * shape[1])

    def clip_shape(self, shape: tuple[int, int]) -> tuple[int, ...]:
        """Shape of ``clip_ratio``: one factor per scale group."""
        raise NotImplementedError(f"{self.name} has no clipping search")

    def group_error(self, squared_error: torch.Tensor) -> torch.Tensor:
        """Sum a ``(out, in)`` error over each scale group, shaped like :meth:`clip_shape`."""
        raise NotImplementedError(f"{self.name} has no clipping search")

    @property
    def search_format(self) -> Format:
        """The format a clipping search scores candidates with: itself, unless its scales are
        coupled across groups (NF4's double quantization), where groups could not be chosen
        one by one."""
        return self

    def __repr__(self) -> str:
        return f"<format {self.name}>"
