"""llama.cpp's first block types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (blocks of 32, one fp16 scale).

``_0`` types are symmetric (``w = (L - 2**(bits-1)) * d``, Q8_0 ``w = int8(L) * d``), ``_1``
types store a float16 minimum too (``w = L * d + m``). Without importance they follow
``quantize_row_*_ref``: ``d`` from the block's extreme value, codes from the *unrounded*
``1/d`` truncated after ``+ 8.5f`` (Q8_0: ``roundf``). With importance (``quantize_q4_0`` …
with ``quant_weights``) the scale comes from ``make_qx_quants`` (``_0``) or
``make_qkx3_quants`` (``_1``) weighted by ``qw * sqrt(sigma2 + x*x)``, ``sigma2`` being the
mean square of the whole row; Q8_0 ignores importance, as llama.cpp does.

Struct layouts (ggml-common.h): ``d`` [``m``] [``qh`` u32: the fifth bits] ``qs``: Q8_0 holds
32 int8 codes, the others 16 bytes ``L[j] | L[j + 16] << 4``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.gguf_block import (
    BlockType,
    Fields,
    Grid,
    half_bytes,
    half_from,
    high_bits_u32,
    nibbles,
    row_importance,
    split_nibbles,
    u32_bytes,
    u32_from,
)
from lowbit.formats.gguf_numerics import (
    as_int8,
    f32,
    first_absmax,
    first_min_max,
    float_to_int,
    from_fp16,
    inverse,
    make_qkx_quants,
    make_qx_quants,
    nearest_int,
    quotient,
    round_away,
    seq_sum,
    sqrtf,
    to_fp16,
)


def _weights(x: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """``qw[j] * sqrtf(sigma2 + x*x)``, ``sigma2 = sum_x2 / n_per_row`` over the whole row."""
    rows = x.shape[0]
    sigma2 = quotient(seq_sum(x.reshape(rows, -1) * x.reshape(rows, -1)), x.shape[1] * x.shape[2])
    return row_importance(importance, rows) * sqrtf(sigma2[:, None, None] + x * x)


@dataclass(frozen=True)
class LegacyBlock(BlockType):
    """Q{bits}_0 (``with_min=False``) or Q{bits}_1 (``with_min=True``), blocks of 32."""

    name: str
    bits: int
    with_min: bool
    sub = 32

    @property
    def offset(self) -> int:
        """The code of zero in a symmetric type (Q8_0 stores signed bytes: none)."""
        return 0 if self.with_min or self.bits == 8 else 2 ** (self.bits - 1)

    @property
    def top(self) -> int:
        return 2**self.bits - 1

    def quantize(self, x: torch.Tensor, importance: torch.Tensor | None) -> tuple[Fields, torch.Tensor]:
        if importance is not None and self.bits != 8:
            return self._quantize_weighted(x, _weights(x, importance))
        if self.bits == 8:
            d = quotient(x.abs().amax(-1), 127)
            codes = float_to_int(round_away(x * inverse(d).unsqueeze(-1))) & 0xFF
            return {"d": to_fp16(d)}, codes.to(torch.uint8)
        if self.with_min:
            low, high = first_min_max(x)
            d = quotient(high - low, self.top)
            level = float_to_int((x - low.unsqueeze(-1)) * inverse(d).unsqueeze(-1) + f32(0.5))
            codes = level & 0xFF if self.bits == 5 else as_int8(level).clamp(max=self.top) & 0xFF
            return {"d": to_fp16(d), "m": to_fp16(low)}, codes.to(torch.uint8)
        _, top = first_absmax(x)
        d = quotient(top, -self.offset)
        level = float_to_int(x * inverse(d).unsqueeze(-1) + f32(self.offset + 0.5))
        return {"d": to_fp16(d)}, (as_int8(level).clamp(max=self.top) & 0xFF).to(torch.uint8)

    def _quantize_weighted(self, x: torch.Tensor, weights: torch.Tensor) -> tuple[Fields, torch.Tensor]:
        shape = x.shape
        flat, w = x.reshape(-1, shape[-1]), weights.reshape(-1, shape[-1])
        if self.with_min:
            scale, the_min, codes = make_qkx_quants(flat, w, self.top, -0.9, 0.05, 36)
            fields = {"d": to_fp16(scale), "m": to_fp16(-the_min)}
        else:
            scale, codes = make_qx_quants(flat, self.offset, w)
            fields = {"d": to_fp16(scale)}
        return {k: v.reshape(shape[:-1]) for k, v in fields.items()}, codes.reshape(shape)

    def grid(self, fields: Fields) -> Grid:
        d = from_fp16(fields["d"]).unsqueeze(-1)
        return (d, from_fp16(fields["m"]).unsqueeze(-1)) if self.with_min else (d,)

    def encode_values(self, x: torch.Tensor, *grid: torch.Tensor) -> torch.Tensor:
        d = grid[0]
        level = nearest_int((x - grid[1] if self.with_min else x) * inverse(d))
        if self.bits == 8:
            return (level.clamp(-128, 127) & 0xFF).to(torch.uint8)
        return (level + self.offset).clamp(0, self.top).to(torch.uint8)

    def decode_values(self, codes: torch.Tensor, *grid: torch.Tensor) -> torch.Tensor:
        d = grid[0]
        if self.bits == 8:
            return codes.view(torch.int8).float() * d
        if self.with_min:
            return codes.float() * d + grid[1]
        return (codes.float() - self.offset) * d

    def to_bytes(self, codes: torch.Tensor, fields: Fields) -> torch.Tensor:
        parts = [half_bytes(fields["d"])]
        if self.with_min:
            parts.append(half_bytes(fields["m"]))
        if self.bits == 5:
            parts.append(u32_bytes(high_bits_u32(codes, 4)))
        parts.append(codes if self.bits == 8 else nibbles(codes[..., :16], codes[..., 16:]))
        return torch.cat(parts, -1)

    def from_bytes(self, raw: torch.Tensor) -> tuple[Fields, torch.Tensor]:
        fields = {"d": half_from(raw, 0)}
        at = 2
        if self.with_min:
            fields["m"] = half_from(raw, 2)
            at = 4
        if self.bits == 8:
            return fields, raw[..., at:].contiguous()
        high = None
        if self.bits == 5:
            qh = u32_from(raw[..., at : at + 4])
            high = (qh.unsqueeze(-1) >> torch.arange(32, device=raw.device)) & 1
            at += 4
        low, upper = split_nibbles(raw[..., at:])
        codes = torch.cat([low, upper], -1)
        if high is not None:
            codes = codes | (high << 4).to(torch.uint8)
        return fields, codes


LEGACY_TYPES = (
    LegacyBlock("Q8_0", 8, False),
    LegacyBlock("Q4_0", 4, False),
    LegacyBlock("Q4_1", 4, True),
    LegacyBlock("Q5_0", 5, False),
    LegacyBlock("Q5_1", 5, True),
)
