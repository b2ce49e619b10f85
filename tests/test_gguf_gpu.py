"""GGUF block quantization on a CUDA GPU writes the CPU's bytes (which are llama.cpp's:
``tests/test_gguf_blocks_ggml.py``), for every block type, with and without importance, on
random rows with outliers and an all-zero row. Skipped without CUDA (CI has none); run on
a GPU machine with ``python -m pytest tests/test_gguf_gpu.py``."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats.gguf_blocks import BLOCK_TYPES, quantize_ggml

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("name", sorted(BLOCK_TYPES))
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "importance"])
def test_gpu_bytes_are_the_cpu_bytes(name, weighted):
    generator = torch.Generator().manual_seed(len(name) + 7 * weighted)
    x = torch.randn(67, 2816, generator=generator) * 0.02
    x[::7, ::13] *= 12
    x[5] = 0
    importance = torch.rand(2816, generator=generator) if weighted else None
    cpu = quantize_ggml(name, x, importance)
    gpu = quantize_ggml(name, x.cuda(), None if importance is None else importance.cuda()).cpu()
    assert (cpu != gpu).any(1).sum() == 0
