"""NF4: the 4-bit NormalFloat code book of QLoRA, with optional double quantization.

Names: ``nf4`` (blocks of 64), ``nf4-dq`` (block scales themselves quantized), and
``nf4-g{size}`` / ``nf4-dq-g{size}`` for other power-of-two block sizes (16..4096).

Numerics follow bitsandbytes, so that an NF4 weight from lowbit and one from
``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")`` hold the same codes and
scales (tested against the package when it is importable):

- a block's scale is its absolute maximum (float32); values are multiplied by its
  reciprocal, clamped to [-1, 1], and take the code whose value is nearest, ties going to
  the lower code (the decision points are the midpoints between neighbouring code values);
- double quantization (``-dq``) subtracts the mean of all block scales, then quantizes the
  centred scales in blocks of 256 with bitsandbytes' signed 8-bit dynamic code, keeping a
  float32 scale per 256 blocks and the float32 mean: 8 + 32/256 bits per block instead of 32,
  which at blocks of 64 saves (32 - 8 - 32/256) / 64 = 0.373 bits per weight. As in
  bitsandbytes, the 4-bit codes are chosen with the exact block scale. Scales take the
  nearest 8-bit code; bitsandbytes' CPU path uses an approximate table search that picks the
  other neighbour for a few values within float rounding of a midpoint (about 0.2% of scales).

One difference in layout, not in numbers: bitsandbytes blocks the *flattened* tensor, lowbit
blocks each row (rows are output features), with a partial last block when a row is not a
multiple of the block size. The two agree whenever ``in_features`` is a multiple of the block.

Params (:class:`NF4Params`): the exact block scales the codes are chosen with and the
scales as stored (the same, or their double-quantized round trip, which ``decode`` uses).

Canonical layout, parts: ``packed`` uint8 ``(out, ceil(in/2))`` (first code of a pair in the
low nibble); then either ``absmax`` float32 ``(out, blocks)``, or, double quantized,
``absmax_q`` uint8 ``(out, blocks)``, ``absmax_scale`` float32 ``(ceil(out*blocks/256),)`` and
``absmax_offset`` float32 ``(1,)``.
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
    column_range,
)
from lowbit.formats.packing import pack, packed_bytes, unpack

# The 16 NF4 values as published with QLoRA (quantiles of N(0, 1), normalised to [-1, 1]).
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip

SCALE_BLOCK = 256  # double quantization: centred block scales are quantized 256 at a time
SCALE_PARTS = ("absmax_q", "absmax_scale", "absmax_offset")
NAME_PATTERN = re.compile(r"^nf4(-dq)?(?:-g(\d+))?$")


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (``create_dynamic_map(signed=True)``).

    For each decade ``10**(e-6)``, e = 0..6, it holds ``2**e`` values of each sign: the
    midpoints of ``2**e`` equal steps between 0.1 and 1, times the decade. Add 0 and 1.0
    and there are 256 values, sorted. Computed in float32 as bitsandbytes does.
    """
    values = [torch.zeros(1), torch.ones(1)]
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (bounds[:-1] + bounds[1:]) / 2.0
        values += [10 ** (e - 6) * mids, -(10 ** (e - 6)) * mids]
    return torch.cat(values).sort().values


DYNAMIC_CODE = dynamic_code()


def nearest_code(normalized: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of a sorted ``code``; exact midpoints go to the lower one."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(normalized, midpoints.to(normalized.device)).to(torch.uint8)


def reciprocal_scaled(values: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """``values / absmax`` as bitsandbytes computes it (times the reciprocal), clamped to [-1, 1]."""
    return (values * (1.0 / absmax.clamp(min=1e-38))).clamp(-1, 1)


@dataclass(frozen=True, eq=False)
class NF4Params:
    """Block scales, float32 ``(out, blocks)``. ``absmax``: the exact (clipped) scales the codes
    are chosen with. ``stored_absmax``: the scales as stored and decoded with: ``absmax``
    itself, or, double quantized, its round trip through ``scale_parts`` (the ``absmax_q``,
    ``absmax_scale`` and ``absmax_offset`` parts; None without double quantization).
    Params read back by ``unpack`` only know the stored scales, so both fields hold them."""

    absmax: torch.Tensor
    stored_absmax: torch.Tensor
    scale_parts: dict[str, torch.Tensor] | None


@dataclass(frozen=True, repr=False)
class NF4Format(Format):
    block_size: int = 64
    double_quant: bool = False
    family = "nf4"
    supports_clip = True

    @property
    def name(self) -> str:
        name = "nf4-dq" if self.double_quant else "nf4"
        return name if self.block_size == 64 else f"{name}-g{self.block_size}"

    def groups(self, shape: tuple[int, int]) -> ScaleGroups:
        return ScaleGroups(shape[0], shape[1], self.block_size)

    def storage_bytes(self, shape: tuple[int, int]) -> int:
        rows, columns = shape
        blocks = rows * self.groups(shape).count
        codes = rows * packed_bytes(columns, 4)
        if not self.double_quant:
            return codes + 4 * blocks
        return codes + blocks + 4 * -(-blocks // SCALE_BLOCK) + 4

    @property
    def search_format(self) -> NF4Format:
        # double-quantized scales share an offset and a scale per 256 blocks: score each
        # block with its exact scale, then double quantize the chosen ones
        return NF4Format(self.block_size, False)

    def choose_params(
        self, weight: torch.Tensor, *, clip: torch.Tensor | None = None, importance: torch.Tensor | None = None
    ) -> NF4Params:
        check_choice(weight, self.name, importance)
        groups = self.groups((weight.shape[0], weight.shape[1]))
        absmax = clipped_absmax(weight, groups, clip)
        if not self.double_quant:
            return NF4Params(absmax, absmax, None)
        scale_parts = self._quantize_scales(absmax)
        return NF4Params(absmax, self._dequantize_scales(scale_parts, groups.shape), scale_parts)

    def encode(self, weight: torch.Tensor, params: NF4Params, columns: slice | None = None) -> torch.Tensor:
        # Codes come from the exact block scale even when the scale is then double
        # quantized: that is what bitsandbytes stores, so its loaders read the same codes.
        check_matrix(weight, self.name)
        span = column_range(columns, weight.shape[1])
        absmax = self.groups((weight.shape[0], span.stop)).per_column(params.absmax, span)
        return nearest_code(reciprocal_scaled(weight.float(), absmax), NF4_CODE)

    def decode(
        self, codes: torch.Tensor, params: NF4Params, columns: slice | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        span = column_range(columns, codes.shape[1])
        absmax = self.groups((codes.shape[0], span.stop)).per_column(params.stored_absmax, span)
        return (NF4_CODE.to(codes.device)[codes.long()] * absmax).to(dtype)

    def pack(self, codes: torch.Tensor, params: NF4Params) -> dict[str, torch.Tensor]:
        scales = params.scale_parts if self.double_quant else {"absmax": params.absmax}
        return {"packed": pack(codes, 4), **scales}

    def unpack(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> tuple[torch.Tensor, NF4Params]:
        codes = unpack(parts["packed"], 4, shape[1])
        if not self.double_quant:
            return codes, NF4Params(parts["absmax"], parts["absmax"], None)
        scale_parts = {name: parts[name] for name in SCALE_PARTS}
        stored = self._dequantize_scales(scale_parts, self.groups(shape).shape)
        return codes, NF4Params(stored, stored, scale_parts)

    @staticmethod
    def _quantize_scales(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
        offset = absmax.mean()
        chunks = ScaleGroups(1, absmax.numel(), SCALE_BLOCK)
        centred = chunks.split((absmax - offset).reshape(1, -1))[0]
        scale = centred.abs().amax(-1)
        codes = nearest_code(reciprocal_scaled(centred, scale.unsqueeze(-1)), DYNAMIC_CODE)
        codes = codes.reshape(-1)[: absmax.numel()].reshape(absmax.shape)
        return {"absmax_q": codes, "absmax_scale": scale, "absmax_offset": offset.reshape(1)}

    @staticmethod
    def _dequantize_scales(parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        codes = parts["absmax_q"].reshape(1, -1)
        values = DYNAMIC_CODE.to(codes.device)[codes.long()]
        grouped = ScaleGroups(1, codes.numel(), SCALE_BLOCK).split(values)[0]
        scaled = grouped * parts["absmax_scale"].unsqueeze(-1)
        return scaled.reshape(-1)[: codes.numel()].reshape(shape) + parts["absmax_offset"]


def parse(name: str) -> NF4Format | None:
    match = NAME_PATTERN.match(name)
    if not match:
        return None
    block = int(match.group(2)) if match.group(2) else 64
    if block < 16 or block > 4096 or block & (block - 1):
        raise ValueError(f"NF4 block size must be a power of two from 16 to 4096, got {block} in {name!r}")
    return NF4Format(block, bool(match.group(1)))
