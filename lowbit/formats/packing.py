"""Dense bit packing of small unsigned codes, least-significant bits first.

Every format stores its codes with these two functions, so that a 3-bit weight really
takes 3 bits. Codes are packed along the last dimension (for a weight: along the input
features of each output row), code ``i`` of a row occupying bits ``i*bits .. i*bits+bits-1``
of the row's byte string. Each row is padded with zero bits to a whole byte:
``packed_bytes(n, bits) == ceil(n * bits / 8)``.

Eight codes of ``bits`` bits fill exactly ``bits`` bytes, so both directions work on
chunks of eight codes held in one 64-bit integer; that keeps every width (1..8) on one
vectorised path instead of a special case per width.
"""

from __future__ import annotations

import torch

_SHIFTS = {bits: torch.arange(8, dtype=torch.int64) * bits for bits in range(1, 9)}
_BYTE_SHIFTS = torch.arange(8, dtype=torch.int64) * 8


def packed_bytes(n_codes: int, bits: int) -> int:
    """Bytes that ``n_codes`` codes of ``bits`` bits take in one packed row."""
    return (n_codes * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer ``codes`` (values < 2**bits) along the last dim into uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be between 1 and 8, got {bits}")
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if bits == 4:  # the hot width gets the direct two-per-byte path
        c = codes.to(torch.uint8)
        if n % 2:
            c = torch.nn.functional.pad(c, (0, 1))
        return (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()
    n_chunks = (n + 7) // 8
    c = codes.to(torch.int64)
    if n_chunks * 8 != n:
        c = torch.nn.functional.pad(c, (0, n_chunks * 8 - n))
    words = (c.reshape(*lead, n_chunks, 8) << _SHIFTS[bits].to(c.device)).sum(-1)
    byte_shifts = _BYTE_SHIFTS[:bits].to(c.device)
    out = ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8)
    return out.reshape(*lead, n_chunks * bits)[..., : packed_bytes(n, bits)].contiguous()


def unpack(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 rows back to ``n_codes`` codes (uint8) per row."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be between 1 and 8, got {bits}")
    lead = packed.shape[:-1]
    if packed.shape[-1] != packed_bytes(n_codes, bits):
        raise ValueError(
            f"packed rows hold {packed.shape[-1]} bytes, expected {packed_bytes(n_codes, bits)} "
            f"for {n_codes} codes of {bits} bits"
        )
    if bits == 8:
        return packed
    if bits == 4:
        out = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*lead, -1)
        return out[..., :n_codes]
    n_chunks = (n_codes + 7) // 8
    p = packed.to(torch.int64)
    if p.shape[-1] != n_chunks * bits:
        p = torch.nn.functional.pad(p, (0, n_chunks * bits - p.shape[-1]))
    words = (p.reshape(*lead, n_chunks, bits) << _BYTE_SHIFTS[:bits].to(p.device)).sum(-1)
    codes = (words.unsqueeze(-1) >> _SHIFTS[bits].to(p.device)) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(*lead, n_chunks * 8)[..., :n_codes]
