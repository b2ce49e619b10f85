"""Formats in parts (``choose_params``, ``encode``, ``decode``, ``pack``, ``unpack``,
``fake_quantize``, ``groups``, ``spec``) against their compositions and against the stored
bytes of the implementation they replaced.

The parts must compose to exactly what ``quantize`` / ``dequantize`` give, for every family
and variant, on awkward shapes (576-wide rows, partial groups, a single column, 4097
columns). ``test_stored_bytes_are_unchanged`` compares SHA-256 digests of every stored part
(and of the dequantized weight) with tests/data/format_digests.json, which was recorded
from the foundation's implementation (commit 3ed763e, one ``quantize`` call per format, run
on the same seeded cases of tests/format_cases.py before the formats were split into parts):
any change of the bytes a checkpoint stores fails it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch
from format_cases import FORMAT_NAMES, awkward_weight, clip_factors, digest_format

from lowbit.errors import LowbitError
from lowbit.formats import FORMAT_CLASSES, ScaleGroups, format_from_spec, get_format
from lowbit.formats.nf4 import NF4Format
from lowbit.qtensor import QTensor

PART_SHAPES = [(7, 576), (33, 100), (5, 1), (3, 4097)]
DIGESTS = json.loads((Path(__file__).parent / "data" / "format_digests.json").read_text())


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def same_parts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(same_bytes(a[name], b[name]) for name in a)


def param_tensors(fmt, params) -> dict[str, torch.Tensor]:
    """Every tensor of ``params`` as it is stored (NF4's exact ``absmax`` is not stored when
    double quantized, so it is left out there)."""
    out = {}
    for field in dataclasses.fields(params):
        value = getattr(params, field.name)
        if isinstance(value, dict):
            out.update({f"{field.name}.{k}": v for k, v in value.items()})
        elif value is not None and not (field.name == "absmax" and getattr(fmt, "double_quant", False)):
            out[field.name] = value
    return out


def column_blocks(columns: int, seed: int) -> list[slice]:
    """A random partition of ``range(columns)`` into blocks that start and end mid-group."""
    generator = torch.Generator().manual_seed(seed)
    cuts = torch.randint(1, max(columns, 2), (6,), generator=generator).tolist()
    edges = sorted({0, columns, *[c for c in cuts if c < columns]})
    return [slice(a, b) for a, b in itertools.pairwise(edges)]


def clips_for(fmt, shape, seed):
    return [None] + ([clip_factors(fmt.groups(shape).shape, seed)] if fmt.supports_clip else [])


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_parts_compose_to_quantize_and_dequantize(name):
    fmt = get_format(name)
    for index, shape in enumerate(PART_SHAPES):
        w = awkward_weight(shape, seed=index)
        for clip in clips_for(fmt, shape, index):
            params = fmt.choose_params(w, clip=clip)
            codes = fmt.encode(w, params)
            q = fmt.quantize(w, clip=clip)
            assert isinstance(q, QTensor) and q.format is fmt and q.format_name == fmt.name and q.shape == shape
            assert same_parts(fmt.pack(codes, params), q.parts)
            assert codes.shape == shape
            assert codes.dtype == (fmt.dtype if fmt.family == "float" else torch.uint8)
            # unpack inverts pack: the same codes and stored params, and packing them again
            # gives the same bytes
            codes_back, params_back = fmt.unpack(q.parts, shape)
            assert same_bytes(codes_back, codes)
            stored, stored_back = param_tensors(fmt, params), param_tensors(fmt, params_back)
            assert list(stored) == list(stored_back)
            assert all(same_bytes(stored[k].float(), stored_back[k].float()) for k in stored)
            assert same_parts(fmt.pack(codes_back, params_back), q.parts)
            # dequantize is decode of the unpacked parts, and equals decode of the chosen params
            full = fmt.decode(codes, params)
            assert full.dtype == torch.float32 and same_bytes(full, q.dequantize())
            assert same_bytes(fmt.decode(codes_back, params_back, dtype=torch.bfloat16), q.dequantize(torch.bfloat16))
            assert same_bytes(fmt.fake_quantize(w, params), full)
        # fake_quantize answers in the weight's dtype
        half = awkward_weight(shape, seed=index).to(torch.bfloat16)
        fake = fmt.fake_quantize(half, fmt.choose_params(half))
        assert same_bytes(fake, fmt.quantize(half).dequantize(torch.bfloat16))


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_column_blocks_use_the_full_matrix_params(name):
    """GPTQ rounds blocks of columns with params chosen for the whole matrix: encoding and
    decoding each block with ``columns`` gives the columns of the full-matrix result."""
    fmt = get_format(name)
    for index, shape in enumerate(PART_SHAPES):
        w = awkward_weight(shape, seed=10 + index)
        params = fmt.choose_params(w)
        codes = fmt.encode(w, params)
        full, fake = fmt.decode(codes, params), fmt.fake_quantize(w, params)
        for columns in column_blocks(shape[1], seed=index) + [slice(0, shape[1]), slice(shape[1] - 1, None)]:
            block = w[:, columns]
            assert same_bytes(fmt.encode(block, params, columns=columns), codes[:, columns]), columns
            assert same_bytes(fmt.decode(codes[:, columns], params, columns=columns), full[:, columns]), columns
            assert same_bytes(fmt.fake_quantize(block, params, columns=columns), fake[:, columns]), columns


@pytest.mark.parametrize("name", ["int4-g32", "nf4", "mxfp4"])
def test_bad_column_slices_raise(name):
    fmt = get_format(name)
    w = awkward_weight((4, 100), seed=1)
    params = fmt.choose_params(w)
    for block, columns in ((w[:, 0:50:2], slice(0, 50, 2)), (w[:, 10:30], slice(10, 40)), (w[:, -20:], slice(-20, None))):
        with pytest.raises(ValueError, match="columns"):
            fmt.encode(block, params, columns=columns)
        with pytest.raises(ValueError, match="columns"):
            fmt.decode(fmt.encode(block, params, columns=slice(0, block.shape[1])), params, columns=columns)


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_stored_bytes_are_unchanged(name):
    fmt = get_format(name)
    digests = digest_format(
        lambda w, clip: fmt.quantize(w, clip=clip).parts,
        lambda w, clip: fmt.quantize(w, clip=clip).dequantize(),
        (lambda shape: fmt.groups(shape).shape) if fmt.supports_clip else None,
    )
    assert digests == DIGESTS["digests"][name]


def test_digests_cover_every_case():
    assert DIGESTS["recorded_from"] == "3ed763e" and sorted(DIGESTS["digests"]) == sorted(FORMAT_NAMES)


# ---------------------------------------------------------------------------------------
# Scale-group geometry
# ---------------------------------------------------------------------------------------
def documented_group(name: str, shape: tuple[int, int]) -> tuple[int | None, bool]:
    """(columns per group or None for a whole row, per tensor), from the module docstrings."""
    if name.startswith("int"):
        grouping = name.split("-")[-1]
        return (int(grouping[1:]) if grouping.startswith("g") else None), grouping == "tensor"
    if name.startswith("nf4"):
        return (int(name.split("-g")[1]) if "-g" in name else 64), False
    if name.startswith("fp8"):
        return None, name.endswith("-tensor")
    assert name == "mxfp4"
    return 32, False


GROUPED_NAMES = [n for n in FORMAT_NAMES if get_format(n).family != "float"]


@pytest.mark.parametrize("name", GROUPED_NAMES)
def test_groups_shape_and_sum(name):
    fmt = get_format(name)
    for index, shape in enumerate([(7, 576), (33, 100), (5, 1), (3, 130)]):
        size, per_tensor = documented_group(name, shape)
        groups = fmt.groups(shape)
        assert isinstance(groups, ScaleGroups) and groups.per_tensor == per_tensor
        assert groups.group_size == (size or shape[1])
        error = torch.rand(shape, generator=torch.Generator().manual_seed(index), dtype=torch.float64)
        expected: dict[tuple[int, int], float] = {}
        for r in range(shape[0]):
            for c in range(shape[1]):
                key = (0, 0) if per_tensor else (r, c // (size or shape[1]))
                expected[key] = expected.get(key, 0.0) + error[r, c].item()
        rows, count = max(k[0] for k in expected) + 1, max(k[1] for k in expected) + 1
        assert groups.shape == (rows, count)
        reference = torch.tensor([[expected[(r, g)] for g in range(count)] for r in range(rows)], dtype=torch.float64)
        torch.testing.assert_close(groups.sum(error), reference, rtol=1e-12, atol=0)
        with pytest.raises(ValueError):
            groups.sum(error[:, :-1] if shape[1] > 1 else error[:-1])


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_float_formats_have_no_groups(name):
    with pytest.raises(ValueError, match="no scale groups"):
        get_format(name).groups((4, 64))


@pytest.mark.parametrize("name", ["int4-g128", "int8-tensor", "nf4", "fp8", "fp8-tensor"])
def test_clip_of_the_wrong_shape_raises(name):
    fmt = get_format(name)
    w = awkward_weight((6, 300), seed=2)
    rows, count = fmt.groups((6, 300)).shape
    with pytest.raises(ValueError, match="one factor per scale group"):
        fmt.choose_params(w, clip=torch.ones(rows, count + 1))


@pytest.mark.parametrize("name", ["int4-g128", "int8", "nf4-dq", "fp8-e5m2", "mxfp4", "bf16"])
def test_importance_is_refused_by_formats_that_do_not_use_it(name):
    fmt = get_format(name)
    w = awkward_weight((4, 64), seed=3)
    with pytest.raises(ValueError, match="does not take importance"):
        fmt.choose_params(w, importance=torch.ones(64))
    with pytest.raises(ValueError, match="does not take importance"):
        fmt.quantize(w, importance=torch.ones(64))


def test_nf4_dq_codes_use_the_exact_scale_and_decode_the_stored_one():
    """Double quantization changes the stored scales, not the codes (as bitsandbytes stores
    them): nf4-dq's codes are nf4's, and it decodes with the double-quantized scales."""
    w = awkward_weight((33, 640), seed=4)
    dq, plain = get_format("nf4-dq"), get_format("nf4")
    p_dq, p_plain = dq.choose_params(w), plain.choose_params(w)
    assert same_bytes(p_dq.absmax, p_plain.absmax) and p_plain.stored_absmax is p_plain.absmax
    assert not torch.equal(p_dq.stored_absmax, p_dq.absmax)
    assert same_bytes(dq.encode(w, p_dq), plain.encode(w, p_plain))
    expected = NF4Format._dequantize_scales(p_dq.scale_parts, (33, 10))
    assert same_bytes(p_dq.stored_absmax, expected)
    codes = dq.encode(w, p_dq)
    assert same_bytes(dq.decode(codes, p_dq), plain.decode(codes, dataclasses.replace(p_plain, stored_absmax=expected)))


# ---------------------------------------------------------------------------------------
# Typed specs
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_spec_round_trips_through_json(name):
    fmt = get_format(name)
    spec = fmt.spec()
    assert spec["family"] == fmt.family and spec["name"] == fmt.name == get_format(name).name
    assert {f.name for f in dataclasses.fields(fmt)} <= set(spec)
    again = format_from_spec(json.loads(json.dumps(spec)))
    assert again == fmt and hash(again) == hash(fmt) and again.spec() == spec


def test_spec_fields_by_family():
    assert get_format("int4-g128").spec() == {
        "family": "int", "name": "int4-g128", "bits": 4, "symmetric": False, "group_size": 128, "per_tensor": False,
    }  # fmt: skip
    assert get_format("nf4-dq").spec() == {"family": "nf4", "name": "nf4-dq", "block_size": 64, "double_quant": True}
    assert get_format("fp8-e5m2-tensor").spec() == {"family": "fp8", "name": "fp8-e5m2-tensor", "variant": "e5m2", "per_tensor": True}
    assert get_format("mxfp4").spec() == {"family": "mxfp4", "name": "mxfp4"}
    assert get_format("bf16").spec() == {"family": "float", "name": "bf16"}
    assert sorted(FORMAT_CLASSES) == ["float", "fp8", "gguf", "int", "mxfp4", "nf4"]


def _int_spec(**changes):
    return {**get_format("int4-g128").spec(), **changes}


@pytest.mark.parametrize(
    "spec",
    [
        "int4-g128",
        {"name": "int4-g128", "bits": 4},
        {**get_format("int4-g128").spec(), "family": "integer"},
        {k: v for k, v in get_format("int4-g128").spec().items() if k != "group_size"},
        {**get_format("int4-g128").spec(), "extra": 1},
        _int_spec(bits=9, name="int9-g128"),
        _int_spec(bits="4"),
        _int_spec(group_size=0, name="int4-g0"),
        _int_spec(per_tensor=True),
        _int_spec(per_tensor=True, name="int4-tensor"),
        _int_spec(name="int4-g64"),
        {**get_format("nf4").spec(), "block_size": 48, "name": "nf4-g48"},
        {**get_format("fp8").spec(), "variant": "e3m4", "name": "fp8-e3m4"},
        {"family": "float", "name": "fp64"},
        {"family": "float", "name": "BF16"},
        {"family": "mxfp4", "name": "mxfp4-g64"},
    ],
    ids=repr,
)
def test_bad_specs_raise(spec):
    with pytest.raises(LowbitError, match="spec"):
        format_from_spec(spec)


# ---------------------------------------------------------------------------------------
# QTensor holds the format object
# ---------------------------------------------------------------------------------------
def test_qtensor_holds_its_format():
    fmt = get_format("int3-g32")
    q = fmt.quantize(awkward_weight((5, 70), seed=5))
    assert q.format is fmt and q.format_name == "int3-g32"
    moved = q.to("cpu")
    assert moved.format is fmt and same_parts(moved.parts, q.parts)
    assert same_bytes(moved.dequantize(), fmt.decode(*fmt.unpack(q.parts, q.shape)))
    with pytest.raises(TypeError, match="Format object"):
        QTensor("int3-g32", (5, 70), q.parts)


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_part_layout_on_the_meta_device(name):
    fmt = get_format(name)
    for shape in PART_SHAPES:
        parts = fmt.quantize(awkward_weight(shape, seed=6)).parts
        assert fmt.part_layout(shape) == {k: (tuple(v.shape), v.dtype) for k, v in parts.items()}
