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

Arithmetic. Asymmetric: the range ``[min(w, 0), max(w, 0)]`` (times the clip factor) maps onto
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

from lowbit.formats.base import (
    Format,
    ScaleGroups,
    check_choice,
    check_matrix,
    clip_factors,
    column_range,
    round_to_float16,
    safe_divisor,
)
from lowbit.formats.packing import pack, packed_bytes, unpack

MAX_GROUP_SIZE = 65536
NAME_PATTERN = re.compile(r"^int([2-8])(?:-(sym|asym))?(?:-(?:g(\d+)|(ch)|(tensor)))?$")


@dataclass(frozen=True, eq=False)
class IntegerParams:
    """``scale``: float32 ``groups(shape).shape``, already rounded to the float16 that is stored.
    ``zero``: uint8 zero points of the same shape (asymmetric), or None (symmetric)."""

    scale: torch.Tensor
    zero: torch.Tensor | None


@dataclass(frozen=True, repr=False)
class IntegerFormat(Format):
    bits: int
    symmetric: bool
    group_size: int | None  # None: one group per row (per channel) or per tensor
    per_tensor: bool = False
    family = "int"
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

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    @property
    def half(self) -> int:
        """The offset of symmetric codes: code ``half`` is zero."""
        return 2 ** (self.bits - 1)

    def groups(self, shape: tuple[int, int]) -> ScaleGroups:
        rows, columns = shape
        return ScaleGroups(rows, columns, self.group_size or columns, self.per_tensor)

    def storage_bytes(self, shape: tuple[int, int]) -> int:
        rows, columns = shape
        scale_rows, groups = self.groups(shape).shape
        total = rows * packed_bytes(columns, self.bits) + scale_rows * groups * 2
        if not self.symmetric:
            total += scale_rows * packed_bytes(groups, self.bits)
        return total

    def choose_params(
        self, weight: torch.Tensor, *, clip: torch.Tensor | None = None, importance: torch.Tensor | None = None
    ) -> IntegerParams:
        check_choice(weight, self.name, importance)
        groups = self.groups((weight.shape[0], weight.shape[1]))
        grouped = groups.split(weight.float())
        ratio = clip_factors(clip, groups, grouped.device)
        if self.symmetric:
            absmax = grouped.abs().amax(-1)
            if ratio is not None:
                absmax = absmax * ratio
            return IntegerParams(round_to_float16(absmax / (self.half - 1)), None)
        lo = grouped.amin(-1).clamp(max=0)
        hi = grouped.amax(-1).clamp(min=0)
        if ratio is not None:
            lo, hi = lo * ratio, hi * ratio
        scale = round_to_float16((hi - lo) / self.levels)
        zero = torch.round(-lo / safe_divisor(scale)).clamp(0, self.levels)
        return IntegerParams(scale, zero.to(torch.uint8))

    def encode(self, weight: torch.Tensor, params: IntegerParams, columns: slice | None = None) -> torch.Tensor:
        check_matrix(weight, self.name)
        span = column_range(columns, weight.shape[1])
        groups = self.groups((weight.shape[0], span.stop))
        steps = torch.round(weight.float() / groups.per_column(safe_divisor(params.scale), span))
        if self.symmetric:
            codes = steps.clamp(-self.half, self.half - 1) + self.half
        else:
            codes = (steps + groups.per_column(params.zero.float(), span)).clamp(0, self.levels)
        return codes.to(torch.uint8)

    def decode(
        self, codes: torch.Tensor, params: IntegerParams, columns: slice | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        span = column_range(columns, codes.shape[1])
        groups = self.groups((codes.shape[0], span.stop))
        offset = self.half if self.symmetric else groups.per_column(params.zero.float(), span)
        return ((codes.float() - offset) * groups.per_column(params.scale, span)).to(dtype)

    def pack(self, codes: torch.Tensor, params: IntegerParams) -> dict[str, torch.Tensor]:
        parts = {"packed": pack(codes, self.bits), "scale": params.scale.to(torch.float16)}
        if params.zero is not None:
            parts["zero"] = pack(params.zero, self.bits)
        return parts

    def unpack(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> tuple[torch.Tensor, IntegerParams]:
        scale = parts["scale"].float()
        zero = None if self.symmetric else unpack(parts["zero"], self.bits, scale.shape[1])
        return unpack(parts["packed"], self.bits, shape[1]), IntegerParams(scale, zero)


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
