"""MXFP4: FP4 E2M1 elements sharing a power-of-two E8M0 scale per block of 32 (OCP MX v1.0).

Name: ``mxfp4``. The OCP Microscaling spec fixes the block at 32, so no other size is taken.

E2M1 holds the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 and a sign. A block's shared exponent
is ``floor(log2(max|w|)) - 2`` (2 being E2M1's largest exponent), clamped to the E8M0 range
[-127, 127]; elements are divided by ``2**exponent``, clamped to ±6 (the spec saturates) and
rounded to the nearest E2M1 value, ties to the even code (the one whose mantissa bit is 0).

Parts: ``packed`` uint8 ``(out, ceil(in/2))``, the 4-bit codes ``sign << 3 | magnitude index``
packed low nibble first; ``exponent`` uint8 ``(out, blocks)``, the E8M0 byte (exponent + 127),
which is also the params (:class:`MXParams`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.base import (
    Format,
    ScaleGroups,
    check_finite,
    check_matrix,
    column_range,
    refuse_importance,
)
from lowbit.formats.packing import pack, packed_bytes, unpack

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
E2M1_MAX_EXPONENT = 2
BLOCK = 32


def round_to_e2m1(magnitude: torch.Tensor) -> torch.Tensor:
    """Index (0..7) of the nearest E2M1 magnitude, ties to the even index."""
    values = E2M1_VALUES.to(magnitude.device)
    midpoints = (values[:-1] + values[1:]) / 2
    below = torch.bucketize(magnitude, midpoints)  # ties land on the lower index
    at_tie = (below < 7) & (magnitude == midpoints[below.clamp(max=6)])
    return torch.where(at_tie & (below % 2 == 1), below + 1, below)


@dataclass(frozen=True, eq=False)
class MXParams:
    """``exponent``: the E8M0 byte of each block, uint8 ``(out, blocks)``: the block scale is
    ``2**(exponent - 127)``."""

    exponent: torch.Tensor


@dataclass(frozen=True, repr=False)
class MXFP4Format(Format):
    family = "mxfp4"

    @property
    def name(self) -> str:
        return "mxfp4"

    def groups(self, shape: tuple[int, int]) -> ScaleGroups:
        return ScaleGroups(shape[0], shape[1], BLOCK)

    def storage_bytes(self, shape: tuple[int, int]) -> int:
        return shape[0] * (packed_bytes(shape[1], 4) + self.groups(shape).count)

    def choose_params(
        self, weight: torch.Tensor, *, clip: torch.Tensor | None = None, importance: torch.Tensor | None = None
    ) -> MXParams:
        check_matrix(weight, self.name)
        check_finite(weight, self.name)
        if clip is not None:
            raise ValueError("mxfp4 scales are powers of two fixed by the spec; it has no clipping search")
        refuse_importance(importance, self.name)
        absmax = self.groups((weight.shape[0], weight.shape[1])).split(weight.float()).abs().amax(-1)
        # frexp reads floor(log2(absmax)) from the float's bits; log2 in float32 rounds up
        # just below a power of two and would pick an exponent one too large
        _, exponent = torch.frexp(absmax.clamp(min=torch.finfo(torch.float32).tiny))
        exponent = (exponent.float() - 1 - E2M1_MAX_EXPONENT).clamp(-127, 127)
        return MXParams((exponent + 127).to(torch.uint8))

    def _scale(self, params: MXParams, rows: int, span: range) -> torch.Tensor:
        """The power-of-two scale of every column of ``span``."""
        exponent = self.groups((rows, span.stop)).per_column(params.exponent, span)
        return torch.exp2(exponent.float() - 127)

    def encode(self, weight: torch.Tensor, params: MXParams, columns: slice | None = None) -> torch.Tensor:
        check_matrix(weight, self.name)
        scale = self._scale(params, weight.shape[0], column_range(columns, weight.shape[1]))
        scaled = (weight.float() / scale).clamp(-6, 6)
        codes = round_to_e2m1(scaled.abs()) | ((scaled < 0).to(torch.int64) << 3)
        return codes.to(torch.uint8)

    def decode(
        self, codes: torch.Tensor, params: MXParams, columns: slice | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        scale = self._scale(params, codes.shape[0], column_range(columns, codes.shape[1]))
        magnitude = E2M1_VALUES.to(codes.device)[codes.long() & 7]
        return (torch.where(codes >= 8, -magnitude, magnitude) * scale).to(dtype)

    def pack(self, codes: torch.Tensor, params: MXParams) -> dict[str, torch.Tensor]:
        return {"packed": pack(codes, 4), "exponent": params.exponent}

    def unpack(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> tuple[torch.Tensor, MXParams]:
        return unpack(parts["packed"], 4, shape[1]), MXParams(parts["exponent"])


def parse(name: str) -> MXFP4Format | None:
    if name == "mxfp4":
        return MXFP4Format()
    if name.startswith("mxfp4-"):
        raise ValueError(f"mxfp4 uses blocks of 32 as the OCP MX spec fixes them; {name!r} is not a variant")
    return None
