"""Plain float storage (``fp32``, ``bf16``, ``fp16``): the baselines every table compares to.

A weight kept in one of these is a QTensor like any other, so sizes, checkpoints and
reports treat "no quantization at 16 bits" the same way as INT4. Part: ``data`` in that dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.base import Format, check_matrix
from lowbit.qtensor import QTensor

FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, repr=False)
class FloatFormat(Format):
    name: str

    @property
    def dtype(self) -> torch.dtype:
        return FLOAT_DTYPES[self.name]

    def storage_bytes(self, shape: tuple[int, int]) -> int:
        return shape[0] * shape[1] * torch.finfo(self.dtype).bits // 8

    def quantize(self, weight: torch.Tensor, clip_ratio: torch.Tensor | None = None) -> QTensor:
        check_matrix(weight, self.name)
        if clip_ratio is not None:
            raise ValueError(f"{self.name} stores floats as they are; it has no clipping search")
        return QTensor(self.name, (weight.shape[0], weight.shape[1]), {"data": weight.to(self.dtype, copy=True).contiguous()})

    def dequantize(self, qtensor: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return qtensor.parts["data"].to(dtype)


def parse(name: str) -> FloatFormat | None:
    return FloatFormat(name) if name in FLOAT_DTYPES else None
