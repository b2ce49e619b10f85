"""GGUF block formats against gguf-py (the GGUF reference library llama.cpp ships).

For every block type: our dequantization equals ``gguf.quants.dequantize`` bit for bit on
llama.cpp's own bytes and on random bytes; where gguf-py quantizes (Q8_0, Q4_0, Q4_1, Q5_0,
Q5_1) our bytes equal its bytes. Plus the Format plumbing: names, sizes, parts, columns,
errors. The comparison with llama.cpp's C code itself is ``test_gguf_blocks_ggml.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import format_from_spec, get_format
from lowbit.formats.gguf_blocks import BLOCK_TYPES, dequantize_ggml, quantize_ggml
from lowbit.formats.gguf_types import GGML_TYPES

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType

TYPES = list(BLOCK_TYPES)
#: the types gguf-py 0.19 quantizes (its others raise NotImplementedError)
GGUF_PY_QUANTIZES = {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"}


def awkward_matrix(type_name: str, seed: int = 0, rows: int = 9) -> torch.Tensor:
    """Rows of very different magnitudes (1e-30 .. 1e4), all-zero rows and blocks, negative
    zeros, a lone outlier, a constant block, an all-negative block; three blocks per row."""
    size = GGML_TYPES[type_name].block_size
    generator = torch.Generator().manual_seed(seed)
    columns = 3 * size
    magnitudes = torch.logspace(-30, 4, rows).float().unsqueeze(1)
    m = torch.randn(rows, columns, generator=generator) * magnitudes
    m[0] = 0
    m[1, :size] = -0.0
    m[2, 7] = 3e4
    m[3, size : 2 * size] = 0.25
    m[4, :size] = -m[4, :size].abs()
    m[5, size:] = m[5, size:].sign() * 1e-8
    m[6, : size // 2] = 0
    return m


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(
        a.float().contiguous().view(torch.int32),
        b.float().contiguous().view(torch.int32),
    )


def gguf_py_dequantize(type_name: str, raw: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return torch.from_numpy(np.asarray(gguf_quants.dequantize(raw.numpy(), GGMLQuantizationType[type_name]))).reshape(
        shape
    )


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_dequantize_equals_gguf_py_on_our_bytes(type_name, seed):
    m = awkward_matrix(type_name, seed)
    importance = torch.rand(m.shape[1], generator=torch.Generator().manual_seed(seed)) if seed else None
    raw = quantize_ggml(type_name, m, importance)
    assert raw.dtype == torch.uint8 and tuple(raw.shape) == (
        m.shape[0],
        get_format(f"gguf-{type_name.lower()}").storage_bytes(tuple(m.shape)) // m.shape[0],
    )
    ours = dequantize_ggml(type_name, raw, tuple(m.shape))
    assert same_bits(ours, gguf_py_dequantize(type_name, raw, tuple(m.shape)))
    # and the round trip is close: every type keeps the bulk of a random row
    typical = m[7:]
    assert (ours[7:] - typical).abs().max() <= 0.6 * typical.abs().max()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # gguf-py's numpy meets inf * 0 in the NaN cases
@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_equals_gguf_py_on_random_bytes(type_name):
    """Arbitrary bytes (every code and scale bit pattern) decode alike; float16 fields that
    are not finite are cleared first (they would make NaN on both sides)."""
    g = GGML_TYPES[type_name]
    raw = torch.randint(
        0,
        256,
        (5, 4 * g.block_bytes),
        generator=torch.Generator().manual_seed(3),
        dtype=torch.uint8,
    )
    shape = (5, 4 * g.block_size)
    ours = dequantize_ggml(type_name, raw, shape)
    theirs = gguf_py_dequantize(type_name, raw, shape)
    finite = torch.isfinite(theirs)
    assert torch.equal(finite, torch.isfinite(ours))
    assert same_bits(ours[finite], theirs[finite]) and finite.float().mean() > 0.5


@pytest.mark.parametrize("type_name", sorted(GGUF_PY_QUANTIZES & set(TYPES)))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantize_equals_gguf_py(type_name, seed):
    """Bit-exact, except that on a block of negative zeros (row 1) gguf-py's scale is +0.0
    where llama.cpp's C code (and ours, ``test_gguf_blocks_ggml.py``) writes -0.0: the same values."""
    m = awkward_matrix(type_name, seed)
    theirs = torch.from_numpy(np.asarray(gguf_quants.quantize(m.numpy(), GGMLQuantizationType[type_name])))
    ours = quantize_ggml(type_name, m)
    rows = [r for r in range(m.shape[0]) if r != 1]
    assert torch.equal(ours[rows], theirs[rows])
    shape = (1, m.shape[1])
    assert torch.equal(
        dequantize_ggml(type_name, ours[1:2], shape),
        dequantize_ggml(type_name, theirs[1:2], shape),
    )


@pytest.mark.parametrize("type_name", TYPES)
def test_format_parts_sizes_and_spec(type_name):
    fmt = get_format(f"gguf-{type_name.lower()}")
    assert fmt.name == f"gguf-{type_name.lower()}" and fmt.family == "gguf"
    assert format_from_spec(fmt.spec()) == fmt
    g = GGML_TYPES[type_name]
    shape = (3, 2 * g.block_size)
    m = awkward_matrix(type_name, 4)[6:, : shape[1]]
    q = fmt.quantize(m)
    assert list(q.parts) == ["blocks"] and q.parts["blocks"].dtype == torch.uint8
    assert q.parts["blocks"].numel() == fmt.storage_bytes(shape) == 3 * 2 * g.block_bytes
    assert fmt.bits_per_weight(shape) == g.bits_per_weight
    assert fmt.part_layout(shape) == {"blocks": ((3, 2 * g.block_bytes), torch.uint8)}
    assert torch.equal(q.parts["blocks"], quantize_ggml(type_name, m))
    assert same_bits(fmt.dequantize(q), dequantize_ggml(type_name, q.parts["blocks"], shape))
    codes, params = fmt.unpack(q.parts, shape)
    assert torch.equal(fmt.pack(codes, params)["blocks"], q.parts["blocks"])


@pytest.mark.parametrize("type_name", TYPES)
def test_encode_decode_any_columns(type_name):
    """GPTQ's use: params for the whole matrix, codes of a column slice (whole blocks, part of
    a block, one column); the nearest codes under the stored params never do worse than
    llama.cpp's own codes, and differ from them only where llama.cpp keeps its search's."""
    fmt = get_format(f"gguf-{type_name.lower()}")
    size = GGML_TYPES[type_name].block_size
    m = torch.randn(4, 3 * size, generator=torch.Generator().manual_seed(5))
    params = fmt.choose_params(m)
    codes = fmt.encode(m, params)
    whole = fmt.decode(codes, params)
    for cols in (slice(size, 3 * size), slice(1, size + 7), slice(size - 1, size), slice(2 * size, 2 * size + 1)):
        assert torch.equal(fmt.encode(m[:, cols], params, columns=cols), codes[:, cols])
        assert same_bits(fmt.fake_quantize(m[:, cols], params, columns=cols), whole[:, cols])
    reference = fmt.dequantize(fmt.quantize(m))
    assert ((whole - m) ** 2).sum() <= ((reference - m) ** 2).sum() * 1.0001
    assert ((whole - m) ** 2).sum() < ((m - m.mean()) ** 2).sum() / 4


@pytest.mark.parametrize("type_name", TYPES)
def test_refusals(type_name):
    fmt = get_format(f"gguf-{type_name.lower()}")
    size = GGML_TYPES[type_name].block_size
    with pytest.raises(ValueError, match="not a multiple"):
        fmt.quantize(torch.randn(2, size + 16))
    with pytest.raises(ValueError, match="not a multiple"):
        fmt.storage_bytes((2, size + 16))
    with pytest.raises(ValueError, match="clipping"):
        fmt.choose_params(torch.randn(2, size), clip=torch.ones(2, 1))
    with pytest.raises(ValueError, match="one weight per input column"):
        fmt.quantize(torch.randn(2, size), importance=torch.ones(size + 1))
    with pytest.raises(LowbitError, match="non-negative"):
        fmt.quantize(torch.randn(2, size), importance=-torch.ones(size))
    bad = torch.randn(2, size)
    bad[0, 0] = float("nan")
    with pytest.raises(LowbitError, match="NaN"):
        quantize_ggml(type_name, bad)
    with pytest.raises(ValueError, match="bytes"):
        dequantize_ggml(type_name, torch.zeros(7, dtype=torch.uint8), (1, size))


def test_geometry_table_matches_gguf_py():
    """``gguf_types`` (type ids, block sizes and bytes: what sizes and the writer use) is gguf-py's."""
    for name, ggml in GGML_TYPES.items():
        assert GGMLQuantizationType[name].value == ggml.type_id
        assert gguf_quants.GGML_QUANT_SIZES[GGMLQuantizationType[name]] == (ggml.block_size, ggml.block_bytes)


def test_names():
    assert get_format("GGUF-Q8_0") == get_format("gguf-q8_0")
    for name in ("gguf-q4_z", "gguf-q8", "gguf-", "gguf-q8_0-g32", "gguf:q4_k", "q4_k"):
        with pytest.raises(LowbitError, match=r"unknown format .*gguf-\{q8_0\|.*iq4_xs\}"):
            get_format(name)


#: a tiny Llama whose every linear input is a multiple of 256 (the K and IQ4_XS blocks)
K_SHAPED = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "head_dim": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


@pytest.mark.parametrize(("scheme", "peer"), [("gguf-q4_k", "int4-g32"), ("gguf-q8_0", "int8")])
def test_a_model_quantizes_saves_and_loads_bit_exactly(tmp_path, scheme, peer):
    """Through the pipeline, the native checkpoint and back; the logits move about as much
    as with lowbit's integer format of the same size."""
    from tiny_models import tiny_model, tiny_tokens

    import lowbit

    tokens = tiny_tokens()
    reference = tiny_model("llama", **K_SHAPED)(tokens).logits
    model = lowbit.quantize(tiny_model("llama", **K_SHAPED), scheme)
    logits = model(tokens).logits
    peer_error = (lowbit.quantize(tiny_model("llama", **K_SHAPED), peer)(tokens).logits - reference).abs().mean()
    assert 0 < (logits - reference).abs().mean() < 1.5 * peer_error
    lowbit.save(model, tmp_path / "out")
    assert torch.equal(lowbit.load(tmp_path / "out")(tokens).logits, logits)


def test_a_model_with_rows_off_the_block_is_a_clear_error():
    from tiny_models import tiny_model

    import lowbit

    with pytest.raises(LowbitError, match=r"blocks of 256: a row of 96 .*Q5_0 \(gguf-q5_0\)"):
        lowbit.quantize(tiny_model("llama"), "gguf-q4_k")
