"""Weight formats (``lowbit/formats/``) against references written here from their docstrings.

Each family gets a slow reference implementation in this file, written from the arithmetic
its module docstring documents: loops over the scale groups (vectorised over rows only),
with its own packing (a bit string), its own float16 / bfloat16 / fp8 / E2M1 rounding
(tables decoded from the bit fields, nearest value with ties to the even code), and no
call into the library except to read the result. Library and reference run on random
weights of awkward shapes (a single weight, rows shorter than a group, a partial last
group, 577 columns) and awkward contents (outliers, all-zero rows and groups, one-signed
groups, tiny and huge values, rows of very different magnitudes); codes, scales, zero
points and dequantized weights must agree exactly.

Where the reference does a step in float32 it is because the format defines the step in
float32 (weights are float32, scales are computed in float32 and then rounded to their
stored type); doing those in float64 would round differently in rare cases and the
library would then be right and the reference wrong. Everything that is a property of the
exact mathematics (nearest value, error bounds, the NF4 code book) is checked in float64.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError, UnknownNameError
from lowbit.formats import get_format
from lowbit.formats.nf4 import DYNAMIC_CODE, NF4_CODE
from lowbit.formats.packing import unpack
from lowbit.qtensor import QTensor

# ---------------------------------------------------------------------------------------
# What each name means, written out by hand from the module docstrings. Drives both the
# references and the layout checks, so nothing below asks the library what a name means.
#   ("int", bits, symmetric, group size or None for one group per row, per_tensor)
#   ("nf4", block, double_quant)   ("fp8", variant, per_tensor)   ("mxfp4",)   ("float", dtype)
# ---------------------------------------------------------------------------------------
SPEC = {
    "int8": ("int", 8, True, None, False),
    "int8-tensor": ("int", 8, True, None, True),
    "int8-g128": ("int", 8, True, 128, False),
    "int8-asym-g32": ("int", 8, False, 32, False),
    "int4-g128": ("int", 4, False, 128, False),
    "int4-g32": ("int", 4, False, 32, False),
    "int4-sym-g128": ("int", 4, True, 128, False),
    "int4-ch": ("int", 4, False, None, False),
    "int4-tensor": ("int", 4, False, None, True),
    "int4-sym-tensor": ("int", 4, True, None, True),
    "int3-g128": ("int", 3, False, 128, False),
    "int2-g64": ("int", 2, False, 64, False),
    "int2-sym-g16": ("int", 2, True, 16, False),
    "int5-g7": ("int", 5, False, 7, False),
    "int6-sym-ch": ("int", 6, True, None, False),
    "int7-g1": ("int", 7, False, 1, False),
    "nf4": ("nf4", 64, False),
    "nf4-dq": ("nf4", 64, True),
    "nf4-g128": ("nf4", 128, False),
    "nf4-g16": ("nf4", 16, False),
    "nf4-dq-g128": ("nf4", 128, True),
    "fp8": ("fp8", "e4m3", False),
    "fp8-e4m3": ("fp8", "e4m3", False),
    "fp8-e5m2": ("fp8", "e5m2", False),
    "fp8-tensor": ("fp8", "e4m3", True),
    "fp8-e5m2-tensor": ("fp8", "e5m2", True),
    "mxfp4": ("mxfp4",),
    "bf16": ("float", torch.bfloat16),
    "fp16": ("float", torch.float16),
    "fp32": ("float", torch.float32),
}
INT_NAMES = [n for n, s in SPEC.items() if s[0] == "int"]
NF4_NAMES = [n for n, s in SPEC.items() if s[0] == "nf4"]
FP8_NAMES = [n for n, s in SPEC.items() if s[0] == "fp8"]
FLOAT_NAMES = [n for n, s in SPEC.items() if s[0] == "float"]

# The names the project promises (brief / EXAMPLE_NAMES) plus a few more awkward ones.
LAYOUT_NAMES = [
    "int8", "int8-tensor", "int8-g128", "int4-g128", "int4-g32", "int4-sym-g128", "int3-g128",
    "int2-g64", "int5-g7", "int4-tensor", "int6-sym-ch", "nf4", "nf4-dq", "nf4-g128",
    "nf4-dq-g128", "fp8", "fp8-e5m2", "fp8-tensor", "fp8-e5m2-tensor", "mxfp4", "bf16", "fp16", "fp32",
]  # fmt: skip

SHAPES = [(1, 1), (3, 7), (5, 130), (17, 577), (8, 256)]
KINDS = ["gaussian", "outliers", "zeros", "one_sided", "tiny", "mixed", "huge"]


def make_weight(shape: tuple[int, int], kind: str, seed: int) -> torch.Tensor:
    """A float32 weight with the given kind of awkwardness."""
    generator = torch.Generator().manual_seed(seed)
    rows, columns = shape
    w = torch.randn(shape, generator=generator) * 0.02
    if kind == "outliers":  # a few weights 25..75 standard deviations out
        n = max(1, w.numel() // 50)
        where = torch.randint(0, w.numel(), (n,), generator=generator)
        sign = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
        w.view(-1)[where] = sign * (0.5 + torch.rand(n, generator=generator))
    elif kind == "zeros":  # an all-zero row, an all-zero first group, an all-zero column run
        w[0] = 0
        w[-1, : min(columns, 64)] = 0
        w[:, columns // 2 : columns // 2 + 3] = 0
    elif kind == "one_sided":  # negative-only rows, positive-only rows
        w = w.abs()
        w[::2] = -w[::2]
    elif kind == "tiny":  # float16 scales of the integer formats become subnormal
        w = w * 1e-4
    elif kind == "mixed":  # rows of very different magnitudes
        w = w * torch.pow(10.0, torch.empty(rows, 1).uniform_(-5, 3, generator=generator))
    elif kind == "huge":  # integer scales saturate float16 (max 65504) at low bit widths
        w = w * 1e7
    else:
        assert kind == "gaussian"
    return w.contiguous()


def seed_of(*key) -> int:
    """A seed that is the same in every process (``hash`` of a str is salted per process)."""
    return zlib.crc32(repr(key).encode())


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    same = (a == e) | (a.isnan() & e.isnan())
    if not bool(same.all()):
        where = (~same).nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int((~same).sum())} of {same.numel()} differ; first at {where}: "
            f"{actual[tuple(where)].item()!r} vs expected {expected[tuple(where)].item()!r}"
        )


def reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Rows of codes -> bytes: code i at bits i*bits.., least significant first, rows padded.
    (One Python integer per row; tests/test_packing.py checks packing bit by bit.)"""
    n_bytes = -(-codes.shape[1] * bits // 8)
    out = []
    for row in codes.long().tolist():
        value = 0
        for code in reversed(row):
            assert 0 <= code < 2**bits
            value = (value << bits) | code
        out.append(list(value.to_bytes(n_bytes, "little")))
    return torch.tensor(out, dtype=torch.uint8).reshape(codes.shape[0], n_bytes)


def float16_saturating(x: torch.Tensor) -> torch.Tensor:
    """Round to float16 (numpy's IEEE round-to-nearest-even), saturating at ±65504 as base.py says."""
    clamped = np.clip(x.numpy().astype(np.float32), -65504.0, 65504.0)
    return torch.from_numpy(clamped.astype(np.float16).astype(np.float32))


def nearest_with_ties_to_even(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index into ``table`` (float64, ascending, non-negative) of the nearest entry to each of
    ``values`` (non-negative, at most table[-1]); an exact tie goes to the even index
    (for the fp8 and E2M1 tables below, index parity is the mantissa's last bit)."""
    v = values.double().reshape(-1)
    upper = torch.searchsorted(table, v).clamp(1, table.numel() - 1)  # table[upper-1] < v <= table[upper]
    lower = upper - 1
    to_lower, to_upper = v - table[lower], table[upper] - v
    tie_to_upper = (to_lower == to_upper) & (upper % 2 == 0)
    choice = torch.where((to_upper < to_lower) | tie_to_upper, upper, lower)
    return choice.reshape(values.shape)


# =======================================================================================
# Integer formats
# =======================================================================================
def reference_integer(w, bits, symmetric, group, per_tensor, ratio=None):
    """codes (rows, cols), scale (scale_rows, groups), zero or None, dequantized weight."""
    rows, columns = w.shape
    matrix = w.float().reshape(1, -1) if per_tensor else w.float()
    size = matrix.shape[1] if (per_tensor or group is None) else group
    n_groups = math.ceil(matrix.shape[1] / size)
    codes = torch.zeros(matrix.shape, dtype=torch.int64)
    dequantized = torch.zeros(matrix.shape)
    scales = torch.zeros(matrix.shape[0], n_groups)
    zeros = torch.zeros(matrix.shape[0], n_groups, dtype=torch.int64)
    levels = 2**bits - 1
    for g in range(n_groups):
        columns_g = slice(g * size, (g + 1) * size)
        x = matrix[:, columns_g]
        r = None if ratio is None else ratio.float()[:, g]
        if symmetric:
            half = 2 ** (bits - 1)
            absmax = x.abs().amax(1)
            if r is not None:
                absmax = absmax * r
            s = float16_saturating(absmax / (half - 1))
            divisor = torch.where(s == 0, torch.ones_like(s), s)
            q = torch.round(x / divisor[:, None]).clamp(-half, half - 1)
            codes[:, columns_g] = (q + half).long()
            dequantized[:, columns_g] = q * s[:, None]
        else:
            lo = torch.minimum(x.amin(1), torch.zeros(()))
            hi = torch.maximum(x.amax(1), torch.zeros(()))
            if r is not None:
                lo, hi = lo * r, hi * r
            s = float16_saturating((hi - lo) / levels)
            divisor = torch.where(s == 0, torch.ones_like(s), s)
            z = torch.round(-lo / divisor).clamp(0, levels)
            q = (torch.round(x / divisor[:, None]) + z[:, None]).clamp(0, levels)
            codes[:, columns_g] = q.long()
            zeros[:, g] = z.long()
            dequantized[:, columns_g] = (q - z[:, None]) * s[:, None]
        scales[:, g] = s
    return (
        codes.reshape(rows, columns),
        scales,
        None if symmetric else zeros,
        dequantized.reshape(rows, columns),
    )


def int_case(name):
    _, bits, symmetric, group, per_tensor = SPEC[name]
    return bits, symmetric, group, per_tensor


def check_integer_against_reference(name, w, ratio=None):
    bits, symmetric, group, per_tensor = int_case(name)
    fmt = get_format(name)
    q = fmt.quantize(w) if ratio is None else fmt.quantize(w, clip=ratio)
    codes, scales, zeros, dequantized = reference_integer(w, bits, symmetric, group, per_tensor, ratio)
    assert_same(unpack(q.parts["packed"], bits, w.shape[1]), codes.to(torch.uint8), f"{name} codes")
    assert_same(q.parts["packed"], reference_pack(codes, bits), f"{name} packed bytes")
    assert q.parts["scale"].dtype == torch.float16
    assert_same(q.parts["scale"].float(), scales, f"{name} scales")
    if symmetric:
        assert "zero" not in q.parts
    else:
        assert_same(q.parts["zero"], reference_pack(zeros, bits), f"{name} packed zero points")
    assert_same(q.dequantize(), dequantized, f"{name} dequantized")
    return q, scales


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", INT_NAMES)
def test_integer_matches_reference(name, shape, kind):
    if name == "int7-g1" and shape[1] > 130:
        pytest.skip("group size 1 on 577 columns only repeats the (3, 7) and (5, 130) cases slowly")
    w = make_weight(shape, kind, seed=seed_of(name, shape, kind))
    check_integer_against_reference(name, w)


@pytest.mark.parametrize("shape", [(3, 7), (5, 130), (17, 577)], ids=str)
@pytest.mark.parametrize("name", ["int8", "int8-tensor", "int4-g128", "int4-sym-g128", "int3-g128", "int5-g7", "int2-g64"])
def test_integer_clip_ratio_matches_reference(name, shape):
    _, _, group, per_tensor = int_case(name)
    w = make_weight(shape, "outliers", seed=5)
    fmt = get_format(name)
    groups = 1 if per_tensor else math.ceil(shape[1] / (group or shape[1]))
    expected_clip_shape = (1, 1) if per_tensor else (shape[0], groups)
    assert fmt.groups(shape).shape == expected_clip_shape
    ratio = torch.empty(expected_clip_shape).uniform_(0.5, 1.0, generator=torch.Generator().manual_seed(1))
    check_integer_against_reference(name, w, ratio)
    # groups(shape).sum sums a (rows, columns) error over exactly these groups
    error = torch.rand(shape, generator=torch.Generator().manual_seed(2))
    expected = torch.zeros(expected_clip_shape, dtype=torch.float64)
    for r in range(shape[0]):
        for c in range(shape[1]):
            index = (0, 0) if per_tensor else (r, c // (group or shape[1]))
            expected[index] += error[r, c].double()
    torch.testing.assert_close(fmt.groups(shape).sum(error).double(), expected, rtol=1e-5, atol=0)


def grid_error_bound(step: torch.Tensor, levels: int) -> torch.Tensor:
    """Largest |w' - w| for a weight inside its group's range: half a step, plus what the
    float16 rounding of the scale (at most 2**-11 of it, or 2**-25 for a subnormal one)
    can leave uncovered at the far end of ``levels`` steps. In float64."""
    rounding = torch.maximum(step * 2.0**-11 * (1 + 2.0**-10), torch.full_like(step, 2.0**-25))
    return (0.5 * step + levels * rounding) * (1 + 1e-9)


def step_per_weight(scale: torch.Tensor, shape, group, per_tensor) -> torch.Tensor:
    if per_tensor:
        return scale.double().expand(shape)
    size = group or shape[1]
    return scale.double().repeat_interleave(size, dim=1)[:, : shape[1]]


@pytest.mark.parametrize("kind", ["outliers", "tiny", "mixed", "one_sided"])
@pytest.mark.parametrize("name", INT_NAMES)
def test_integer_error_bound_in_exact_arithmetic(name, kind):
    """Every weight lands on the nearest point of the stored grid, up to the edge effect of
    the rounded scale: a property of the exact arithmetic, checked in float64."""
    bits, symmetric, group, per_tensor = int_case(name)
    w = make_weight((17, 577), kind, seed=11)
    q = get_format(name).quantize(w)
    error = (q.dequantize().double() - w.double()).abs()
    step = step_per_weight(q.parts["scale"], w.shape, group, per_tensor)
    levels = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
    bound = grid_error_bound(step, levels)
    assert bool((error <= bound).all()), f"worst excess {(error - bound).max().item()}"
    # and the rounding slack is not what makes it pass: where scales are normal float16
    # numbers, nearly every weight is within half a step
    normal = step >= 2.0**-14
    if bool(normal.any()):
        assert float((error[normal] <= 0.5 * step[normal] * (1 + 1e-6)).double().mean()) > 0.99


def test_integer_scale_saturates_instead_of_overflowing():
    w = torch.tensor([[-3.0e6, 1.0, 2.0e6, 0.5]])
    q = get_format("int2-g64").quantize(w)
    assert q.parts["scale"].float().item() == 65504.0  # (2e6 + 3e6) / 3 would overflow float16
    assert bool(q.dequantize().isfinite().all())
    q = get_format("int4-sym-g128").quantize(w)
    assert q.parts["scale"].float().item() == 65504.0  # 3e6 / 7


# =======================================================================================
# NF4 (and double quantization)
# =======================================================================================
# The published QLoRA NF4 values (bitsandbytes' get_4bit_type("nf4")).
NF4_PUBLISHED = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ]
)  # fmt: skip


def reference_dynamic_code() -> torch.Tensor:
    """The signed 8-bit dynamic code as nf4.py's docstring describes it, in float32."""
    values = [0.0, 1.0]
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (bounds[:-1] + bounds[1:]) / 2.0
        values += (10.0 ** (e - 6) * mids).tolist() + (-(10.0 ** (e - 6)) * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def nearest_lower_on_ties(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Number of decision points (midpoints of neighbouring code values) strictly below x."""
    midpoints = (code[:-1] + code[1:]) / 2
    return (x.unsqueeze(-1) > midpoints).sum(-1)


def reference_nf4(w, block, double_quant, ratio=None):
    rows, columns = w.shape
    n_blocks = math.ceil(columns / block)
    codes = torch.zeros(rows, columns, dtype=torch.int64)
    absmax = torch.zeros(rows, n_blocks)
    for b in range(n_blocks):
        columns_b = slice(b * block, (b + 1) * block)
        x = w[:, columns_b].float()
        a = x.abs().amax(1)
        if ratio is not None:
            a = a * ratio.float()[:, b]
        reciprocal = 1.0 / torch.where(a == 0, torch.ones_like(a), a)
        codes[:, columns_b] = nearest_lower_on_ties((x * reciprocal[:, None]).clamp(-1, 1), NF4_PUBLISHED)
        absmax[:, b] = a
    extra = {}
    stored_absmax = absmax
    if double_quant:
        dynamic = reference_dynamic_code()
        flat = absmax.reshape(-1)
        offset = flat.mean()
        centred = flat - offset
        scale_codes = torch.zeros(flat.numel(), dtype=torch.int64)
        chunk_scales = []
        dequantized_absmax = torch.zeros(flat.numel())
        for start in range(0, flat.numel(), 256):
            chunk = centred[start : start + 256]
            s = chunk.abs().max()
            reciprocal = 1.0 / (s if s != 0 else torch.ones(()))
            scale_codes[start : start + 256] = nearest_lower_on_ties((chunk * reciprocal).clamp(-1, 1), dynamic)
            dequantized_absmax[start : start + 256] = dynamic[scale_codes[start : start + 256]] * s + offset
            chunk_scales.append(s)
        extra = {
            "absmax_q": scale_codes.reshape(rows, n_blocks),
            "absmax_scale": torch.stack(chunk_scales),
            "absmax_offset": offset.reshape(1),
        }
        stored_absmax = dequantized_absmax.reshape(rows, n_blocks)
    block_of_column = torch.arange(columns) // block
    dequantized = NF4_PUBLISHED[codes] * stored_absmax[:, block_of_column]
    return codes, absmax, extra, dequantized


def test_nf4_code_book_is_the_published_one_and_normal_quantiles():
    assert_same(NF4_CODE, NF4_PUBLISHED, "NF4 code book")
    # QLoRA's construction: 8 positive and 7 negative quantiles of N(0, 1) between
    # 1 - offset and offset (offset = 0.9677083), plus 0, normalised to [-1, 1].
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9).double())[:-1]
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8).double())[:-1]
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    torch.testing.assert_close(NF4_PUBLISHED.double(), values / values.abs().max(), rtol=0, atol=1e-7)


def test_dynamic_code_structure():
    code = reference_dynamic_code()
    assert_same(DYNAMIC_CODE, code, "dynamic 8-bit code")
    assert code.numel() == 256 and bool((code[1:] > code[:-1]).all())
    assert code.max().item() == 1.0 and 0.0 in code.tolist()
    assert -1.0 < code.min().item() < -0.99


@pytest.mark.parametrize("kind", ["gaussian", "outliers", "zeros", "one_sided", "tiny", "mixed", "huge"])
@pytest.mark.parametrize("shape", SHAPES + [(300, 64)], ids=str)
@pytest.mark.parametrize("name", NF4_NAMES)
def test_nf4_matches_reference(name, shape, kind):
    _, block, double_quant = SPEC[name]
    w = make_weight(shape, kind, seed=seed_of(name, shape, kind))
    q = get_format(name).quantize(w)
    codes, absmax, extra, dequantized = reference_nf4(w, block, double_quant)
    assert_same(unpack(q.parts["packed"], 4, shape[1]), codes.to(torch.uint8), f"{name} codes")
    assert_same(q.parts["packed"], reference_pack(codes, 4), f"{name} packed bytes")
    if double_quant:
        assert "absmax" not in q.parts
        assert_same(q.parts["absmax_q"], extra["absmax_q"].to(torch.uint8), f"{name} scale codes")
        assert_same(q.parts["absmax_scale"], extra["absmax_scale"], f"{name} scale of scales")
        assert_same(q.parts["absmax_offset"], extra["absmax_offset"], f"{name} offset")
        # the offset is the mean of all block scales (float32 summation vs float64)
        torch.testing.assert_close(
            q.parts["absmax_offset"].double(), absmax.double().mean().reshape(1), rtol=1e-5, atol=0
        )
    else:
        assert_same(q.parts["absmax"], absmax, f"{name} absmax")
    assert_same(q.dequantize(), dequantized, f"{name} dequantized")


def nf4_midpoint_block() -> tuple[torch.Tensor, list[int]]:
    """One block of 64 with absmax 1.0 (so w / absmax is exact) holding every decision point
    between neighbouring NF4 values, and the float32 numbers just above and below each."""
    midpoints = (NF4_PUBLISHED[:-1] + NF4_PUBLISHED[1:]) / 2
    above = torch.nextafter(midpoints, torch.full_like(midpoints, 2.0))
    below = torch.nextafter(midpoints, torch.full_like(midpoints, -2.0))
    w = torch.zeros(1, 64)
    w[0, 0] = 1.0
    w[0, 1:16], w[0, 16:31], w[0, 31:46] = midpoints, above, below
    expected = [15] + list(range(15)) + list(range(1, 16)) + list(range(15)) + [7] * 18
    return w, expected


def test_nf4_midpoints_go_to_the_lower_code():
    w, expected = nf4_midpoint_block()
    q = get_format("nf4").quantize(w)
    assert unpack(q.parts["packed"], 4, 64)[0].tolist() == expected


@pytest.mark.parametrize("name", ["nf4", "nf4-g128", "nf4-g16"])
def test_nf4_codes_are_nearest_in_exact_arithmetic(name):
    """Each code is the NF4 value nearest to w/absmax (float64), up to float32 rounding."""
    _, block, _ = SPEC[name]
    w = make_weight((17, 577), "outliers", seed=3)
    q = get_format(name).quantize(w)
    codes = unpack(q.parts["packed"], 4, 577).long()
    absmax = q.parts["absmax"].double()[:, torch.arange(577) // block]
    x = w.double() / absmax
    distance = (x.unsqueeze(-1) - NF4_PUBLISHED.double()).abs()
    chosen = distance.gather(-1, codes.unsqueeze(-1)).squeeze(-1)
    assert bool((chosen <= distance.min(-1).values + 1e-6).all())


@pytest.mark.parametrize("shape", [(5, 130), (17, 577)], ids=str)
@pytest.mark.parametrize("name", ["nf4", "nf4-g128"])
def test_nf4_clip_ratio_matches_reference(name, shape):
    _, block, _ = SPEC[name]
    fmt = get_format(name)
    assert fmt.groups(shape).shape == (shape[0], math.ceil(shape[1] / block))
    w = make_weight(shape, "outliers", seed=8)
    ratio = torch.empty(fmt.groups(shape).shape).uniform_(0.5, 1, generator=torch.Generator().manual_seed(3))
    q = fmt.quantize(w, clip=ratio)
    codes, absmax, _, dequantized = reference_nf4(w, block, False, ratio)
    assert_same(unpack(q.parts["packed"], 4, shape[1]), codes.to(torch.uint8), "codes")
    assert_same(q.parts["absmax"], absmax, "clipped absmax")
    assert_same(q.dequantize(), dequantized, "dequantized")


def test_nf4_double_quant_scale_error_is_within_half_a_code_step():
    """|dequantized absmax - absmax| <= scale of its chunk * (largest gap of the code) / 2."""
    w = make_weight((300, 640), "mixed", seed=4)
    fmt = get_format("nf4-dq")
    q = fmt.quantize(w)
    exact = w.reshape(300, 10, 64).abs().amax(-1).reshape(-1).double()
    code = reference_dynamic_code().double()
    codes = q.parts["absmax_q"].reshape(-1).long()
    chunk_scale = q.parts["absmax_scale"].double().repeat_interleave(256)[: codes.numel()]
    stored = code[codes] * chunk_scale + q.parts["absmax_offset"].double()
    largest_gap = (code[1:] - code[:-1]).max()
    assert bool(((stored - exact).abs() <= chunk_scale * largest_gap / 2 * (1 + 1e-5) + 1e-12).all())


# --- NF4 against bitsandbytes -----------------------------------------------------------
@pytest.fixture(scope="module")
def bnb_functional():
    return pytest.importorskip(
        "bitsandbytes.functional", reason="bitsandbytes is not installed: NF4 is not compared with it"
    )


def bnb_codes(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """bitsandbytes packs the flattened tensor two codes a byte, the FIRST in the HIGH nibble."""
    flat = packed.reshape(-1)
    return torch.stack((flat >> 4, flat & 0x0F), dim=-1).reshape(shape)


BNB_SHAPES = [(1, 64), (3, 192), (17, 640), (40, 1024)]


def test_nf4_code_book_matches_bitsandbytes(bnb_functional):
    F = bnb_functional
    assert_same(NF4_CODE, F.get_4bit_type("nf4", device="cpu"), "NF4 code book vs get_4bit_type")
    _, state = F.quantize_4bit(torch.randn(2, 64), blocksize=64, quant_type="nf4")
    assert_same(NF4_CODE, state.code, "NF4 code book vs QuantState.code")


def test_dynamic_code_matches_bitsandbytes(bnb_functional):
    assert_same(DYNAMIC_CODE, bnb_functional.create_dynamic_map(signed=True), "dynamic code")


@pytest.mark.parametrize("kind", ["gaussian", "outliers", "zeros", "one_sided", "mixed"])
@pytest.mark.parametrize("shape", BNB_SHAPES, ids=str)
@pytest.mark.parametrize(("name", "block"), [("nf4", 64), ("nf4-g128", 128), ("nf4-g32", 32)])
def test_nf4_matches_bitsandbytes(bnb_functional, name, block, shape, kind):
    F = bnb_functional
    if shape[1] % block:
        pytest.skip("bitsandbytes blocks the flattened tensor: rows must be whole blocks to compare")
    w = make_weight(shape, kind, seed=seed_of(shape, kind))
    q = get_format(name).quantize(w)
    packed, state = F.quantize_4bit(w, blocksize=block, quant_type="nf4", compress_statistics=False)
    assert_same(unpack(q.parts["packed"], 4, shape[1]), bnb_codes(packed, shape), "4-bit codes")
    assert_same(q.parts["absmax"].reshape(-1), state.absmax, "absmax")
    assert_same(q.dequantize(), F.dequantize_4bit(packed, state), "dequantized")


def test_nf4_midpoints_match_bitsandbytes(bnb_functional):
    w, _ = nf4_midpoint_block()
    packed, _ = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert_same(unpack(get_format("nf4").quantize(w).parts["packed"], 4, 64), bnb_codes(packed, (1, 64)), "codes")


@pytest.mark.parametrize("shape", [(3, 192), (17, 640), (64, 1024), (300, 1024)], ids=str)
@pytest.mark.parametrize("kind", ["gaussian", "outliers", "mixed"])
def test_nf4_double_quant_matches_bitsandbytes(bnb_functional, shape, kind):
    F = bnb_functional
    w = make_weight(shape, kind, seed=seed_of(shape, kind, "dq"))
    q = get_format("nf4-dq").quantize(w)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert_same(unpack(q.parts["packed"], 4, shape[1]), bnb_codes(packed, shape), "4-bit codes")
    assert_same(q.parts["absmax_offset"].reshape(()), state.offset.reshape(()), "offset")
    assert_same(q.parts["absmax_scale"], state.state2.absmax, "scale of the block scales")
    assert_same(DYNAMIC_CODE, state.state2.code, "dynamic code")
    ours = q.parts["absmax_q"].reshape(-1).long()
    theirs = state.absmax.reshape(-1).long()
    differ = ours != theirs
    # bitsandbytes' CPU path finds the 8-bit code with an approximate table search; lowbit
    # takes the nearest. They must agree almost everywhere and differ by one step, except
    # in the finest decades near 0 (code values under 1e-4 apart) where bitsandbytes can be
    # a few steps off (seen: 2 steps at -2.3e-6, between -3.25e-6 and -2.1e-5).
    code = reference_dynamic_code().double()
    assert int(differ.sum()) <= 0.01 * ours.numel()
    one_step = (ours - theirs).abs() <= 1
    near_zero = (code[ours] - code[theirs]).abs() < 1e-4
    assert bool((one_step | near_zero).all())
    if bool(differ.any()):  # where they differ, lowbit's code is at least as near (float64)
        exact = w.reshape(shape[0], -1, 64).abs().amax(-1).reshape(-1).double()
        scale = q.parts["absmax_scale"].double().repeat_interleave(256)[: ours.numel()]
        target = (exact - q.parts["absmax_offset"].double()) / scale
        d_ours = (code[ours[differ]] - target[differ]).abs()
        d_theirs = (code[theirs[differ]] - target[differ]).abs()
        assert bool((d_ours <= d_theirs + 1e-6).all())
    # dequantized weights are identical in every block whose scale code agrees
    same_block = (~differ).reshape(shape[0], -1, 1)
    ours_w = q.dequantize().reshape(shape[0], -1, 64)
    theirs_w = F.dequantize_4bit(packed, state).reshape(shape[0], -1, 64)
    assert_same(torch.where(same_block, ours_w, 0), torch.where(same_block, theirs_w, 0), "dequantized")


# =======================================================================================
# FP8
# =======================================================================================
FP8_LAYOUT = {"e4m3": (3, 7, torch.float8_e4m3fn, 448.0), "e5m2": (2, 15, torch.float8_e5m2, 57344.0)}


def fp8_table(variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit patterns 0..127 of the finite non-negative values and their values, decoded from
    the fields: E4M3 (fn) has no infinities and S.1111.111 is NaN; E5M2 is IEEE-like."""
    mantissa_bits, bias, _, _ = FP8_LAYOUT[variant]
    codes, values = [], []
    for code in range(128):
        exponent, mantissa = code >> mantissa_bits, code & ((1 << mantissa_bits) - 1)
        if variant == "e4m3" and exponent == 15 and mantissa == 7:
            continue
        if variant == "e5m2" and exponent == 31:
            continue
        if exponent == 0:
            value = mantissa / 2**mantissa_bits * 2.0 ** (1 - bias)
        else:
            value = (1 + mantissa / 2**mantissa_bits) * 2.0 ** (exponent - bias)
        codes.append(code)
        values.append(value)
    return torch.tensor(codes), torch.tensor(values, dtype=torch.float64)


def reference_fp8(w, variant, per_tensor, ratio=None):
    _, _, _, limit = FP8_LAYOUT[variant]
    codes_table, values_table = fp8_table(variant)
    w = w.float()
    absmax = w.abs().amax().reshape(1, 1) if per_tensor else w.abs().amax(1, keepdim=True)
    if ratio is not None:
        absmax = absmax * ratio.float()
    scale = absmax / limit
    x = (w / torch.where(scale == 0, torch.ones_like(scale), scale)).clamp(-limit, limit)
    index = nearest_with_ties_to_even(x.abs(), values_table)
    codes = codes_table[index] | (torch.signbit(x).long() << 7)
    dequantized = (values_table[index].float() * torch.where(torch.signbit(x), -1.0, 1.0)) * scale
    return codes.to(torch.uint8), scale, dequantized


@pytest.mark.parametrize("variant", ["e4m3", "e5m2"])
def test_fp8_table_decodes_like_torch(variant):
    codes, values = fp8_table(variant)
    _, _, dtype, limit = FP8_LAYOUT[variant]
    assert values.max().item() == limit
    decoded = codes.to(torch.uint8).view(dtype).double()
    assert_same(decoded, values, f"{variant} decode")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", FP8_NAMES)
def test_fp8_matches_reference(name, shape, kind):
    _, variant, per_tensor = SPEC[name]
    w = make_weight(shape, kind, seed=seed_of(name, shape, kind))
    q = get_format(name).quantize(w)
    codes, scale, dequantized = reference_fp8(w, variant, per_tensor)
    assert_same(q.parts["data"], codes, f"{name} fp8 bit patterns")
    assert q.parts["scale"].dtype == torch.float32
    assert_same(q.parts["scale"], scale, f"{name} scale")
    assert_same(q.dequantize(), dequantized, f"{name} dequantized")
    # and against torch's own float8 cast of w / scale (clamped to the finite range first)
    _, _, dtype, limit = FP8_LAYOUT[variant]
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale)
    torch_cast = (w / divisor).clamp(-limit, limit).to(dtype).float() * scale
    assert_same(q.dequantize(), torch_cast, f"{name} vs torch float8 cast")


@pytest.mark.parametrize("name", FP8_NAMES)
def test_fp8_clip_ratio_and_saturation(name):
    _, variant, per_tensor = SPEC[name]
    _, _, dtype, limit = FP8_LAYOUT[variant]
    fmt = get_format(name)
    shape = (6, 50)
    assert fmt.groups(shape).shape == ((1, 1) if per_tensor else (6, 1))
    w = make_weight(shape, "outliers", seed=12)
    ratio = torch.full(fmt.groups(shape).shape, 0.5)
    q = fmt.quantize(w, clip=ratio)
    codes, _, dequantized = reference_fp8(w, variant, per_tensor, ratio)
    assert_same(q.parts["data"], codes, "clipped codes")
    assert_same(q.dequantize(), dequantized, "clipped dequantized")
    # everything beyond half the range saturates to exactly ±limit * scale, never inf / NaN
    big = w.abs() >= (w.abs().amax() if per_tensor else w.abs().amax(1, keepdim=True)) * 0.5
    assert bool(big.any())
    values = q.parts["data"].view(dtype).float()
    assert bool((values[big].abs() == limit).all())
    max_pattern = 0x7E if variant == "e4m3" else 0x7B  # 0.1111.110 = 448, 0.11110.11 = 57344
    assert set(q.parts["data"][big].tolist()) <= {max_pattern, max_pattern | 0x80}
    assert bool(q.dequantize().isfinite().all())
    # without clipping the largest weight of each row (or of the tensor) is exactly ±limit
    q = fmt.quantize(w)
    values = q.parts["data"].view(dtype).float()
    largest = values.abs().amax() if per_tensor else values.abs().amax(1)
    assert bool((largest == limit).all())


# =======================================================================================
# MXFP4
# =======================================================================================
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def exact_floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) exactly, from the float's exponent field (a = m * 2**e, 0.5 <= m < 1)."""
    _, e = torch.frexp(a)
    return torch.where(a == 0, torch.full_like(e, -1000), e - 1).long()


def reference_mxfp4(w):
    rows, columns = w.shape
    n_blocks = math.ceil(columns / 32)
    codes = torch.zeros(rows, columns, dtype=torch.int64)
    exponents = torch.zeros(rows, n_blocks, dtype=torch.int64)
    dequantized = torch.zeros(rows, columns)
    for b in range(n_blocks):
        columns_b = slice(b * 32, (b + 1) * 32)
        x = w[:, columns_b].double()
        shared = (exact_floor_log2(x.abs().amax(1).float()) - 2).clamp(-127, 127)
        scale = torch.pow(2.0, shared.double())[:, None]
        scaled = (x / scale).clamp(-6, 6)
        index = nearest_with_ties_to_even(scaled.abs(), E2M1)
        negative = scaled < 0
        codes[:, columns_b] = index | (negative.long() << 3)
        exponents[:, b] = shared + 127
        dequantized[:, columns_b] = (torch.where(negative, -E2M1[index], E2M1[index]) * scale).float()
    return codes, exponents, dequantized


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES + [(4, 33)], ids=str)
def test_mxfp4_matches_reference(shape, kind):
    w = make_weight(shape, kind, seed=seed_of(shape, kind, "mx"))
    q = get_format("mxfp4").quantize(w)
    codes, exponents, dequantized = reference_mxfp4(w)
    assert_same(unpack(q.parts["packed"], 4, shape[1]), codes.to(torch.uint8), "E2M1 codes")
    assert_same(q.parts["packed"], reference_pack(codes, 4), "packed bytes")
    assert_same(q.parts["exponent"], exponents.to(torch.uint8), "E8M0 exponents")
    assert_same(q.dequantize(), dequantized, "dequantized")


@pytest.mark.parametrize("power", [-20, -7, -3, 0, 5, 30])
def test_mxfp4_ties_go_to_even_and_saturate_at_6(power):
    """A block whose largest magnitude is 4 * 2**power has shared exponent ``power``; values
    exactly halfway between E2M1 neighbours take the neighbour whose mantissa bit is 0."""
    halfway = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0}
    beyond = {7.5: 6.0, 6.5: 6.0}  # above 6 but below 8 * 2**power: saturates to 6
    exact = {0.5: 0.5, 1.5: 1.5, 3.0: 3.0, 6.0: 6.0, 0.0: 0.0}
    pairs = [(4.0, 4.0), *halfway.items(), *exact.items()]
    for t, expected in list(pairs):
        if t:
            pairs.append((-t, -expected))
    # just off a tie, rounding follows the side it is on
    pairs += [(float(np.nextafter(np.float32(2.5), np.float32(3))), 3.0)]
    pairs += [(float(np.nextafter(np.float32(0.75), np.float32(0))), 0.5)]
    scale = 2.0**power
    inputs = [t * scale for t, _ in pairs]
    expected = [e * scale for _, e in pairs]
    saturating = [(t * scale, e * scale) for t, e in beyond.items()]
    block1 = torch.tensor([inputs + [0.0] * (32 - len(inputs))], dtype=torch.float32)
    block2 = torch.tensor([[saturating[0][0], saturating[1][0], -saturating[0][0]] + [0.0] * 29])
    w = torch.cat([block1, block2], dim=1)
    q = get_format("mxfp4").quantize(w)
    assert q.parts["exponent"].tolist() == [[power + 127, power + 127]]
    got = q.dequantize()[0]
    assert got[: len(expected)].tolist() == expected
    assert got[32:35].tolist() == [6.0 * scale, 6.0 * scale, -6.0 * scale]
    assert bool((got[len(expected) : 32] == 0).all())


def test_mxfp4_exponent_range_is_clamped():
    w = torch.zeros(2, 64)
    w[0, 0] = 3.0e38  # floor(log2) = 127 -> 125
    w[1, 32] = 1e-40  # subnormal: floor(log2) = -133 -> clamped to -127
    q = get_format("mxfp4").quantize(w)
    assert q.parts["exponent"].tolist() == [[125 + 127, 0], [0, 0]]
    assert bool(q.dequantize().isfinite().all())


@pytest.mark.parametrize("power", [-3, 10])
def test_mxfp4_exponent_of_absmax_just_below_a_power_of_two(power):
    absmax = np.nextafter(np.float32(2.0**power), np.float32(0))  # 2**power * (1 - 2**-24)
    w = torch.zeros(1, 32)
    w[0, 0] = float(absmax)
    q = get_format("mxfp4").quantize(w)
    # floor(log2(absmax)) = power - 1, so the shared exponent is power - 3 and absmax / 2**(power-3)
    # = 8 - 2**-21 saturates to 6.
    assert q.parts["exponent"].item() == power - 3 + 127
    assert q.dequantize()[0, 0].item() == 6.0 * 2.0 ** (power - 3)


# =======================================================================================
# Plain floats
# =======================================================================================
def reference_bfloat16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 (as float32) by rounding the bit pattern to nearest even."""
    bits = x.float().contiguous().view(torch.int32).long() & 0xFFFFFFFF
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    rounded = torch.where(rounded >= 2**31, rounded - 2**32, rounded)
    return rounded.to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("kind", ["gaussian", "outliers", "zeros", "tiny", "mixed"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_float_formats_match_reference(name, shape, kind):
    w = make_weight(shape, kind, seed=seed_of(name, shape, kind))
    q = get_format(name).quantize(w)
    dtype = SPEC[name][1]
    assert list(q.parts) == ["data"] and q.parts["data"].dtype == dtype
    if name == "fp32":
        expected = w
    elif name == "bf16":
        expected = reference_bfloat16(w)
    else:
        expected = torch.from_numpy(w.numpy().astype(np.float16).astype(np.float32))
    assert_same(q.dequantize(), expected, f"{name} values")


# =======================================================================================
# Layout and exact sizes, for every name
# =======================================================================================
def documented_parts(name: str, shape: tuple[int, int]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Parts, dtypes and shapes as the module docstrings document them, computed by hand."""
    rows, columns = shape
    spec = SPEC[name]

    def ceil(a: int, b: int) -> int:
        return -(-a // b)

    if spec[0] == "int":
        _, bits, symmetric, group, per_tensor = spec
        groups = 1 if (per_tensor or group is None) else ceil(columns, group)
        scale_rows = 1 if per_tensor else rows
        parts = {
            "packed": (torch.uint8, (rows, ceil(columns * bits, 8))),
            "scale": (torch.float16, (scale_rows, groups)),
        }
        if not symmetric:
            parts["zero"] = (torch.uint8, (scale_rows, ceil(groups * bits, 8)))
        return parts
    if spec[0] == "nf4":
        _, block, double_quant = spec
        blocks = ceil(columns, block)
        parts = {"packed": (torch.uint8, (rows, ceil(columns, 2)))}
        if double_quant:
            parts["absmax_q"] = (torch.uint8, (rows, blocks))
            parts["absmax_scale"] = (torch.float32, (ceil(rows * blocks, 256),))
            parts["absmax_offset"] = (torch.float32, (1,))
        else:
            parts["absmax"] = (torch.float32, (rows, blocks))
        return parts
    if spec[0] == "fp8":
        return {"data": (torch.uint8, (rows, columns)), "scale": (torch.float32, (1, 1) if spec[2] else (rows, 1))}
    if spec[0] == "mxfp4":
        return {"packed": (torch.uint8, (rows, ceil(columns, 2))), "exponent": (torch.uint8, (rows, ceil(columns, 32)))}
    return {"data": (spec[1], (rows, columns))}


def documented_bytes(name, shape):
    return sum(math.prod(s) * torch.empty((), dtype=d).element_size() for d, s in documented_parts(name, shape).values())


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 130), (17, 577), (300, 64), (2, 4097)], ids=str)
@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_layout_and_exact_size(name, shape):
    fmt = get_format(name)
    w = make_weight(shape, "outliers", seed=21)
    original = w.clone()
    q = fmt.quantize(w)
    assert_same(w, original, "the input weight must not be modified")
    assert isinstance(q, QTensor)
    assert q.shape == shape and q.numel == shape[0] * shape[1]
    assert get_format(q.format_name) == fmt and q.format == fmt
    expected = documented_parts(name, shape)
    assert set(q.parts) == set(expected)
    for part, (dtype, part_shape) in expected.items():
        assert q.parts[part].dtype == dtype, f"{name}.{part} dtype"
        assert tuple(q.parts[part].shape) == part_shape, f"{name}.{part} shape"
    assert q.nbytes == documented_bytes(name, shape) == fmt.storage_bytes(shape)
    assert q.bits_per_weight == fmt.bits_per_weight(shape) == 8 * q.nbytes / (shape[0] * shape[1])
    # dequantize returns the requested dtype, the float32 values rounded once
    full = q.dequantize()
    assert full.dtype == torch.float32 and full.shape == shape
    assert_same(q.dequantize(torch.bfloat16), full.to(torch.bfloat16), "dequantize(bf16)")
    # half-precision inputs are quantized as their float32 values
    half = w.to(torch.bfloat16)
    q_half, q_float = fmt.quantize(half), fmt.quantize(half.float())
    for part in q_float.parts:
        assert_same(q_half.parts[part].view(torch.uint8), q_float.parts[part].view(torch.uint8), f"bf16 input {part}")


@pytest.mark.parametrize(("name", "bits"), [("int4-g128", 4), ("int3-g128", 3), ("int2-g64", 2), ("int5-g7", 5)])
def test_low_bit_codes_are_really_packed(name, bits):
    """No int8 storage pretending to be narrower: ceil(in*bits/8) bytes a row, and the bytes
    use all their bits (more than 2**bits distinct byte values on random weights)."""
    w = make_weight((64, 577), "gaussian", seed=1)
    packed = get_format(name).quantize(w).parts["packed"]
    assert packed.shape == (64, math.ceil(577 * bits / 8))
    assert len(set(packed.reshape(-1).tolist())) > 2**bits


def test_exact_bits_of_int4_g128():
    # 576 columns: 576 * 4 bits = 288 bytes of codes; 5 groups (4 full, one of 64):
    # 5 float16 scales = 10 bytes, 5 zero points of 4 bits packed per row = ceil(20 / 8) = 3 bytes.
    fmt = get_format("int4-g128")
    per_row = 288 + 10 + 3
    assert fmt.storage_bytes((576, 576)) == 576 * per_row == 173376
    q = fmt.quantize(make_weight((576, 576), "gaussian", seed=2))
    assert q.nbytes == 173376
    assert q.bits_per_weight == pytest.approx(8 * 301 / 576, abs=0) == 4 + (16 * 5 + 24) / 576


def test_exact_bits_of_small_shapes():
    # int3-g128 on (5, 130): ceil(390 / 8) = 49 code bytes, 2 scales = 4 bytes, 2 zeros of 3 bits = 1 byte
    assert get_format("int3-g128").storage_bytes((5, 130)) == 5 * (49 + 4 + 1)
    # int8 per channel: 1 byte a weight + one float16 scale a row, no zero point
    assert get_format("int8").bits_per_weight((4096, 4096)) == 8 + 16 / 4096
    # int8-tensor: one float16 scale in all
    assert get_format("int8-tensor").storage_bytes((3, 7)) == 21 + 2
    # int4-tensor (asymmetric): one scale and one 4-bit zero point, in a byte of its own
    assert get_format("int4-tensor").storage_bytes((3, 7)) == 3 * 4 + 2 + 1
    # fp8 per channel: a byte a weight + a float32 scale a row
    assert get_format("fp8").bits_per_weight((4096, 4096)) == 8 + 32 / 4096
    # mxfp4: 4 bits + an 8-bit exponent per 32
    assert get_format("mxfp4").bits_per_weight((64, 4096)) == 4.25


@pytest.mark.parametrize("shape", [(1, 64), (3, 128), (17, 640), (4096, 4096)], ids=str)
def test_nf4_is_4_5_bits(shape):
    assert get_format("nf4").bits_per_weight(shape) == 4.5  # 4 + 32 bits of absmax / 64


def test_nf4_dq_saves_0_373_bits():
    shape = (4096, 4096)
    blocks = 4096 * 4096 // 64
    nf4, nf4_dq = get_format("nf4"), get_format("nf4-dq")
    assert nf4.storage_bytes(shape) == 4096 * 2048 + 4 * blocks
    assert nf4_dq.storage_bytes(shape) == 4096 * 2048 + blocks + 4 * math.ceil(blocks / 256) + 4
    saving = nf4.bits_per_weight(shape) - nf4_dq.bits_per_weight(shape)
    assert 0.37 < saving < 0.38
    # and on a quantized matrix, the bytes held are those
    w = make_weight((256, 1024), "gaussian", seed=3)
    saving = nf4.quantize(w).bits_per_weight - nf4_dq.quantize(w).bits_per_weight
    assert saving == pytest.approx((32 - 8 - 32 / 256) / 64 - 32 / (256 * 1024), abs=1e-12)


# =======================================================================================
# Idempotence and error ordering
# =======================================================================================
IDEMPOTENT_KINDS = ["gaussian", "outliers", "zeros", "one_sided", "mixed"]


@pytest.mark.parametrize("kind", IDEMPOTENT_KINDS)
@pytest.mark.parametrize(
    "name", ["int8", "int8-tensor", "int8-g128", "int4-sym-g128", "int2-sym-g16", "int6-sym-ch", "nf4", "nf4-g128", "nf4-g16"]
)
def test_symmetric_and_nf4_formats_are_idempotent(name, kind):
    """Quantizing a dequantized weight again gives it back exactly. Symmetric integers: the
    largest weight maps to ±(2**(b-1) - 1) steps, so the new max is that many stored scales
    and the same float16 scale comes back. NF4: the largest weight maps to ±1.0, so the
    absmax comes back, and every other value sits on its code. (Holds while float16 scales
    are normal numbers; "mixed" rows go down to 1e-7 so it is checked there only for NF4.)"""
    if kind == "mixed" and name.startswith("int"):
        pytest.skip("rows of 1e-7 give subnormal float16 scales, where rounding is coarser than a step")
    w = make_weight((17, 577), kind, seed=seed_of(name, kind))
    fmt = get_format(name)
    once = fmt.quantize(w).dequantize()
    again = fmt.quantize(once)
    assert_same(again.dequantize(), once, f"{name} requantized")
    first = fmt.quantize(w)
    for part in first.parts:
        assert_same(again.parts[part].view(torch.uint8), first.parts[part].view(torch.uint8), part)


@pytest.mark.parametrize("kind", ["gaussian", "outliers", "zeros", "one_sided"])
@pytest.mark.parametrize("name", ["int4-g128", "int4-g32", "int3-g128", "int2-g64", "int5-g7", "int8-asym-g32", "int4-ch"])
def test_asymmetric_requantization(name, kind):
    """Asymmetric formats are not exactly idempotent: when the float16 scale rounds *up*, the
    range [lo, hi] covers slightly fewer than 2**b - 1 steps, the top weight takes code
    2**b - 2, and the second pass sees a smaller range and picks a smaller scale. What holds:
    (1) every group whose codes (zero point included) reach 2**b - 1 comes back exactly;
    (2) elsewhere the second pass stays within its own error bound of the first."""
    bits, _, group, _ = int_case(name)
    levels = 2**bits - 1
    w = make_weight((17, 577), kind, seed=seed_of(name, kind))
    fmt = get_format(name)
    first = fmt.quantize(w)
    once = first.dequantize()
    second = fmt.quantize(once)
    twice = second.dequantize()
    size = group or 577
    n_groups = math.ceil(577 / size)
    codes = unpack(first.parts["packed"], bits, 577).long()
    zeros = unpack(first.parts["zero"], bits, n_groups).long()
    full_span = torch.zeros(17, n_groups, dtype=torch.bool)
    for g in range(n_groups):
        top = torch.maximum(codes[:, g * size : (g + 1) * size].amax(1), zeros[:, g])
        full_span[:, g] = top == levels
        rows = full_span[:, g]
        assert_same(twice[rows, g * size : (g + 1) * size], once[rows, g * size : (g + 1) * size], f"group {g}")
    assert full_span.float().mean() > 0.5, "the exact part of this test should cover most groups"
    step = step_per_weight(second.parts["scale"], (17, 577), group, False)
    assert bool(((twice.double() - once.double()).abs() <= grid_error_bound(step, levels)).all())


@pytest.mark.parametrize("kind", ["gaussian", "outliers", "mixed"])
def test_nf4_dq_requantization_keeps_codes(kind):
    """nf4-dq is not idempotent: the block scales are dequantized, their mean (the offset)
    moves, and the 8-bit scale codes move with it. What holds: in every block whose stored
    (dequantized) scale is positive, the 4-bit codes -- chosen with the exact block scale of
    the dequantized weight, which is that stored scale -- come back exactly; and the block
    scales stay within half a step of the dynamic code of the first ones.

    A stored scale is not always positive: a block whose absmax is tiny next to the others
    of its 256-block chunk ("mixed" rows span 1e-7..80) gets a scale error of up to half a
    code step times the chunk's scale, which can exceed the absmax and flip its sign. That is
    bitsandbytes' double quantization too (the dequantized weights equal its own)."""
    w = make_weight((33, 640), kind, seed=9)
    fmt = get_format("nf4-dq")
    first = fmt.quantize(w)
    once = first.dequantize()
    second = fmt.quantize(once)
    code = reference_dynamic_code().double()
    gap = (code[1:] - code[:-1]).max()

    def scale_of(q):  # the scale of each block's 256-block chunk
        return q.parts["absmax_scale"].double().repeat_interleave(256)[: 33 * 10].reshape(33, 10)

    def absmax_of(q):  # the block scales as stored (dequantized), float64
        return code[q.parts["absmax_q"].long()] * scale_of(q) + q.parts["absmax_offset"].double()

    positive = absmax_of(first) > 0
    if kind != "mixed":
        assert bool(positive.all())
    assert positive.float().mean() > 0.5
    codes_first = unpack(first.parts["packed"], 4, 640).reshape(33, 10, 64)
    codes_second = unpack(second.parts["packed"], 4, 640).reshape(33, 10, 64)
    assert_same(codes_second[positive], codes_first[positive], "4-bit codes")
    assert bool(((absmax_of(second) - absmax_of(first).abs()).abs() <= scale_of(second) * gap / 2 + 1e-6).all())


def test_error_decreases_with_bits():
    w = make_weight((128, 1024), "gaussian", seed=0)

    def mse(name):
        return (get_format(name).quantize(w).dequantize().double() - w.double()).square().mean().item()

    assert mse("int8") < mse("int4-g128") < mse("int3-g128") < mse("int2-g64")
    errors = [mse(f"int{bits}-g128") for bits in range(2, 9)]
    for more, fewer in zip(errors[1:], errors[:-1]):
        assert more * 2 < fewer  # one more bit halves the step: about 4x less squared error
    assert mse("int4-sym-g128") > mse("int4-g128") > mse("int4-g32")


# =======================================================================================
# Errors
# =======================================================================================
@pytest.mark.parametrize("name", ["int9", "nf5", "int1", "fp4", "mxfp8", "int4-g", "int4-gx", "q4_k", "", "fp8-e3m4"])
def test_unknown_format_names(name):
    with pytest.raises(LowbitError) as error:
        get_format(name)
    assert isinstance(error.value, UnknownNameError)
    message = str(error.value)
    assert repr(name) in message and "int{2..8}" in message and "nf4" in message


@pytest.mark.parametrize("name", ["int4-g0", "int4-g65537", "int8-g100000", "int3-sym-g0"])
def test_bad_group_sizes(name):
    with pytest.raises(LowbitError, match="group size"):
        get_format(name)


@pytest.mark.parametrize("name", ["int4-g1", "int4-g65536"])
def test_group_size_limits_are_inclusive(name):
    assert get_format(name).name == name


@pytest.mark.parametrize("name", ["nf4-g100", "nf4-g8", "nf4-g8192", "nf4-dq-g48"])
def test_bad_nf4_block_sizes(name):
    with pytest.raises(LowbitError, match="power of two"):
        get_format(name)


@pytest.mark.parametrize("name", ["nf4-g16", "nf4-g4096", "nf4-dq-g256"])
def test_nf4_block_size_limits(name):
    assert get_format(name).name == name


def test_mxfp4_has_no_variants():
    with pytest.raises(LowbitError, match="32"):
        get_format("mxfp4-g64")


def test_names_are_normalised():
    assert get_format(" INT4-G128 ") == get_format("int4-g128")
    assert get_format("fp8-e4m3") == get_format("fp8")
    assert get_format("int4-ch") == get_format("int4")
    assert get_format("nf4-g64") == get_format("nf4")


@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_bad_weights_raise(name):
    fmt = get_format(name)
    for weight in (torch.randn(8), torch.randn(2, 3, 64), torch.randint(-8, 8, (4, 64)), torch.zeros(4, 64, dtype=torch.uint8)):
        with pytest.raises(ValueError):
            fmt.quantize(weight)


@pytest.mark.parametrize("name", ["mxfp4", "bf16", "fp16", "fp32"])
def test_clip_ratio_refused_where_there_is_no_search(name):
    fmt = get_format(name)
    assert not fmt.supports_clip
    with pytest.raises(ValueError, match="clipping"):
        fmt.quantize(torch.randn(2, 64), clip=torch.ones(2, 2))
