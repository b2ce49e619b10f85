"""QTensor: a quantized weight as stored — packed codes, scales, zeros — plus its format.

A QTensor is plain data. Its ``parts`` are the tensors a format stores (for example
``packed``, ``scale`` and ``zero`` for the integer formats); their names are what the
native checkpoint writes, so the bytes counted by :attr:`QTensor.nbytes` are the bytes on
disk. Meaning lives in the format object it holds: ``qtensor.dequantize()`` asks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lowbit.formats.base import Format


@dataclass
class QTensor:
    format: Format
    shape: tuple[int, int]
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.format, str):
            raise TypeError(f"QTensor takes a Format object (get_format({self.format!r})), not a format name")

    @property
    def format_name(self) -> str:
        return self.format.name

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.format.dequantize(self, dtype)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of every stored part: what a checkpoint holds for this weight."""
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.numel

    @property
    def device(self) -> torch.device:
        return next(iter(self.parts.values())).device

    def to(self, device: torch.device | str) -> QTensor:
        return QTensor(self.format, self.shape, {k: v.to(device) for k, v in self.parts.items()})

    def __repr__(self) -> str:
        return (
            f"QTensor({self.format_name}, shape={self.shape}, "
            f"{self.nbytes} bytes, {self.bits_per_weight:.4f} bits/weight)"
        )
