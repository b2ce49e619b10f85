"""QTensor: a quantized weight as stored — packed codes, scales, zeros — plus its format.

A QTensor is plain data. Its ``parts`` are the tensors a format stores (for example
``packed``, ``scale`` and ``zero`` for the integer formats); their names are what the
native checkpoint writes, so the bytes counted by :attr:`QTensor.nbytes` are the bytes on
disk. Meaning lives in the format: ``qtensor.dequantize()`` asks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class QTensor:
    format_name: str
    shape: tuple[int, int]
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def format(self):
        from lowbit.formats import get_format

        return get_format(self.format_name)

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
        return QTensor(self.format_name, self.shape, {k: v.to(device) for k, v in self.parts.items()})

    def __repr__(self) -> str:
        return (
            f"QTensor({self.format_name}, shape={self.shape}, "
            f"{self.nbytes} bytes, {self.bits_per_weight:.4f} bits/weight)"
        )
