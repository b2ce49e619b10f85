"""GGUF block formats against llama.cpp's own C code, byte for byte.

``scripts/ggml_quants_lib.sh`` compiles ``ggml/src/ggml-quants.c`` of the pinned
llama-cpp-python sdist into a small shared library (cached under ``~/.cache/lowbit/tools``;
a few seconds plus the sdist download the first time); these tests call its
``quantize_<type>(src, dst, nrow, n_per_row, quant_weights)``, the function
``llama-quantize`` calls (the reference path without importance, the weighted one with
it), and ``dequantize_row_<type>`` through ctypes, on awkward random tensors, and compare
with lowbit's torch code. Skipped (saying why) where the library cannot be built.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from test_gguf_blocks import awkward_matrix, same_bits

from lowbit.formats.gguf_blocks import BLOCK_TYPES, dequantize_ggml, quantize_ggml
from lowbit.formats.gguf_types import GGML_TYPES

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ggml_quants_lib.sh"
TYPES = list(BLOCK_TYPES)


@pytest.fixture(scope="module")
def ggml():
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build llama.cpp's ggml-quants.c")
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600, check=False)
    if done.returncode:
        pytest.skip(f"could not build ggml-quants ({SCRIPT.name}): {done.stderr.strip()[-300:]}")
    return ctypes.CDLL(done.stdout.strip().splitlines()[-1])


def c_name(type_name: str) -> str:
    """The C spelling in function names: ``q4_0``, ``q4_K``, ``iq4_xs``."""
    return type_name.lower().replace("_k", "_K")


def c_quantize(lib, type_name: str, m: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    g = GGML_TYPES[type_name]
    src = np.ascontiguousarray(m.numpy(), dtype=np.float32)
    rows, columns = src.shape
    dst = np.zeros((rows, columns // g.block_size * g.block_bytes), np.uint8)
    weights = None if importance is None else np.ascontiguousarray(importance.numpy(), dtype=np.float32)
    fn = getattr(lib, f"quantize_{c_name(type_name)}")
    fn.restype = ctypes.c_size_t
    fn.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    written = fn(
        src.ctypes.data,
        dst.ctypes.data,
        rows,
        columns,
        None if weights is None else weights.ctypes.data,
    )
    assert written == dst.size
    return torch.from_numpy(dst)


def c_dequantize(lib, type_name: str, raw: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    src = np.ascontiguousarray(raw.numpy())
    out = np.zeros(shape, np.float32)
    fn = getattr(lib, f"dequantize_row_{c_name(type_name)}")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn(src.ctypes.data, out.ctypes.data, out.size)
    return torch.from_numpy(out)


def importance_for(columns: int, seed: int) -> torch.Tensor:
    """imatrix-like: mean squares of activations, spread over decades, a few exact zeros."""
    g = torch.Generator().manual_seed(100 + seed)
    values = torch.exp(torch.randn(columns, generator=g) * 2)
    values[::17] = 0
    return values


@pytest.mark.parametrize("weighted", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_bytes_equal_llama_cpp(ggml, type_name, weighted):
    for seed in range(3):
        m = awkward_matrix(type_name, seed)
        importance = importance_for(m.shape[1], seed) if weighted else None
        ours = quantize_ggml(type_name, m, importance)
        theirs = c_quantize(ggml, type_name, m, importance)
        differing = (ours != theirs).any(1).nonzero().flatten().tolist()
        assert not differing, f"{type_name} seed {seed}: rows {differing} differ from llama.cpp"


@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_bytes_equal_llama_cpp_wide_rows(ggml, type_name):
    """A wider, plainer matrix (many blocks per row: the row statistics of the weighted path)."""
    g = torch.Generator().manual_seed(7)
    m = torch.randn(16, 2048, generator=g) * 0.02
    importance = importance_for(2048, 7)
    for weights in (None, importance):
        assert torch.equal(
            quantize_ggml(type_name, m, weights),
            c_quantize(ggml, type_name, m, weights),
        )


def extreme_cases() -> dict[str, torch.Tensor]:
    """Inputs where C's float corner cases decide the bytes: overflowing float16 scales,
    denormals, magnitudes from 1e-45 to 1e38 in one row (sums that overflow to inf and NaN,
    whose payloads reach the codes), exact ties of the rounding, constant and one-hot rows."""
    g = torch.Generator().manual_seed(1)
    return {
        "huge": torch.randn(6, 512, generator=g) * 1e6,
        "denormal": torch.randn(6, 512, generator=g) * 1e-40,
        "mixed": torch.randn(6, 512, generator=g) * torch.logspace(-45, 38, 512).float(),
        "integers": torch.randint(-8, 8, (6, 512), generator=g).float(),
        "halves": torch.randint(-64, 64, (6, 512), generator=g).float() / 2,
        "constant": torch.full((6, 512), 0.37),
        "one-hot": torch.zeros(6, 512).index_fill_(1, torch.tensor([3, 300]), 1.0),
    }


@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_bytes_equal_llama_cpp_extremes(ggml, type_name):
    g = torch.Generator().manual_seed(2)
    importances = {
        "none": None,
        "uniform": torch.rand(512, generator=g),
        "zeros": torch.zeros(512),
        "huge": torch.rand(512, generator=g) * 1e30,
        "small integers": torch.randint(0, 3, (512,), generator=g).float(),
    }
    differing = []
    for case, m in extreme_cases().items():
        for label, importance in importances.items():
            if not torch.equal(quantize_ggml(type_name, m, importance), c_quantize(ggml, type_name, m, importance)):
                differing.append((case, label))
    assert not differing


@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_equals_llama_cpp(ggml, type_name):
    g = GGML_TYPES[type_name]
    raw = torch.randint(
        0,
        256,
        (64, 3 * g.block_bytes),
        generator=torch.Generator().manual_seed(11),
        dtype=torch.uint8,
    )
    shape = (64, 3 * g.block_size)
    ours, theirs = (
        dequantize_ggml(type_name, raw, shape),
        c_dequantize(ggml, type_name, raw, shape),
    )
    # every bit of every number (infinities included); NaN where C has NaN (which NaN comes out
    # of an operation on two NaNs depends on the operand order the compiler picked)
    nan = torch.isnan(theirs)
    assert torch.equal(nan, torch.isnan(ours)) and same_bits(ours[~nan], theirs[~nan])
    assert not torch.isfinite(theirs).all()  # random float16 fields hold infinities or NaNs
    m = awkward_matrix(type_name, 5)
    raw = c_quantize(ggml, type_name, m, None)
    assert same_bits(
        dequantize_ggml(type_name, raw, tuple(m.shape)),
        c_dequantize(ggml, type_name, raw, tuple(m.shape)),
    )


@pytest.mark.heavy
@pytest.mark.parametrize("columns", [4096, 14336])
@pytest.mark.parametrize("type_name", TYPES)
def test_llama_3_8b_shaped_rows_equal_llama_cpp(ggml, type_name, columns):
    """Rows as wide as Llama-3-8B's (4096, and 14336 for down_proj), a few outlier columns,
    an imatrix spread over six decades: the row statistics of the weighted paths at scale."""
    g = torch.Generator().manual_seed(columns)
    m = torch.randn(256, columns, generator=g) * 0.02
    m[:, ::97] *= 40
    importance = torch.exp(torch.randn(columns, generator=g) * 3)
    for weights in (None, importance):
        assert torch.equal(quantize_ggml(type_name, m, weights), c_quantize(ggml, type_name, m, weights))


def test_library_is_cached_outside_the_checkout(ggml):
    path = Path(ggml._name)
    assert path.is_file() and Path(__file__).resolve().parents[1] not in path.parents
    assert os.access(path, os.R_OK)
