"""Plain float storage (``fp32``, ``bf16``, ``fp16``): the baselines every table compares to.

A weight kept in one of these is a QTensor like any other, so sizes, checkpoints and
reports treat "no quantization at 16 bits" the same way as INT4. Part: ``data`` in that dtype,
which is also the codes; there are no params (:class:`FloatParams`) and no scale groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.formats.base import Format, ScaleGroups, check_finite, check_matrix, refuse_importance

FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class FloatParams:
    """Floats stored as they are need no params."""


@dataclass(frozen=True, repr=False)
class FloatFormat(Format):
    name: str
    family = "float"

    @property
    def dtype(self) -> torch.dtype:
        return FLOAT_DTYPES[self.name]

    def groups(self, shape: tuple[int, int]) -> ScaleGroups:
        raise ValueError(f"{self.name} stores floats as they are; it has no scale groups")

    def storage_bytes(self, shape: tuple[int, int]) -> int:
        return shape[0] * shape[1] * torch.finfo(self.dtype).bits // 8

    def choose_params(
        self, weight: torch.Tensor, *, clip: torch.Tensor | None = None, importance: torch.Tensor | None = None
    ) -> FloatParams:
        check_matrix(weight, self.name)
        check_finite(weight, self.name)
        if clip is not None:
            raise ValueError(f"{self.name} stores floats as they are; it has no clipping search")
        refuse_importance(importance, self.name)
        return FloatParams()

    def encode(self, weight: torch.Tensor, params: FloatParams, columns: slice | None = None) -> torch.Tensor:
        check_matrix(weight, self.name)
        codes = weight.to(self.dtype, copy=True).contiguous()
        if not weight.is_meta and not torch.isfinite(codes).all() and torch.isfinite(weight).all():
            raise LowbitError(f"{self.name} cannot hold this weight: it has values beyond ±{torch.finfo(self.dtype).max:g}")
        return codes

    def decode(
        self, codes: torch.Tensor, params: FloatParams, columns: slice | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        return codes.to(dtype)

    def pack(self, codes: torch.Tensor, params: FloatParams) -> dict[str, torch.Tensor]:
        return {"data": codes}

    def unpack(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> tuple[torch.Tensor, FloatParams]:
        return parts["data"], FloatParams()


def parse(name: str) -> FloatFormat | None:
    return FloatFormat(name) if name in FLOAT_DTYPES else None
