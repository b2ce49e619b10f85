"""Bit packing (``lowbit/formats/packing.py``) against a slow bit-string reference.

The documented layout: code ``i`` of a row occupies bits ``i*bits .. i*bits+bits-1`` of the
row's byte string, least-significant bit first, and each row is padded with zero bits to a
whole byte. The reference below builds that bit string one bit at a time in pure Python,
so it shares nothing with the vectorised library code (which works on 64-bit words, with a
special path for 4 and 8 bits).
"""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.formats.packing import pack, packed_bytes, unpack

BITS = list(range(1, 9))
ROW_LENGTHS = [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 63, 64, 65, 577]


def reference_pack_row(codes: list[int], bits: int) -> list[int]:
    """One row of codes -> its bytes, built from an explicit list of bits."""
    bit_string: list[int] = []
    for code in codes:
        assert 0 <= code < 2**bits
        bit_string += [(code >> j) & 1 for j in range(bits)]  # least significant first
    bit_string += [0] * (-len(bit_string) % 8)  # pad the row to a whole byte with zeros
    return [sum(bit_string[8 * k + j] << j for j in range(8)) for k in range(len(bit_string) // 8)]


def reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    lead = codes.shape[:-1]
    rows = codes.reshape(-1, codes.shape[-1]).tolist()
    packed = [reference_pack_row(row, bits) for row in rows]
    n_bytes = len(reference_pack_row([0] * codes.shape[-1], bits))
    return torch.tensor(packed, dtype=torch.uint8).reshape(*lead, n_bytes)


def random_codes(shape: tuple[int, ...], bits: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, shape, generator=generator)
    flat = codes.reshape(-1)
    if flat.numel() >= 2:  # make sure both extremes occur
        flat[0] = 2**bits - 1
        flat[-1] = 0
    return codes


def test_reference_itself_on_hand_worked_rows():
    # 3 bits, codes 1..7,0: bit string (LSB first) 100 010 110 001 101 011 111 000
    # -> bytes 0b11010001, 0b01011000, 0b00011111 (written MSB..LSB).
    assert reference_pack_row([1, 2, 3, 4, 5, 6, 7, 0], 3) == [0xD1, 0x58, 0x1F]
    # 4 bits: the first code of a pair is the low nibble.
    assert reference_pack_row([0x1, 0x2, 0xF], 4) == [0x21, 0x0F]
    # 1 bit: nine ones -> one full byte and one byte with only its lowest bit set.
    assert reference_pack_row([1] * 9, 1) == [0xFF, 0x01]


@pytest.mark.parametrize(
    ("codes", "bits", "expected"),
    [
        ([1, 2, 3, 4, 5, 6, 7, 0], 3, [0xD1, 0x58, 0x1F]),
        ([0x1, 0x2, 0xF], 4, [0x21, 0x0F]),
        ([1] * 9, 1, [0xFF, 0x01]),
        ([3, 0, 1], 2, [0b010011]),
        ([0x7F, 0x01], 7, [0xFF, 0x00]),  # 7 + 7 bits: 0x7F | 1 << 7, then 0
        ([0xAB, 0x01], 8, [0xAB, 0x01]),
    ],
)
def test_pack_hand_worked_examples(codes, bits, expected):
    packed = pack(torch.tensor([codes]), bits)
    assert packed.tolist() == [expected]
    assert unpack(packed, bits, len(codes)).tolist() == [codes]


@pytest.mark.parametrize("bits", BITS)
def test_packed_bytes_is_exact(bits):
    for n in range(130):
        assert packed_bytes(n, bits) == math.ceil(n * bits / 8) == len(reference_pack_row([0] * n, bits))
    assert packed_bytes(577, bits) == math.ceil(577 * bits / 8)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", ROW_LENGTHS)
def test_pack_matches_reference_byte_for_byte(bits, n):
    codes = random_codes((3, n), bits, seed=1000 * bits + n)
    packed = pack(codes, bits)
    expected = reference_pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, packed_bytes(n, bits))
    assert packed.is_contiguous()
    assert torch.equal(packed, expected)
    unpacked = unpack(packed, bits, n)
    assert unpacked.dtype == torch.uint8
    assert torch.equal(unpacked.long(), codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 9, 63, 577])
@pytest.mark.parametrize("lead", [(), (1,), (2, 3), (4, 1, 2)])
def test_round_trip_with_leading_dims(bits, n, lead):
    codes = random_codes((*lead, n), bits, seed=7 * bits + n + len(lead))
    packed = pack(codes, bits)
    assert packed.shape == (*lead, packed_bytes(n, bits))
    assert torch.equal(packed, reference_pack(codes, bits))
    assert torch.equal(unpack(packed, bits, n).long(), codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
def test_pack_accepts_integer_dtypes_and_non_contiguous_input(bits, dtype):
    codes = random_codes((13, 6), bits, seed=bits).to(dtype)
    transposed = codes.t()  # (6, 13), not contiguous
    assert not transposed.is_contiguous()
    assert torch.equal(pack(transposed, bits), reference_pack(transposed.contiguous().long(), bits))


@pytest.mark.parametrize("bits", BITS)
def test_unpack_reads_reference_bytes(bits):
    """Unpacking bytes produced by the reference gives back the reference's codes."""
    codes = random_codes((5, 577), bits, seed=99 + bits)
    assert torch.equal(unpack(reference_pack(codes, bits), bits, 577).long(), codes)


@pytest.mark.parametrize("bits", BITS)
def test_every_bit_is_used(bits):
    """Dense packing: all-max codes fill every byte with ones except the padding bits."""
    n = 61
    packed = pack(torch.full((2, n), 2**bits - 1), bits)
    total_bits = n * bits
    full, rest = divmod(total_bits, 8)
    expected = [0xFF] * full + ([(1 << rest) - 1] if rest else [])
    assert packed.tolist() == [expected, expected]


@pytest.mark.parametrize("bits", [0, 9, -1, 16])
def test_bad_bit_widths_raise(bits):
    with pytest.raises(ValueError, match="bits"):
        pack(torch.zeros(2, 8, dtype=torch.long), bits)
    with pytest.raises(ValueError, match="bits"):
        unpack(torch.zeros(2, 8, dtype=torch.uint8), bits, 8)


@pytest.mark.parametrize("bits", BITS)
def test_unpack_refuses_wrong_byte_count(bits):
    n = 17
    good = packed_bytes(n, bits)
    for wrong in (good - 1, good + 1):
        with pytest.raises(ValueError, match="bytes"):
            unpack(torch.zeros(3, wrong, dtype=torch.uint8), bits, n)
