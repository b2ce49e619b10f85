"""FP8 weights: E4M3 (max 448) and E5M2 (max 57344) with a float32 scale per channel or tensor.

Names: ``fp8`` (= ``fp8-e4m3``, per channel), ``fp8-e5m2``, and ``-tensor`` for one scale
per tensor (``fp8-e4m3-tensor``). E4M3 here is the ``fn`` variant used by every runtime
(no infinities, one NaN pattern), which is torch's ``float8_e4m3fn``.

``scale = max|w| / fp8_max``; ``w / scale`` is clamped to the finite range and rounded to
nearest-even by the cast; ``w' = fp8 * scale``. Parts: ``data`` uint8 ``(out, in)`` (the raw
fp8 bit patterns, which are the codes) and ``scale`` float32 ``(out, 1)`` or ``(1, 1)``
(the params, :class:`FP8Params`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lowbit.formats.base import (
    Format,
    ScaleGroups,
    check_choice,
    check_matrix,
    clipped_absmax,
    safe_divisor,
)

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
NAME_PATTERN = re.compile(r"^fp8(?:-(e4m3|e5m2))?(-tensor|-ch)?$")


@dataclass(frozen=True, eq=False)
class FP8Params:
    """``scale``: float32 ``(out, 1)`` per channel or ``(1, 1)`` per tensor, as stored."""

    scale: torch.Tensor


@dataclass(frozen=True, repr=False)
class FP8Format(Format):
    variant: str = "e4m3"
    per_tensor: bool = False
    family = "fp8"
    supports_clip = True

    @property
    def name(self) -> str:
        return "fp8" + ("" if self.variant == "e4m3" else f"-{self.variant}") + ("-tensor" if self.per_tensor else "")

    @property
    def dtype(self) -> torch.dtype:
        return FP8_DTYPES[self.variant]

    def groups(self, shape: tuple[int, int]) -> ScaleGroups:
        return ScaleGroups(shape[0], shape[1], shape[1], self.per_tensor)

    def storage_bytes(self, shape: tuple[int, int]) -> int:
        scales = 1 if self.per_tensor else shape[0]
        return shape[0] * shape[1] + 4 * scales

    def choose_params(
        self, weight: torch.Tensor, *, clip: torch.Tensor | None = None, importance: torch.Tensor | None = None
    ) -> FP8Params:
        check_choice(weight, self.name, importance)
        groups = self.groups((weight.shape[0], weight.shape[1]))
        absmax = clipped_absmax(weight, groups, clip)
        return FP8Params(absmax / torch.finfo(self.dtype).max)

    def encode(self, weight: torch.Tensor, params: FP8Params, columns: slice | None = None) -> torch.Tensor:
        # one scale spans every column of a row (or of the tensor): columns change nothing
        check_matrix(weight, self.name)
        limit = torch.finfo(self.dtype).max
        values = (weight.float() / safe_divisor(params.scale)).clamp(-limit, limit)
        return values.to(self.dtype).view(torch.uint8)

    def decode(
        self, codes: torch.Tensor, params: FP8Params, columns: slice | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        return (codes.view(self.dtype).float() * params.scale).to(dtype)

    def pack(self, codes: torch.Tensor, params: FP8Params) -> dict[str, torch.Tensor]:
        return {"data": codes, "scale": params.scale}

    def unpack(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> tuple[torch.Tensor, FP8Params]:
        return parts["data"], FP8Params(parts["scale"])


def parse(name: str) -> FP8Format | None:
    match = NAME_PATTERN.match(name)
    if not match:
        return None
    return FP8Format(match.group(1) or "e4m3", match.group(2) == "-tensor")
