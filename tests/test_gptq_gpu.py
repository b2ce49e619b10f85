"""GPTQ's Triton column loop (``lowbit.algorithms.gptq_cuda``) against the torch loop, on a GPU.

Where both loops cut the columns into the same lazy blocks (groups at least as wide as a
block, static groups, per channel, per tensor), the kernel must give the torch loop's codes
and rounded weights bit for bit on the same GPU; with dynamic groups narrower than a block
the kernel steps one group per call, so only float ties may differ. Skipped without CUDA
(CI has none): run on a GPU machine with ``python -m pytest tests/test_gptq_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch
from test_gptq import correlated_inputs, hessian_of, random_weight

from lowbit.algorithms import gptq
from lowbit.algorithms.gptq import GPTQConfig, gptq_quantize, on_kernel
from lowbit.formats import get_format


def paper(**options) -> GPTQConfig:
    """GPTQ as the paper and its reference run it (no act-order, no clip search) unless asked: what
    the column-by-column reference below computes."""
    return GPTQConfig(**{"act_order": False, "clip_search": False, **options})


pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SAME_BLOCKS = [
    ("int4-g128", paper()),
    ("int4-g128", paper(act_order=True)),
    ("int4-g32", paper(static_groups=True, block_size=48)),
    ("int3-sym-g64", paper(clip_search=True, block_size=64)),
    ("int8", paper()),
    ("int8-asym-g64", paper(block_size=64)),
    ("int4", paper(block_size=100)),
    ("int2-g256", paper(block_size=64)),
    ("int4-tensor", paper()),
]


def both_loops(name, config, shape, seed, monkeypatch):
    w = random_weight(shape, seed).cuda()
    h = hessian_of(correlated_inputs(4 * shape[1], shape[1], seed + 1, dead=(3,))).cuda()
    fmt = get_format(name)
    assert on_kernel(fmt, w, config)
    fast = gptq_quantize(w, h, fmt, config)
    monkeypatch.setattr(gptq, "on_kernel", lambda *args: False)
    slow = gptq_quantize(w, h, fmt, config)
    return fast, slow


@pytest.mark.parametrize("name,config", SAME_BLOCKS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SAME_BLOCKS)])
def test_kernel_is_the_torch_loop_bit_for_bit(name, config, monkeypatch):
    (fast, fast_rounded), (slow, slow_rounded) = both_loops(name, config, (77, 515), 5, monkeypatch)
    for part in slow.parts:
        assert torch.equal(fast.parts[part], slow.parts[part]), part
    assert torch.equal(fast_rounded, slow_rounded)
    assert torch.equal(fast.dequantize(), fast_rounded)


def test_narrow_dynamic_groups_differ_only_by_ties(monkeypatch):
    (fast, fast_rounded), (slow, _) = both_loops("int4-g32", paper(), (64, 300), 9, monkeypatch)
    assert torch.equal(fast.dequantize(), fast_rounded)
    differ = (fast.parts["packed"] != slow.parts["packed"]).any(1).sum()
    assert differ <= 3


def test_formats_off_the_integer_grid_keep_the_torch_loop():
    w = torch.zeros(4, 8, device="cuda")
    assert not on_kernel(get_format("nf4"), w, paper())
    assert not on_kernel(get_format("int4-g128"), w.cpu(), paper())
    assert not on_kernel(get_format("int4-g128"), w, paper(block_size=256))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_inputs_give_a_float32_hessian_close_to_float64(dtype):
    """The Hessian of 16-bit inputs is multiplied as 16-bit with float32 accumulation on the GPU
    (``statistics._gram``): near the float64 Gram matrix of the same values, and no overflow
    where the inputs' squares exceed the 16-bit range."""
    from lowbit.algorithms.statistics import HESSIAN, InputStatistics

    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(3000, 96, generator=generator) * 300).to(dtype)  # squares summed overflow fp16
    stats = InputStatistics(frozenset({HESSIAN}), 96)
    for part in x.cuda().split(1000):
        stats.add(part)
    exact = x.double().T @ x.double() / x.shape[0]
    got = stats.hessian.double().cpu()
    assert stats.hessian.dtype == torch.float32 and torch.isfinite(got).all()
    assert ((got - exact).abs().max() / exact.abs().max()).item() < 1e-4
