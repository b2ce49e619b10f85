"""llama.cpp's K-quants: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (super-blocks of 256).

A super-block holds sub-blocks (16 of 16 weights for Q2_K, Q3_K, Q6_K; 8 of 32 for Q4_K,
Q5_K) whose scales are themselves quantized against one float16 ``d`` per super-block
(and ``dmin`` for the types with a minimum, Q2_K, Q4_K, Q5_K):

- Q4_K / Q5_K: ``w = d*sc * L - dmin*m``, 6-bit ``sc``/``m`` packed in 12 bytes
  (``get_scale_min_k4``), codes 0..15 / 0..31;
- Q2_K: ``w = d*(s & 15) * L - dmin*(s >> 4)``, one byte ``s`` per sub-block, codes 0..3;
- Q3_K: ``w = d*(sc - 32) * (L - 4)``, 6-bit ``sc`` in 12 bytes, codes 0..7 (high bit in ``hmask``);
- Q6_K: ``w = d*sc * (L - 32)``, int8 ``sc``, codes 0..63 (high two bits in ``qh``).

Without importance each follows ``quantize_row_<type>_ref``; with importance,
``quantize_row_<type>_impl`` (``make_qkx3_quants`` + ``make_qp_quants`` for Q2/4/5_K,
``make_qx_quants`` for Q3_K and Q6_K): both exactly as ``quantize_<type>`` calls them. Both end
by re-rounding every weight against the stored (float16) scales, except in sub-blocks whose
stored scale is zero, which keep the search's codes.
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
    or_reduce,
    row_importance,
)
from lowbit.formats.gguf_numerics import (
    GROUP_MAX_EPS,
    f32,
    first_absmax,
    from_fp16,
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    nonzero,
    positive_max,
    quotient,
    seq_sum,
    sqrtf,
    to_fp16,
)


def _affine_codes(x: torch.Tensor, d: torch.Tensor, dm: torch.Tensor, top: int) -> torch.Tensor:
    """``l = clamp(nearest_int((x + dm) / d), 0, top)``; 0 where the sub-block's ``d`` is 0."""
    level = nearest_int((x + dm) / nonzero(d)).clamp(0, top)
    return torch.where(d == 0, 0, level).to(torch.uint8)


def _signed_codes(x: torch.Tensor, d: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """``l = clamp(nearest_int(x / d), low, high) - low``; 0 where the sub-block's ``d`` is 0."""
    level = nearest_int(x / nonzero(d)).clamp(low, high) - low
    return torch.where(d == 0, 0, level).to(torch.uint8)


def _final_codes(block: BlockType, x: torch.Tensor, fields: Fields, search: torch.Tensor) -> torch.Tensor:
    """The last pass of every K-quant: each weight re-rounded against the stored scales, except
    in sub-blocks whose stored scale is zero, which keep the search's codes (``if (!d) continue``)."""
    grid = [g.unsqueeze(-1) for g in block.grid(fields)]
    codes = block.encode_values(block._by_sub(x), *grid)
    return torch.where(grid[0] == 0, search.reshape(codes.shape).to(torch.uint8), codes).reshape(x.shape)


def pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """256 codes of 2 bits -> 64 bytes: byte ``32*c + l`` holds codes ``128*c + 32*k + l`` at bits ``2k``."""
    parts = codes.long().reshape(*codes.shape[:-1], 2, 4, 32)
    shifts = torch.arange(0, 8, 2, device=codes.device).view(4, 1)
    return or_reduce(parts << shifts, -2).reshape(*codes.shape[:-1], 64).to(torch.uint8)


def unpack_2bit(packed: torch.Tensor) -> torch.Tensor:
    parts = packed.long().reshape(*packed.shape[:-1], 2, 1, 32)
    shifts = torch.arange(0, 8, 2, device=packed.device).view(4, 1)
    return ((parts >> shifts) & 3).reshape(*packed.shape[:-1], 256).to(torch.uint8)


def pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K's 12 scale bytes from 8 scales and 8 mins (int64, 6 bits), C's byte arithmetic."""
    low = (ls[..., :4] | ((ls[..., 4:] >> 4) << 6)) & 0xFF
    mid = (lm[..., :4] | ((lm[..., 4:] >> 4) << 6)) & 0xFF
    high = ((ls[..., 4:] & 0xF) | ((lm[..., 4:] & 0xF) << 4)) & 0xFF
    return torch.cat([low, mid, high], -1).to(torch.uint8)


def unpack_scale_min_k4(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``get_scale_min_k4`` for j = 0..7: the 6-bit scales and mins (int64)."""
    q = packed.long()
    sc = torch.cat([q[..., 0:4] & 63, (q[..., 8:12] & 0xF) | ((q[..., 0:4] >> 6) << 4)], -1)
    m = torch.cat([q[..., 4:8] & 63, (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)], -1)
    return sc, m


def pack_q3_scales(levels: torch.Tensor) -> torch.Tensor:
    """Q3_K's 12 bytes from 16 six-bit values ``l`` (int64, 0..63)."""
    low = (levels[..., :8] & 0xF) | ((levels[..., 8:] & 0xF) << 4)
    upper = (levels >> 4) & 3
    shifts = (2 * torch.arange(4, device=levels.device)).view(4, 1)
    high = or_reduce(upper.reshape(*levels.shape[:-1], 4, 4) << shifts, -2)
    return torch.cat([low, high], -1).to(torch.uint8)


def unpack_q3_scales(packed: torch.Tensor) -> torch.Tensor:
    """The 16 signed scales ``sc - 32`` (int64) of Q3_K's 12 bytes."""
    q = packed.long()
    low = torch.cat([q[..., :8] & 0xF, q[..., :8] >> 4], -1)
    shifts = (2 * torch.arange(4, device=packed.device)).view(4, 1)
    high = ((q[..., 8:12].unsqueeze(-2) >> shifts) & 3).reshape(*packed.shape[:-1], 16)
    return (low | (high << 4)) - 32


def _sub(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(rows, blocks, 256)`` -> ``(rows * blocks * 256/size, size)`` sub-blocks."""
    return x.reshape(-1, size)


def _super_weights(x: torch.Tensor, importance: torch.Tensor, factor: int) -> torch.Tensor:
    """``qw * sqrtf(sigma2 + x*x)``, ``sigma2 = factor*sum_x2/QK_K`` over the super-block."""
    sigma2 = quotient(f32(factor) * seq_sum(x * x), 256)
    return row_importance(importance, x.shape[0]) * sqrtf(sigma2.unsqueeze(-1) + x * x)


@dataclass(frozen=True)
class ScaleMinK(BlockType):
    """Q4_K (``bits=4``) and Q5_K (``bits=5``): 8 sub-blocks of 32, scales and mins on 6 bits."""

    name: str
    bits: int
    rmin: float
    rdelta: float
    nstep: int
    sub = 32

    @property
    def top(self) -> int:
        return 2**self.bits - 1

    def quantize(self, x: torch.Tensor, importance: torch.Tensor | None) -> tuple[Fields, torch.Tensor]:
        lead = x.shape[:-1]
        xs = _sub(x, 32)
        if importance is None:
            av_x = sqrtf(quotient(seq_sum(xs * xs), 32))
            weights = av_x.unsqueeze(-1) + xs.abs()
            scales, mins, search = make_qkx_quants(xs, weights, self.top, self.rmin, self.rdelta, self.nstep)
            scales, mins = scales.reshape(*lead, 8), mins.reshape(*lead, 8)
            max_scale, max_min = positive_max(scales), positive_max(mins)
            inv_scale = torch.where(max_scale > 0, f32(63) / nonzero(max_scale), torch.zeros_like(max_scale))
            inv_min = torch.where(max_min > 0, f32(63) / nonzero(max_min), torch.zeros_like(max_min))
            ls = (nearest_int(inv_scale.unsqueeze(-1) * scales) & 0xFF).clamp(max=63)
            lm = (nearest_int(inv_min.unsqueeze(-1) * mins) & 0xFF).clamp(max=63)
            d, dmin = to_fp16(quotient(max_scale, 63)), to_fp16(quotient(max_min, 63))
        else:
            weights = _super_weights(x, importance, 2).reshape(-1, 32)
            scales, mins, search = make_qkx_quants(xs, weights, self.top, -0.9, 0.05, 36)
            sw = seq_sum(weights).reshape(-1, 8)
            d_block, ls = make_qp_quants(scales.reshape(-1, 8), 63, sw)
            m_block, lm = make_qp_quants(mins.reshape(-1, 8), 63, sw)
            ls, lm = ls.long().reshape(*lead, 8), lm.long().reshape(*lead, 8)
            if self.bits == 5:  # quantize_row_q5_K_impl clamps, q4_K's does not
                ls, lm = ls.clamp(max=63), lm.clamp(max=63)
            d, dmin = to_fp16(d_block.reshape(lead)), to_fp16(m_block.reshape(lead))
        fields = {"d": d, "dmin": dmin, "scales": pack_scale_min_k4(ls, lm)}
        return fields, _final_codes(self, x, fields, search)

    def grid(self, fields: Fields) -> Grid:
        sc, m = unpack_scale_min_k4(fields["scales"])
        return from_fp16(fields["d"]).unsqueeze(-1) * sc.float(), from_fp16(fields["dmin"]).unsqueeze(-1) * m.float()

    def encode_values(self, x: torch.Tensor, *grid: torch.Tensor) -> torch.Tensor:
        return _affine_codes(x, grid[0], grid[1], self.top)

    def decode_values(self, codes: torch.Tensor, *grid: torch.Tensor) -> torch.Tensor:
        return grid[0] * codes.float() - grid[1]

    def to_bytes(self, codes: torch.Tensor, fields: Fields) -> torch.Tensor:
        chunks = codes.long().reshape(*codes.shape[:-1], 4, 2, 32)
        qs = ((chunks[..., 0, :] & 0xF) | ((chunks[..., 1, :] & 0xF) << 4)).reshape(*codes.shape[:-1], 128)
        parts = [half_bytes(fields["d"]), half_bytes(fields["dmin"]), fields["scales"]]
        if self.bits == 5:
            shifts = torch.arange(8, device=codes.device).view(4, 2, 1)
            flags = (((chunks >> 4) & 1) << shifts).reshape(*codes.shape[:-1], 8, 32)
            parts.append(or_reduce(flags, -2).to(torch.uint8))
        return torch.cat([*parts, qs.to(torch.uint8)], -1)

    def from_bytes(self, raw: torch.Tensor) -> tuple[Fields, torch.Tensor]:
        fields = {
            "d": half_from(raw, 0),
            "dmin": half_from(raw, 2),
            "scales": raw[..., 4:16].contiguous(),
        }
        qs = raw[..., -128:].long().reshape(*raw.shape[:-1], 4, 1, 32)
        codes = (qs >> torch.tensor([0, 4], device=raw.device).view(2, 1)) & 0xF
        if self.bits == 5:
            qh = raw[..., 16:48].long().reshape(*raw.shape[:-1], 1, 1, 32)
            shifts = torch.arange(8, device=raw.device).view(4, 2, 1)
            codes = codes | (((qh >> shifts) & 1) << 4)
        return fields, codes.reshape(*raw.shape[:-1], 256).to(torch.uint8)


@dataclass(frozen=True)
class Q2K(BlockType):
    """Q2_K: 16 sub-blocks of 16, a byte of 4-bit scale and 4-bit min each, 2-bit codes."""

    name: str = "Q2_K"
    sub = 16

    def quantize(self, x: torch.Tensor, importance: torch.Tensor | None) -> tuple[Fields, torch.Tensor]:
        lead = x.shape[:-1]
        xs = _sub(x, 16)
        if importance is None:
            scales, mins, search = make_qkx_quants(xs, xs.abs(), 3, -0.5, 0.1, 15, use_mad=True)
            scales, mins = scales.reshape(*lead, 16), mins.reshape(*lead, 16)
            max_scale, max_min = positive_max(scales), positive_max(mins)
            ls = nearest_int((f32(15) / nonzero(max_scale)).unsqueeze(-1) * scales) & 0xFF
            lm = nearest_int((f32(15) / nonzero(max_min)).unsqueeze(-1) * mins)
            ls = torch.where((max_scale > 0).unsqueeze(-1), ls, 0)
            byte = torch.where((max_min > 0).unsqueeze(-1), (ls | (lm << 4)) & 0xFF, ls)
            d = to_fp16(torch.where(max_scale > 0, quotient(max_scale, 15), torch.zeros_like(max_scale)))
            dmin = to_fp16(torch.where(max_min > 0, quotient(max_min, 15), torch.zeros_like(max_min)))
        else:
            weights = _super_weights(x, importance, 1).reshape(-1, 16)
            scales, mins, search = make_qkx_quants(xs, weights, 3, -0.9, 0.05, 36)
            sw = seq_sum(weights).reshape(-1, 16)
            dm, ls = make_qp_quants(scales.reshape(-1, 16), 15, sw)
            mm, lm = make_qp_quants(mins.reshape(-1, 16), 15, sw)
            byte = ((ls.long() | (lm.long() << 4)) & 0xFF).reshape(*lead, 16)
            d, dmin = to_fp16(dm.reshape(lead)), to_fp16(mm.reshape(lead))
        fields = {"d": d, "dmin": dmin, "scales": byte.to(torch.uint8)}
        return fields, _final_codes(self, x, fields, search)

    def grid(self, fields: Fields) -> Grid:
        s = fields["scales"].long()
        return from_fp16(fields["d"]).unsqueeze(-1) * (s & 0xF).float(), from_fp16(fields["dmin"]).unsqueeze(-1) * (
            s >> 4
        ).float()

    def encode_values(self, x: torch.Tensor, *grid: torch.Tensor) -> torch.Tensor:
        return _affine_codes(x, grid[0], grid[1], 3)

    def decode_values(self, codes: torch.Tensor, *grid: torch.Tensor) -> torch.Tensor:
        return grid[0] * codes.float() - grid[1]

    def to_bytes(self, codes: torch.Tensor, fields: Fields) -> torch.Tensor:
        return torch.cat(
            [
                fields["scales"],
                pack_2bit(codes),
                half_bytes(fields["d"]),
                half_bytes(fields["dmin"]),
            ],
            -1,
        )

    def from_bytes(self, raw: torch.Tensor) -> tuple[Fields, torch.Tensor]:
        fields = {
            "scales": raw[..., :16].contiguous(),
            "d": half_from(raw, 80),
            "dmin": half_from(raw, 82),
        }
        return fields, unpack_2bit(raw[..., 16:80])


@dataclass(frozen=True)
class Q3K(BlockType):
    """Q3_K: 16 sub-blocks of 16, signed 6-bit scales, 3-bit codes (2 low bits + ``hmask``)."""

    name: str = "Q3_K"
    sub = 16

    def quantize(self, x: torch.Tensor, importance: torch.Tensor | None) -> tuple[Fields, torch.Tensor]:
        lead = x.shape[:-1]
        xs = _sub(x, 16)
        if importance is None:
            scales, search = make_q3_quants(xs, 4)
            scales = scales.reshape(*lead, 16)
            _, max_scale = first_absmax(scales)
            iscale = f32(-32) / nonzero(max_scale)
            level = nearest_int(iscale.unsqueeze(-1) * scales)
            level = (((level + 128) & 0xFF) - 128).clamp(-32, 31) + 32  # (int8_t) then MAX/MIN
            level = torch.where((max_scale != 0).unsqueeze(-1), level, 0)
            d = to_fp16(torch.where(max_scale != 0, f32(1) / iscale, torch.zeros_like(iscale)))
        else:
            weights = _super_weights(x, importance, 2).reshape(-1, 16)
            scales, search = make_qx_quants(xs, 4, weights)
            sw = seq_sum(weights).reshape(-1, 16)
            d_block, level = make_qx_quants(scales.reshape(-1, 16), 32, sw)
            level = level.long().reshape(*lead, 16)
            d = to_fp16(d_block.reshape(lead))
        fields = {"d": d, "scales": pack_q3_scales(level)}
        return fields, _final_codes(self, x, fields, search)

    def grid(self, fields: Fields) -> Grid:
        return (from_fp16(fields["d"]).unsqueeze(-1) * unpack_q3_scales(fields["scales"]).float(),)

    def encode_values(self, x: torch.Tensor, *grid: torch.Tensor) -> torch.Tensor:
        return _signed_codes(x, grid[0], -4, 3)

    def decode_values(self, codes: torch.Tensor, *grid: torch.Tensor) -> torch.Tensor:
        return grid[0] * (codes.float() - 4)

    def to_bytes(self, codes: torch.Tensor, fields: Fields) -> torch.Tensor:
        high = (codes.long() >> 2) & 1  # code j's high bit goes to hmask[j % 32], bit j // 32
        hmask = or_reduce(high.reshape(*codes.shape[:-1], 8, 32) << torch.arange(8, device=codes.device).view(8, 1), -2)
        return torch.cat(
            [
                hmask.to(torch.uint8),
                pack_2bit(codes & 3),
                fields["scales"],
                half_bytes(fields["d"]),
            ],
            -1,
        )

    def from_bytes(self, raw: torch.Tensor) -> tuple[Fields, torch.Tensor]:
        hmask = raw[..., :32].long().unsqueeze(-2) >> torch.arange(8, device=raw.device).view(8, 1)
        high = (hmask & 1).reshape(*raw.shape[:-1], 256)
        codes = unpack_2bit(raw[..., 32:96]) | (high << 2).to(torch.uint8)
        return {
            "scales": raw[..., 96:108].contiguous(),
            "d": half_from(raw, 108),
        }, codes


@dataclass(frozen=True)
class Q6K(BlockType):
    """Q6_K: 16 sub-blocks of 16, int8 scales, 6-bit codes (4 low bits in ``ql``, 2 in ``qh``)."""

    name: str = "Q6_K"
    sub = 16

    def quantize(self, x: torch.Tensor, importance: torch.Tensor | None) -> tuple[Fields, torch.Tensor]:
        lead = x.shape[:-1]
        xs = _sub(x, 16)
        weights = None if importance is None else row_importance(importance, x.shape[0]).reshape(-1, 16)
        scales, search = make_qx_quants(xs, 32, weights)
        scales = scales.reshape(*lead, 16)
        amax, max_scale = first_absmax(scales)
        empty = amax < GROUP_MAX_EPS
        iscale = f32(-128) / torch.where(empty, torch.ones_like(max_scale), max_scale)
        level = nearest_int(iscale.unsqueeze(-1) * scales).clamp(max=127)
        level = torch.where(empty.unsqueeze(-1), 0, level)
        d = to_fp16(torch.where(empty, torch.zeros_like(iscale), f32(1) / iscale))
        fields = {"d": d, "scales": level.to(torch.int8)}
        search = torch.where(empty.unsqueeze(-1), 0, search.reshape(*lead, 256).long())
        return fields, _final_codes(self, x, fields, search)

    def grid(self, fields: Fields) -> Grid:
        return (from_fp16(fields["d"]).unsqueeze(-1) * fields["scales"].float(),)

    def encode_values(self, x: torch.Tensor, *grid: torch.Tensor) -> torch.Tensor:
        return _signed_codes(x, grid[0], -32, 31)

    def decode_values(self, codes: torch.Tensor, *grid: torch.Tensor) -> torch.Tensor:
        return grid[0] * (codes.float() - 32)

    def to_bytes(self, codes: torch.Tensor, fields: Fields) -> torch.Tensor:
        lead = codes.shape[:-1]
        q = codes.long().reshape(*lead, 2, 4, 32)  # half, quarter, lane
        low = q & 0xF
        ql = torch.cat(
            [
                low[..., 0, :] | (low[..., 2, :] << 4),
                low[..., 1, :] | (low[..., 3, :] << 4),
            ],
            -1,
        )
        shifts = torch.arange(0, 8, 2, device=codes.device).view(4, 1)
        qh = or_reduce((q >> 4) << shifts, -2)
        scales = fields["scales"].view(torch.uint8)
        return torch.cat([ql.reshape(*lead, 128).to(torch.uint8), qh.reshape(*lead, 64).to(torch.uint8), scales,
                          half_bytes(fields["d"])], -1)  # fmt: skip

    def from_bytes(self, raw: torch.Tensor) -> tuple[Fields, torch.Tensor]:
        lead = raw.shape[:-1]
        ql = raw[..., :128].long().reshape(*lead, 2, 2, 32)
        low = torch.stack(
            [
                ql[..., 0, :] & 0xF,
                ql[..., 1, :] & 0xF,
                ql[..., 0, :] >> 4,
                ql[..., 1, :] >> 4,
            ],
            -2,
        )
        qh = raw[..., 128:192].long().reshape(*lead, 2, 1, 32)
        high = (qh >> torch.arange(0, 8, 2, device=raw.device).view(4, 1)) & 3
        codes = (low | (high << 4)).reshape(*lead, 256).to(torch.uint8)
        return {
            "scales": raw[..., 192:208].contiguous().view(torch.int8),
            "d": half_from(raw, 208),
        }, codes


K_TYPES = (
    ScaleMinK("Q4_K", 4, -1.0, 0.1, 20),
    ScaleMinK("Q5_K", 5, -0.5, 0.1, 15),
    Q6K(),
    Q3K(),
    Q2K(),
)
