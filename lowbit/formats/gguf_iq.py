"""llama.cpp's non-linear 4-bit types: IQ4_NL (blocks of 32) and IQ4_XS (super-blocks of 256).

Codes index the 16 values of ``kvalues_iq4nl`` (-127 … 113), times a scale: IQ4_NL stores one
float16 ``d`` per block of 32; IQ4_XS one float16 ``d`` per 256 and a 6-bit scale ``ls`` per
sub-block of 32 (``w = d*(ls - 32) * value``), low nibbles in ``scales_l``, high bits in ``scales_h``.

Quantization follows ``quantize_row_iq4_nl_impl`` as ``quantize_iq4_nl`` and
``quantize_iq4_xs`` call it (what ``llama-quantize`` runs, with or without an imatrix;
``ntry = 7``): per sub-block, a first scale from the extreme value, then 15 candidate
inverse scales scored by the weighted least-squares gain; weights are ``x*x`` or
``qw * sqrt(sigma2 + x*x)``. The codes are then re-chosen against the final (IQ4_XS: the
6-bit quantized) scale.
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
    nibbles,
    or_reduce,
    row_importance,
    split_nibbles,
)
from lowbit.formats.gguf_numerics import (
    GROUP_MAX_EPS,
    f32,
    first_absmax,
    from_fp16,
    inverse,
    nearest_int,
    seq_sum,
    sqrtf,
    to_fp16,
)

KVALUES_IQ4NL = torch.tensor(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
    dtype=torch.float32,
)
NTRY = 7


def _tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For ``i = -128 .. 127`` (row ``i + 128``): ``upper``, the index of the first value
    above any float whose floor is ``i`` (the values are integers), kept within 1..15 as C's
    search keeps it, and the two values around it."""
    upper = (KVALUES_IQ4NL.view(1, 16) <= torch.arange(-128, 128, dtype=torch.float32).view(256, 1)).sum(1)
    upper = upper.clamp(1, 15)
    return upper, KVALUES_IQ4NL[upper - 1], KVALUES_IQ4NL[upper]


UPPER, BELOW, ABOVE = _tables()


def best_index(x: torch.Tensor) -> torch.Tensor:
    """``best_index_int8(16, kvalues_iq4nl, x)``: the nearest value's index, ties to the upper
    one, with C's own comparison ``x - val[mu-1] < val[mu] - x``. Below the first value the
    comparison picks 0 and above the last 15, as C's early returns do; NaN looks up the top
    row and fails the comparison: 15, as in C."""
    row = torch.floor(torch.nan_to_num(x, nan=127.0).clamp(-128, 127)).long() + 128
    lower = (x - BELOW.to(x.device)[row]) < (ABOVE.to(x.device)[row] - x)
    return UPPER.to(x.device)[row] - lower.long()


def search_scales(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The per-block loop of ``quantize_row_iq4_nl_impl``: the scale of each ``(blocks, 32)``
    block (0 for a block below ``GROUP_MAX_EPS``)."""
    amax, top = first_absmax(x)
    empty = amax < GROUP_MAX_EPS
    top = torch.where(empty, torch.ones_like(top), top)
    values = KVALUES_IQ4NL.to(x.device)
    x, weights = x.t().contiguous(), weights.t().contiguous()  # element i of every block in row i
    terms = torch.empty((2, *x.shape), dtype=torch.float32, device=x.device)

    def sums(inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = values[best_index(inverse * x)]
        torch.mul(weights, q, out=terms[0])
        torch.mul(terms[0], q, out=terms[1])
        torch.mul(terms[0], x, out=terms[0])
        acc = torch.zeros(terms.shape[::2], dtype=torch.float32, device=x.device)
        for i in range(x.shape[0]):
            acc.add_(terms[:, i])
        return acc[0], acc[1]

    d = -top / values[0]
    sumqx, sumq2 = sums(f32(1) / d)
    d = torch.where(sumq2 > 0, sumqx / sumq2, torch.zeros_like(sumqx))
    best = d * sumqx
    for step in range(-NTRY, NTRY + 1):
        sumqx, sumq2 = sums(f32(step + int(values[0])) / top)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / sumq2, d)
        best = torch.where(better, d * sumqx, best)
    return torch.where(empty, torch.zeros_like(d), d)


def _weights(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """``(rows, blocks, n)`` super-blocks -> the weight of each element: ``x*x`` without
    importance, else ``qw * sqrtf(sigma2 + x*x)`` with ``sigma2 = sum(x*x) * (2/n)``."""
    if importance is None:
        return x * x
    sigma2 = seq_sum(x * x) * (f32(2) / f32(x.shape[-1]))
    return row_importance(importance, x.shape[0]) * sqrtf(sigma2.unsqueeze(-1) + x * x)


def _codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``best_index_int8(16, values, (scale ? 1/scale : 0) * x)``, the scale broadcast to ``x``."""
    return best_index(inverse(scale) * x).to(torch.uint8)


def _pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Per 32 codes: 16 bytes ``L[j] | L[j + 16] << 4``."""
    pairs = codes.reshape(*codes.shape[:-1], -1, 2, 16)
    return nibbles(pairs[..., 0, :], pairs[..., 1, :]).reshape(*codes.shape[:-1], codes.shape[-1] // 2)


def _unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    low, high = split_nibbles(packed.reshape(*packed.shape[:-1], -1, 16))
    return torch.stack([low, high], -2).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


@dataclass(frozen=True)
class IQ4NL(BlockType):
    name: str = "IQ4_NL"
    sub = 32

    def quantize(self, x: torch.Tensor, importance: torch.Tensor | None) -> tuple[Fields, torch.Tensor]:
        weights = _weights(x, importance)
        scale = search_scales(x.reshape(-1, 32), weights.reshape(-1, 32)).reshape(x.shape[:-1])
        return {"d": to_fp16(scale)}, _codes(x, scale.unsqueeze(-1))

    def grid(self, fields: Fields) -> Grid:
        return (from_fp16(fields["d"]).unsqueeze(-1),)

    def encode_values(self, x: torch.Tensor, *grid: torch.Tensor) -> torch.Tensor:
        return _codes(x, grid[0])

    def decode_values(self, codes: torch.Tensor, *grid: torch.Tensor) -> torch.Tensor:
        return grid[0] * KVALUES_IQ4NL.to(codes.device)[codes.long()]

    def to_bytes(self, codes: torch.Tensor, fields: Fields) -> torch.Tensor:
        return torch.cat([half_bytes(fields["d"]), _pack_codes(codes)], -1)

    def from_bytes(self, raw: torch.Tensor) -> tuple[Fields, torch.Tensor]:
        return {"d": half_from(raw, 0)}, _unpack_codes(raw[..., 2:])


@dataclass(frozen=True)
class IQ4XS(BlockType):
    name: str = "IQ4_XS"
    sub = 32

    def quantize(self, x: torch.Tensor, importance: torch.Tensor | None) -> tuple[Fields, torch.Tensor]:
        lead = x.shape[:-1]
        weights = _weights(x, importance)
        scales = search_scales(x.reshape(-1, 32), weights.reshape(-1, 32)).reshape(*lead, 8)
        _, max_scale = first_absmax(scales)
        d = -max_scale / f32(32)
        level = nearest_int(inverse(d).unsqueeze(-1) * scales).clamp(-32, 31)
        sub = d.unsqueeze(-1) * level.float()  # dl: the float d, not the stored float16
        codes = _codes(self._by_sub(x), sub.unsqueeze(-1)).reshape(x.shape)
        return self._fields(to_fp16(d), level + 32), codes

    @staticmethod
    def _fields(d: torch.Tensor, levels: torch.Tensor) -> Fields:
        low = (levels & 0xF).reshape(*levels.shape[:-1], 4, 2)
        scales_l = (low[..., 0] | (low[..., 1] << 4)).to(torch.uint8)
        scales_h = or_reduce(((levels >> 4) & 3) << (2 * torch.arange(8, device=levels.device)), -1)
        return {"d": d, "scales_h": scales_h.to(torch.int16), "scales_l": scales_l}

    def grid(self, fields: Fields) -> Grid:
        low = fields["scales_l"].long()
        low = torch.stack([low & 0xF, low >> 4], -1).reshape(*low.shape[:-1], 8)
        high = (fields["scales_h"].long() & 0xFFFF).unsqueeze(-1) >> (2 * torch.arange(8, device=low.device))
        return (from_fp16(fields["d"]).unsqueeze(-1) * ((low | ((high & 3) << 4)) - 32).float(),)

    def encode_values(self, x: torch.Tensor, *grid: torch.Tensor) -> torch.Tensor:
        return _codes(x, grid[0])

    def decode_values(self, codes: torch.Tensor, *grid: torch.Tensor) -> torch.Tensor:
        return grid[0] * KVALUES_IQ4NL.to(codes.device)[codes.long()]

    def to_bytes(self, codes: torch.Tensor, fields: Fields) -> torch.Tensor:
        scales_h = fields["scales_h"].contiguous().unsqueeze(-1).view(torch.uint8)
        return torch.cat(
            [half_bytes(fields["d"]), scales_h, fields["scales_l"], _pack_codes(codes)],
            -1,
        )

    def from_bytes(self, raw: torch.Tensor) -> tuple[Fields, torch.Tensor]:
        fields = {
            "d": half_from(raw, 0),
            "scales_h": raw[..., 2:4].contiguous().view(torch.int16).squeeze(-1),
            "scales_l": raw[..., 4:8].contiguous(),
        }
        return fields, _unpack_codes(raw[..., 8:])


IQ_TYPES = (IQ4NL(), IQ4XS())
