"""FP8 weights: E4M3 (max 448) and E5M2 (max 57344) with a float32 scale per channel or tensor.

Names: ``fp8`` (= ``fp8-e4m3``, per channel), ``fp8-e5m2``, and ``-tensor`` for one scale
per tensor (``fp8-e4m3-tensor``). E4M3 here is the ``fn`` variant used by every runtime
(no infinities, one NaN pattern), which is torch's ``float8_e4m3fn``.

``scale = max|w| / fp8_max``; ``w / scale`` is clamped to the finite range and rounded to
nearest-even by the cast; ``w' = fp8 * scale``. Parts: ``data`` uint8 ``(out, in)`` (the raw
fp8 bit patterns) and ``scale`` float32 ``(out, 1)`` or ``(1, 1)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lowbit.formats.base import Format, check_matrix, safe_divisor
from lowbit.qtensor import QTensor

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
NAME_PATTERN = re.compile(r"^fp8(?:-(e4m3|e5m2))?(-tensor|-ch)?$")


@dataclass(frozen=True, repr=False)
class FP8Format(Format):
    variant: str = "e4m3"
    per_tensor: bool = False
    supports_clip = True

    @property
    def name(self) -> str:
        return "fp8" + ("" if self.variant == "e4m3" else f"-{self.variant}") + ("-tensor" if self.per_tensor else "")

    @property
    def dtype(self) -> torch.dtype:
        return FP8_DTYPES[self.variant]

    def storage_bytes(self, shape: tuple[int, int]) -> int:
        scales = 1 if self.per_tensor else shape[0]
        return shape[0] * shape[1] + 4 * scales

    def clip_shape(self, shape: tuple[int, int]) -> tuple[int, ...]:
        return (1, 1) if self.per_tensor else (shape[0], 1)

    def group_error(self, squared_error: torch.Tensor) -> torch.Tensor:
        if self.per_tensor:
            return squared_error.sum().reshape(1, 1)
        return squared_error.sum(-1, keepdim=True)

    def quantize(self, weight: torch.Tensor, clip_ratio: torch.Tensor | None = None) -> QTensor:
        check_matrix(weight, self.name)
        w = weight.float()
        absmax = w.abs().amax().reshape(1, 1) if self.per_tensor else w.abs().amax(-1, keepdim=True)
        if clip_ratio is not None:
            absmax = absmax * clip_ratio.to(absmax.device).float()
        limit = torch.finfo(self.dtype).max
        scale = absmax / limit
        values = (w / safe_divisor(scale)).clamp(-limit, limit).to(self.dtype)
        return QTensor(self.name, tuple(w.shape), {"data": values.view(torch.uint8), "scale": scale})

    def dequantize(self, qtensor: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        values = qtensor.parts["data"].view(self.dtype).float()
        return (values * qtensor.parts["scale"]).to(dtype)


def parse(name: str) -> FP8Format | None:
    match = NAME_PATTERN.match(name)
    if not match:
        return None
    return FP8Format(match.group(1) or "e4m3", match.group(2) == "-tensor")
