"""Integer formats INT2..INT8: symmetric or asymmetric, per tensor, per channel or per group.

Names: ``int{bits}[-sym|-asym][-g{size}|-ch|-tensor]``. Defaults: ``int8`` is symmetric per
channel (the usual weight-only INT8); ``int2``..``int7`` are asymmetric, per channel unless
a group size is given. Examples: ``int8``, ``int4-g128`` (asymmetric, as GPTQ stores it),
``int4-sym-g128``, ``int3-g128``, ``int2-g64``, ``int8-tensor``.

Canonical layout (one QTensor, parts):

- ``packed``: uint8 ``(out, ceil(in*bits/8))``, one unsigned code per weight, packed
  least-significant bits first along the input features (``formats/packing.py``).
  Symmetric codes are stored with an offset of ``2**(bits-1)`` (offset binary).
- ``scale``: float16 ``(out, groups)`` (``(1, 1)`` per tensor).
- ``zero`` (asymmetric only): the integer zero point of each group, packed at ``bits`` bits
  like the codes, ``(out, ceil(groups*bits/8))``.

Arithmetic. Asymmetric: the range ``[min(w, 0), max(w, 0)]`` (times the clip ratio) maps onto
codes ``0 .. 2**bits - 1``; ``scale = (hi - lo) / (2**bits - 1)``, ``zero = round(-lo / scale)``,
``q = clamp(round(w / scale) + zero)``, ``w' = (q - zero) * scale``. Symmetric:
``scale = max|w| / (2**(bits-1) - 1)``, ``q = clamp(round(w / scale), -2**(bits-1), 2**(bits-1) - 1)``,
``w' = q * scale``. Scales are rounded to float16 *before* the codes are computed, so the
codes are the best ones for the scale that is actually stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lowbit.formats.base import Format, Groups, check_matrix, round_to_float16, safe_divisor
from lowbit.formats.packing import pack, packed_bytes, unpack
from lowbit.qtensor import QTensor

MAX_GROUP_SIZE = 65536
NAME_PATTERN = re.compile(r"^int([2-8])(?:-(sym|asym))?(?:-(?:g(\d+)|(ch)|(tensor)))?$")


@dataclass(frozen=True, repr=False)
class IntegerFormat(Format):
    bits: int
    symmetric: bool
    group_size: int | None  # None: one group per row (per channel) or per tensor
    per_tensor: bool = False
    supports_clip = True

    @property
    def name(self) -> str:
        default_sym = self.bits == 8
        parts = [f"int{self.bits}"]
        if self.symmetric != default_sym:
            parts.append("sym" if self.symmetric else "asym")
        if self.per_tensor:
            parts.append("tensor")
        elif self.group_size is not None:
            parts.append(f"g{self.group_size}")
        return "-".join(parts)

    # -- layout -----------------------------------------------------------------------
    def _groups(self, shape: tuple[int, int]) -> Groups:
        columns = shape[1]
        if self.per_tensor or self.group_size is None:
            return Groups(columns, columns)
        return Groups(columns, self.group_size)

    def _scale_rows(self, shape: tuple[int, int]) -> int:
        return 1 if self.per_tensor else shape[0]

    def storage_bytes(self, shape: tuple[int, int]) -> int:
        rows, columns = shape
        groups = 1 if self.per_tensor else self._groups(shape).count
        scale_rows = self._scale_rows(shape)
        total = rows * packed_bytes(columns, self.bits) + scale_rows * groups * 2
        if not self.symmetric:
            total += scale_rows * packed_bytes(groups, self.bits)
        return total

    def clip_shape(self, shape: tuple[int, int]) -> tuple[int, ...]:
        if self.per_tensor:
            return (1, 1)
        return (shape[0], self._groups(shape).count)

    def group_error(self, squared_error: torch.Tensor) -> torch.Tensor:
        if self.per_tensor:
            return squared_error.sum().reshape(1, 1)
        return self._groups(tuple(squared_error.shape)).split(squared_error).sum(-1)

    # -- arithmetic -------------------------------------------------------------------
    def _grouped(self, weight: torch.Tensor) -> torch.Tensor:
        """``(rows, groups, size)`` view; per tensor is one row holding one group."""
        if self.per_tensor:
            return weight.reshape(1, 1, -1)
        return self._groups(tuple(weight.shape)).split(weight)

    def quantize(self, weight: torch.Tensor, clip_ratio: torch.Tensor | None = None) -> QTensor:
        check_matrix(weight, self.name)
        shape = (weight.shape[0], weight.shape[1])
        grouped = self._grouped(weight.float())
        ratio = None if clip_ratio is None else clip_ratio.to(grouped.device).float()
        levels = 2**self.bits - 1
        if self.symmetric:
            half = 2 ** (self.bits - 1)
            absmax = grouped.abs().amax(-1)
            if ratio is not None:
                absmax = absmax * ratio
            scale = round_to_float16(absmax / (half - 1))
            codes = torch.round(grouped / safe_divisor(scale).unsqueeze(-1)).clamp(-half, half - 1) + half
            zero = None
        else:
            lo = grouped.amin(-1).clamp(max=0)
            hi = grouped.amax(-1).clamp(min=0)
            if ratio is not None:
                lo, hi = lo * ratio, hi * ratio
            scale = round_to_float16((hi - lo) / levels)
            divisor = safe_divisor(scale)
            zero = torch.round(-lo / divisor).clamp(0, levels)
            codes = (torch.round(grouped / divisor.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, levels)
        codes = codes.to(torch.uint8)
        codes = codes.reshape(1, -1)[:, : weight.numel()].reshape(shape) if self.per_tensor else (
            self._groups(shape).merge(codes)
        )
        parts = {"packed": pack(codes, self.bits), "scale": scale.to(torch.float16)}
        if zero is not None:
            parts["zero"] = pack(zero.to(torch.uint8), self.bits)
        return QTensor(self.name, shape, parts)

    def dequantize(self, qtensor: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape = qtensor.shape
        codes = unpack(qtensor.parts["packed"], self.bits, shape[1]).float()
        scale = qtensor.parts["scale"].float()
        if self.symmetric:
            offset = torch.full_like(scale, 2 ** (self.bits - 1))
        else:
            groups = scale.shape[1]
            offset = unpack(qtensor.parts["zero"], self.bits, groups).float()
        if self.per_tensor:
            return ((codes - offset) * scale).to(dtype)
        groups = self._groups(shape)
        grouped = groups.split(codes)
        weight = (grouped - offset.unsqueeze(-1)) * scale.unsqueeze(-1)
        return groups.merge(weight).to(dtype)


def parse(name: str) -> IntegerFormat | None:
    match = NAME_PATTERN.match(name)
    if not match:
        return None
    bits = int(match.group(1))
    symmetric = {"sym": True, "asym": False, None: bits == 8}[match.group(2)]
    group_size = int(match.group(3)) if match.group(3) else None
    if group_size is not None and not 1 <= group_size <= MAX_GROUP_SIZE:
        raise ValueError(
            f"group size must be between 1 and {MAX_GROUP_SIZE}, got {group_size} in {name!r}"
        )
    return IntegerFormat(bits, symmetric, group_size, per_tensor=bool(match.group(5)))
