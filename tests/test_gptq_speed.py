"""GPTQ's speed-ups change no result.

- weights that share an input go through one column loop as a matrix of stacked rows
  (``gptq_quantize_stacked``): each comes out bit for bit as ``gptq_quantize`` makes it alone,
  for dynamic and static groups, act-order, the clip search, per-channel, NF4 and MXFP4, with
  awkward row counts and a partial last group; formats whose params couple rows are refused;
- the handler factorises each shared Hessian once and stacks q/k/v (and gate/up);
- the inverse-Hessian factor equals a float64 ``cholesky(inv(H + λI))``.

The float64 reference of the whole method is ``tests/test_gptq.py``.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.algorithms import GPTQConfig, handler_for
from lowbit.algorithms import gptq as gptq_module
from lowbit.algorithms.gptq import gptq_quantize, gptq_quantize_stacked, inverse_hessian_factor, prepare_hessian, stackable
from lowbit.formats import get_format
from test_gptq import correlated_inputs, hessian_of, random_weight


def paper(**options) -> GPTQConfig:
    """GPTQ as the paper and its reference run it (no act-order, no clip search) unless asked: what
    the column-by-column reference below computes."""
    return GPTQConfig(**{"act_order": False, "clip_search": False, **options})


CASES = [
    ("int4-g32", paper()),
    ("int3-sym-g16", paper(block_size=20)),
    ("int4-g32", paper(act_order=True, clip_search=True)),
    ("int4-g32", paper(static_groups=True)),
    ("int8", paper()),
    ("nf4-g16", paper(clip_search=True)),
    ("mxfp4", paper()),
]


@pytest.mark.parametrize("name,config", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_stacked_weights_come_out_as_each_alone(name, config):
    fmt = get_format(name)
    h = hessian_of(correlated_inputs(300, 100, 7, dead=(5,)))
    weights = [random_weight((rows, 100), seed) for rows, seed in ((7, 1), (5, 2), (9, 3))]
    prepared = prepare_hessian(h, config)
    stacked = gptq_quantize_stacked(weights, prepared, fmt, config)
    for weight, (qtensor, rounded) in zip(weights, stacked):
        alone, alone_rounded = gptq_quantize(weight, h, fmt, config)
        assert qtensor.shape == alone.shape and set(qtensor.parts) == set(alone.parts)
        for part in alone.parts:
            assert torch.equal(qtensor.parts[part], alone.parts[part]), part
        assert torch.equal(rounded, alone_rounded) and torch.equal(qtensor.dequantize(), rounded)


def test_formats_coupling_rows_are_not_stacked():
    assert stackable(get_format("int4-g128")) and stackable(get_format("nf4")) and stackable(get_format("int8"))
    assert not stackable(get_format("nf4-dq")) and not stackable(get_format("bf16"))
    h = hessian_of(correlated_inputs(64, 32, 9))
    with pytest.raises(ValueError, match="cannot share one GPTQ pass"):
        gptq_quantize_stacked([random_weight((4, 32), 1)] * 2, prepare_hessian(h), get_format("nf4-dq"))


class SharedBlock:
    """q, k and v reading one input (one statistics object), and o its own; no layer to run."""

    index, device, hidden, groups = 0, torch.device("cpu"), [torch.zeros(1)], ()

    def __init__(self, weights, hessians):
        self.weights = weights
        shared = type("Stats", (), {"hessian": hessians["qkv"]})()
        self.stats = {"q": shared, "k": shared, "v": shared, "o": type("Stats", (), {"hessian": hessians["o"]})()}

    def weight(self, name):
        return self.weights[name]

    def collect(self, kinds, names):
        return {name: self.stats[name] for name in names}

    def install(self, name, qtensor):
        pass


def test_handler_factorises_each_input_once_and_stacks(monkeypatch):
    calls = []
    original = gptq_module.inverse_hessian_factor
    monkeypatch.setattr(gptq_module, "inverse_hessian_factor", lambda *a, **k: calls.append(1) or original(*a, **k))
    weights = {"q": random_weight((12, 48), 1), "k": random_weight((6, 48), 2), "v": random_weight((6, 48), 3), "o": random_weight((48, 40), 4)}
    hessians = {"qkv": hessian_of(correlated_inputs(200, 48, 5)), "o": hessian_of(correlated_inputs(200, 40, 6))}
    config = paper(sequential=False)
    formats = {"q": get_format("int4-g16"), "k": get_format("int4-g16"), "v": get_format("int8"), "o": get_format("int4-g16")}
    out = handler_for(config)(config, SharedBlock(weights, hessians), formats)
    assert len(calls) == 2  # one per input, not one per weight
    for name, fmt in formats.items():
        expected = gptq_quantize(weights[name], hessians["o" if name == "o" else "qkv"], fmt, config)[0]
        assert all(torch.equal(out[name].parts[p], expected.parts[p]) for p in expected.parts), name


@pytest.mark.parametrize("columns", [17, 96])
def test_inverse_hessian_factor_matches_float64(columns):
    h = hessian_of(correlated_inputs(4 * columns, columns, columns))
    upper = inverse_hessian_factor(h, 0.01).double()
    damped = h.double() + 0.01 * h.double().diagonal().mean() * torch.eye(columns, dtype=torch.float64)
    expected = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    assert torch.equal(upper, upper.triu())
    torch.testing.assert_close(upper, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
