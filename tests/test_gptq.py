"""GPTQ (``lowbit/algorithms/gptq.py``) against an independent reference, and through the pipeline.

The reference below is GPTQ as the paper states it, written the slow way: float64, one column
at a time, the inverse Hessian kept explicitly and the rounded column eliminated from it
after every step (the Optimal Brain Surgeon update), no Cholesky factor, no lazy batches; its
rounding is written from the integer and NF4 format docstrings. The library works in float32,
so where a value lies within float error of a rounding boundary the two may round it
differently, and from there on that row legitimately diverges: each row must agree with the
reference up to its first difference, and that difference must be at such a tie.
"""

from __future__ import annotations

import math
import warnings
import zlib

import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_model, tiny_tokens

import lowbit
from lowbit.algorithms import GPTQConfig, config_class, handler_for
from lowbit.algorithms.gptq import column_blocks, gptq_quantize, inverse_hessian_factor
from lowbit.algorithms.rtn import RTNConfig, quantize_rtn
from lowbit.errors import LowbitError
from lowbit.formats import get_format
from lowbit.formats.nf4 import NF4_CODE
from lowbit.nn import QuantLinear
from lowbit.pipeline import LayerBlock, quantize_model
from lowbit.plan import Plan, make_rule


def paper(**options) -> GPTQConfig:
    """GPTQ as the paper and its reference run it (no act-order, no clip search) unless asked: what
    the column-by-column reference below computes."""
    return GPTQConfig(**{"act_order": False, "clip_search": False, **options})


#: a rounding is a float tie when its value lies this close (in steps) to a decision boundary
TIE = 1e-3


def seed_of(*key) -> int:
    return zlib.crc32(repr(key).encode())


def correlated_inputs(samples: int, columns: int, seed: int, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """Inputs whose channels are correlated and driven with very different strengths."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(columns, columns, generator=generator) / math.sqrt(columns) + torch.eye(columns)
    strength = torch.exp(torch.randn(columns, generator=generator))
    x = (torch.randn(samples, columns, generator=generator) @ mix) * strength
    x[:, list(dead)] = 0
    return x


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / x.shape[0]


def random_weight(shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05


def output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """``‖(W − Q) X‖² / n`` from ``H = XᵀX / n``, in float64."""
    d = (w - q).double()
    return float(((d @ h.double()) * d).sum())


# ---------------------------------------------------------------- the reference


class ReferenceGrid:
    """Rounding to a format's grid, from its docstring: integer (sym/asym, groups or per row)
    and NF4 (exact absmax per block). ``choose`` gives a group's params from its columns,
    ``round`` a column's codes, values and distance to the nearest decision boundary."""

    def __init__(self, name: str) -> None:
        fmt = get_format(name)
        self.fmt = fmt
        self.nf4 = fmt.family == "nf4"
        self.group_size = fmt.block_size if self.nf4 else fmt.group_size

    def choose(self, columns: torch.Tensor):
        if self.nf4:
            return columns.abs().amax(1).float().double()
        fmt = self.fmt
        if fmt.symmetric:
            scale = (columns.abs().amax(1) / (2 ** (fmt.bits - 1) - 1)).to(torch.float16).double()
            return scale, None
        lo, hi = columns.amin(1).clamp(max=0), columns.amax(1).clamp(min=0)
        scale = ((hi - lo) / (2**fmt.bits - 1)).to(torch.float16).double()
        zero = torch.round(-lo / torch.where(scale == 0, 1.0, scale)).clamp(0, 2**fmt.bits - 1)
        return scale, zero

    def round(self, column: torch.Tensor, params):
        if self.nf4:
            absmax = params
            x = (column / absmax.clamp(min=1e-38)).clamp(-1, 1)
            grid = NF4_CODE.double()
            distance = (x[:, None] - grid[None, :]).abs()
            codes = distance.argmin(1)
            midpoints = (grid[:-1] + grid[1:]) / 2
            margin = ((x[:, None] - midpoints[None, :]).abs() / (grid[1:] - grid[:-1])[None, :]).amin(1)
            return codes, grid[codes] * absmax, margin
        fmt = self.fmt
        scale, zero = params
        steps = column / torch.where(scale == 0, 1.0, scale)
        margin = 0.5 - (steps - torch.round(steps)).abs()
        if fmt.symmetric:
            half = 2 ** (fmt.bits - 1)
            q = torch.round(steps).clamp(-half, half - 1)
            clamped = (steps < -half - 0.5) | (steps > half - 0.5)
            return q + half, q * scale, torch.where(clamped, 1.0, margin)
        q = (torch.round(steps) + zero).clamp(0, 2**fmt.bits - 1)
        clamped = (steps + zero < -0.5) | (steps + zero > 2**fmt.bits - 0.5)
        return q, (q - zero) * scale, torch.where(clamped, 1.0, margin)


def reference_gptq(weight, hessian, name: str, damp=0.01, act_order=False, static=False):
    """GPTQ in float64 with the explicit inverse Hessian; (codes, values, margins, order)."""
    grid = ReferenceGrid(name)
    w = weight.double().clone()
    h = hessian.double().clone()
    rows, columns = w.shape
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True).tolist() if act_order else list(range(columns))
    h += damp * torch.diagonal(h).mean() * torch.eye(columns, dtype=torch.float64)
    inverse = torch.linalg.inv(h)
    size = grid.group_size or columns
    params = {}
    if static or size == columns:
        params = {g: grid.choose(w[:, g * size : (g + 1) * size]) for g in range(math.ceil(columns / size))}
    codes = torch.zeros(rows, columns, dtype=torch.long)
    values = torch.zeros(rows, columns, dtype=torch.float64)
    margins = torch.zeros(rows, columns, dtype=torch.float64)
    remaining = list(order)
    for column in order:
        if column % size == 0 and not (static or size == columns):
            params[column // size] = grid.choose(w[:, column : column + size])
        code, value, margin = grid.round(w[:, column], params[column // size])
        codes[:, column], values[:, column], margins[:, column] = code, value, margin
        remaining.remove(column)
        error = (w[:, column] - value) / inverse[column, column]
        w[:, remaining] -= error[:, None] * inverse[column, remaining][None, :]
        inverse = inverse - inverse[:, column : column + 1] @ inverse[column : column + 1, :] / inverse[column, column]
    return codes, values, margins, order


def library_codes(qtensor) -> torch.Tensor:
    codes, _ = qtensor.format.unpack(qtensor.parts, qtensor.shape)
    return codes.long()


def assert_same_up_to_ties(qtensor, weight, hessian, name, **options):
    """Every row equals the reference up to its first difference, which must be a float tie;
    most rows have none."""
    codes, values, margins, order = reference_gptq(weight, hessian, name, **options)
    mine = library_codes(qtensor)
    differing_rows = 0
    for row in range(weight.shape[0]):
        differs = [c for c in order if mine[row, c] != codes[row, c]]
        if differs:
            differing_rows += 1
            assert margins[row, differs[0]] < TIE, (
                f"row {row}: column {differs[0]} rounds to {int(mine[row, differs[0]])}, the reference to "
                f"{int(codes[row, differs[0]])}, {float(margins[row, differs[0]]):.3g} steps from a tie"
            )
    assert differing_rows <= max(1, weight.shape[0] // 10)
    same = (mine == codes).all(1)
    dequantized = qtensor.dequantize()
    torch.testing.assert_close(dequantized[same].double(), values[same], rtol=0, atol=1e-6)


CASES = [  # (format, shape): partial last groups, per channel, widths 2..8, sym and asym, NF4
    ("int4-g32", (7, 100)),
    ("int3-sym-g32", (7, 100)),
    ("int8-asym-g32", (7, 100)),
    ("int2-g16", (9, 50)),
    ("int4", (16, 64)),
    ("int3-sym", (16, 64)),
    ("int8", (16, 64)),
    ("int5-g7", (5, 40)),
    ("nf4", (7, 100)),
    ("nf4-g16", (6, 72)),
]


@pytest.mark.parametrize("name,shape", CASES)
@pytest.mark.parametrize("block_size", [128, 20, 8])
def test_matches_the_reference(name, shape, block_size):
    """Dynamic groups, lazy blocks wider, narrower and not a multiple of the group."""
    x = correlated_inputs(256, shape[1], seed_of(name, shape, "x"), dead=(3,))
    w, h = random_weight(shape, seed_of(name, shape, "w")), hessian_of(x)
    qtensor, _ = gptq_quantize(w, h, get_format(name), paper(block_size=block_size))
    assert_same_up_to_ties(qtensor, w, h, name)


@pytest.mark.parametrize("name,shape", CASES)
@pytest.mark.parametrize("act_order,static", [(True, False), (True, True), (False, True)])
def test_act_order_and_static_groups_match_the_reference(name, shape, act_order, static):
    """act_order forces static groups: params from the original weights, canonical layout."""
    x = correlated_inputs(256, shape[1], seed_of(name, shape, "x2"))
    w, h = random_weight(shape, seed_of(name, shape, "w2")), hessian_of(x)
    config = paper(act_order=act_order, static_groups=static, block_size=16)
    qtensor, _ = gptq_quantize(w, h, get_format(name), config)
    assert_same_up_to_ties(qtensor, w, h, name, act_order=act_order, static=True)


def test_the_reference_is_not_round_to_nearest():
    """The reference (and so the comparison above) would notice a GPTQ that fed no error forward."""
    name, shape = "int4-g32", (7, 100)
    x = correlated_inputs(256, shape[1], 5)
    w, h = random_weight(shape, 6), hessian_of(x)
    codes, *_ = reference_gptq(w, h, name)
    assert (codes != library_codes(get_format(name).quantize(w))).float().mean() > 0.1


def test_lazy_blocks_never_start_a_group_with_updates_pending():
    assert column_blocks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert column_blocks(100, 128, 32) == [(0, 100)]
    assert column_blocks(100, 128, 48) == [(0, 96), (96, 100)]
    assert column_blocks(100, 20, 32) == [(0, 20), (20, 32), (32, 52), (52, 64), (64, 84), (84, 96), (96, 100)]
    assert column_blocks(50, 50, 16) == [(0, 48), (48, 50)]


# ---------------------------------------------------------------- better than RTN, exact storage

FORMATS = [
    "int2-g32", "int3-g32", "int4-g32", "int4-sym-g32", "int5-g32", "int6-g32", "int8-g32", "int8",
    "int4", "int4-g48", "int8-tensor", "nf4", "nf4-dq", "nf4-g128", "fp8", "fp8-e5m2", "fp8-tensor", "mxfp4",
]  # fmt: skip
CONFIGS = [paper(), paper(act_order=True), paper(static_groups=True, block_size=32), paper(clip_search=True)]


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: str(c.options()))
def test_lower_output_error_than_rtn_and_stored_bit_for_bit(name, config):
    """‖(W − Q) X‖² below RTN's on correlated inputs, for every format; the QTensor is exactly
    what the loop rounded to."""
    fmt = get_format(name)
    if config.clip_search and not fmt.supports_clip:
        pytest.skip(f"{name} has no clipping search")
    shape = (24, 200)
    x = correlated_inputs(512, shape[1], seed_of(name, "x"))
    w, h = random_weight(shape, seed_of(name, "w")), hessian_of(x)
    qtensor, rounded = gptq_quantize(w, h, fmt, config)
    assert qtensor.format == fmt and qtensor.shape == shape
    assert torch.equal(qtensor.dequantize(), rounded)
    assert set(qtensor.parts) == set(fmt.quantize(w).parts)
    if fmt.family == "int" and fmt.bits == 2 and config == paper():
        return  # min-max ranges of fed-forward weights: see test_two_bits_need_ranges_robust_to_fed_forward_errors
    rtn = quantize_rtn(w, fmt, RTNConfig(clip_search=config.clip_search), torch.diagonal(h) if config.clip_search else None)
    assert output_error(w, rounded, h) < 0.9 * output_error(w, rtn.dequantize(), h)


@pytest.mark.parametrize("name", ["int2-g32", "int2-sym-g32", "int2-g64"])
def test_two_bits_need_ranges_robust_to_fed_forward_errors(name):
    """At 2 bits a rounding error is a large part of a weight, and the errors fed forward widen
    the min-max range of the groups after it: dynamic groups chosen from those weights can lose
    to RTN on strongly uneven inputs (1.0-1.4x its error on these). Ranges from the original
    weights (static groups, act_order) or searched per group (clip_search) keep GPTQ well
    below RTN."""
    fmt = get_format(name)
    x = correlated_inputs(512, 200, seed_of(name, "x"))
    w, h = random_weight((24, 200), seed_of(name, "w")), hessian_of(x)
    rtn = output_error(w, fmt.quantize(w).dequantize(), h)
    for config in (paper(static_groups=True), paper(act_order=True), paper(clip_search=True)):
        assert output_error(w, gptq_quantize(w, h, fmt, config)[1], h) < 0.8 * rtn, config


def test_diagonal_hessian_is_round_to_nearest():
    """Uncorrelated inputs leave nothing to feed forward: GPTQ's codes are RTN's, for any scale."""
    w = random_weight((12, 100), 21)
    h = torch.diag(torch.exp(torch.randn(100, generator=torch.Generator().manual_seed(22))))
    for name in ("int4-g32", "int3-sym-g32", "nf4", "int8", "mxfp4", "fp8"):
        fmt = get_format(name)
        assert torch.equal(gptq_quantize(w, h, fmt, paper())[1], fmt.quantize(w).dequantize()), name


def test_deterministic():
    x = correlated_inputs(256, 100, 31)
    w, h = random_weight((16, 100), 32), hessian_of(x)
    for config in CONFIGS:
        first, second = gptq_quantize(w, h, get_format("int4-g32"), config), gptq_quantize(w, h, get_format("int4-g32"), config)
        assert all(torch.equal(first[0].parts[k], second[0].parts[k]) for k in first[0].parts)


def test_float_formats_are_stored_as_they_are():
    w = random_weight((4, 40), 41)
    qtensor, rounded = gptq_quantize(w, hessian_of(correlated_inputs(64, 40, 42)), get_format("bf16"))
    assert torch.equal(rounded, w.bfloat16().float()) and qtensor.format_name == "bf16"


# ---------------------------------------------------------------- bad Hessians, dead channels, zero rows


def indefinite_hessian(columns: int, seed: int, lowest: float) -> torch.Tensor:
    """A symmetric matrix with eigenvalues spread over (0, 2] and one equal to ``lowest · mean``."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(columns, columns, generator=generator, dtype=torch.float64))
    eigenvalues = torch.rand(columns, generator=generator, dtype=torch.float64) * 2
    eigenvalues[0] = lowest * eigenvalues.mean()
    return ((basis * eigenvalues) @ basis.T).float()


def test_damping_is_raised_when_cholesky_fails():
    """An eigenvalue of −5% of the mean defeats 1% damping; 10% works, with a warning, and the
    result is finite and better than RTN on the matrix's positive part."""
    h = indefinite_hessian(64, 51, -0.05)
    w = random_weight((8, 64), 52)
    with pytest.warns(UserWarning, match=r"Hessian of layer 3 q is not positive definite with damping 0.01; damping raised to 0.1"):
        qtensor, rounded = gptq_quantize(w, h, get_format("int4-g32"), name="layer 3 q")
    assert torch.isfinite(rounded).all() and torch.equal(qtensor.dequantize(), rounded)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inverse_hessian_factor(indefinite_hessian(64, 51, 0.5), 0.01)  # positive definite: no warning


def test_hessians_no_damping_repairs_are_refused():
    w = random_weight((8, 64), 53)
    fmt = get_format("int4-g32")
    with pytest.raises(LowbitError, match="not positive definite even with damping 10000"):
        gptq_quantize(w, torch.eye(64) + 1e6 * (torch.ones(64, 64) - torch.eye(64)), fmt)  # eigenvalues 1 - 1e6
    broken = hessian_of(correlated_inputs(64, 64, 55))
    broken[2, 5] = float("inf")
    with pytest.raises(LowbitError, match="not a Hessian"):
        gptq_quantize(w, broken, fmt)
    with pytest.raises(ValueError, match="64x64 Hessian"):
        gptq_quantize(w, torch.eye(32), fmt)


def test_dead_channels_and_zero_rows():
    """Channels that never fired are zeroed (they multiply zero), all-zero rows stay zero, an
    all-zero Hessian works, and nothing is NaN."""
    dead = (0, 7, 33, 99)
    x = correlated_inputs(128, 100, 61, dead=dead)
    w = random_weight((10, 100), 62)
    w[4] = 0
    for name in ("int4-g32", "int4-sym-g32", "nf4", "mxfp4", "fp8"):
        _, rounded = gptq_quantize(w, hessian_of(x), get_format(name))
        assert torch.isfinite(rounded).all(), name
        assert (rounded[:, list(dead)] == 0).all() and (rounded[4] == 0).all(), name
        _, rounded = gptq_quantize(w, torch.zeros(100, 100), get_format(name))
        assert (rounded == 0).all(), name


# ---------------------------------------------------------------- the config and the handler


def test_config_is_registered_and_validated():
    assert config_class("gptq") is GPTQConfig
    assert GPTQConfig().statistics() == frozenset({"hessian"})
    assert GPTQConfig().fixed_groups and not GPTQConfig(act_order=False).fixed_groups  # act-order by default
    assert GPTQConfig().searches_clip(get_format("int4-g128")) and not GPTQConfig().searches_clip(get_format("mxfp4"))
    assert not GPTQConfig(clip_search=False).searches_clip(get_format("int4-g128"))
    bad = {
        "damp": (0, -0.1, 1.5, "x", True), "block_size": (0, 1.5, True), "act_order": ("yes", 1),
        "static_groups": (None,), "clip_search": (1,), "clip_grid": (0, 2.0), "clip_min": (0, 1.2),
    }  # fmt: skip
    for option, values in bad.items():
        for value in values:
            with pytest.raises(LowbitError, match=rf"algorithm 'gptq': {option} must be"):
                GPTQConfig(**{option: value})
    with pytest.raises(LowbitError, match="has no option 'groupsize'"):
        GPTQConfig.from_options({"groupsize": 128})


def test_plan_rule_round_trips_through_the_manifest():
    plan = Plan([make_rule("lm_head", "keep"), make_rule("*", {"format": "int4-g128", "algorithm": "gptq", "damp": 0.05})])
    assert plan.to_dict()["rules"][1] == {"pattern": "*", "format": "int4-g128", "algorithm": "gptq", "damp": 0.05}
    again = Plan.from_dict(plan.to_dict())
    assert again.rules[1].config == GPTQConfig(damp=0.05) and again.rules[1].format == get_format("int4-g128")
    assert again.to_dict() == plan.to_dict()


def test_clip_search_is_refused_where_the_format_has_none():
    with pytest.raises(LowbitError, match="mxfp4 has no clipping search"):
        gptq_quantize(random_weight((4, 64), 71), torch.eye(64), get_format("mxfp4"), paper(clip_search=True))


class FakeBlock:
    """A block with a fixed Hessian per name, counting collections."""

    device = torch.device("cpu")
    groups = ()  # no input groups: every target in one stage

    def __init__(self, weights, hessians, index=0, hidden=True):
        self.weights, self.hessians, self.index = weights, hessians, index
        self.hidden = [torch.zeros(1)] if hidden else None
        self.asked = []

    def install(self, name, qtensor):
        pass

    def weight(self, name):
        return self.weights[name]

    def collect(self, kinds, names):
        self.asked.append((set(kinds), sorted(names)))
        return {name: type("Stats", (), {"hessian": self.hessians[name]})() for name in names}


def test_handler_collects_once_and_refuses_without_calibration():
    fmt = get_format("int4-g32")
    x = correlated_inputs(128, 64, 81)
    weights = {"q": random_weight((8, 64), 82), "k": random_weight((4, 64), 83)}
    block = FakeBlock(weights, {"q": hessian_of(x), "k": hessian_of(x)})
    config = GPTQConfig(damp=0.05)
    out = handler_for(config)(config, block, {"q": fmt, "k": fmt})
    assert block.asked == [({"hessian"}, ["k", "q"])]
    for name in ("q", "k"):
        assert torch.equal(out[name].dequantize(), gptq_quantize(weights[name], hessian_of(x), fmt, config)[1])
    with pytest.raises(LowbitError, match="gptq needs calibration text: pass --calibration FILE"):
        handler_for(config)(config, FakeBlock(weights, {}, hidden=False), {"q": fmt})
    outside = handler_for(config)(config, FakeBlock(weights, {}, index=-1, hidden=False), {"q": fmt})
    assert torch.equal(outside["q"].dequantize(), fmt.quantize(weights["q"]).dequantize())


# ---------------------------------------------------------------- through the pipeline


def gptq_plan(fmt: str = "int4-g32", **options) -> Plan:
    return Plan([make_rule("*", {"format": fmt, "algorithm": "gptq", **options})])


@torch.no_grad()
def logit_kl(reference, model, tokens) -> float:
    p = torch.log_softmax(reference(tokens).logits.double(), -1)
    q = torch.log_softmax(model(tokens).logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_pipeline_beats_rtn_on_every_architecture():
    """lowbit.quantize with a GPTQ plan works on every tested architecture (``lm_head``, outside
    the layers, is rounded to nearest), and its KL to the float model on held-out tokens is
    below RTN's. 1024 calibration tokens: the down projections' Hessians are 200 wide, and a
    Hessian estimated from barely more tokens than its width fits the calibration text only."""
    calibration, held_out = tiny_tokens(16, 64, seed=1), tiny_tokens(4, 32, seed=2)
    ratios = {}
    for arch in ARCHITECTURES:
        reference = tiny_model(arch)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="lm_head is outside")
            gptq = lowbit.quantize(tiny_model(arch), gptq_plan(), calibration=calibration, progress=False)
        rtn = lowbit.quantize(tiny_model(arch), Plan([make_rule("*", "int4-g32")]), progress=False)
        quantized = [name for name, module in gptq.named_modules() if isinstance(module, QuantLinear)]
        assert len(quantized) == (4 if arch == "phi3" else 7) * 2 + 1, (arch, quantized)
        assert gptq.lowbit_manifest["modules"][quantized[0]]["algorithm"] == "gptq"
        head = gptq.get_submodule("lm_head")
        expected = get_format("int4-g32").quantize(reference.lm_head.weight).dequantize()
        assert torch.equal(head.dequantize_weight(torch.float32), expected)
        ratios[arch] = logit_kl(reference, gptq, held_out) / logit_kl(reference, rtn, held_out)
    assert max(ratios.values()) < 1 and sum(ratios.values()) / len(ratios) < 0.85, ratios


@pytest.mark.parametrize("sequential", [True, False])
def test_q_k_v_share_one_hessian_collected_once_per_block(monkeypatch, sequential):
    """One Hessian per shared input; with ``sequential`` (the default) one collection per input
    group in the layer's order, with the groups before it already quantized."""
    collected, quantized_before = [], []
    original = LayerBlock.collect

    def counting(self, kinds, names):
        quantized_before.append(sorted(n for n, m in self.layer.named_modules() if isinstance(m, QuantLinear)))
        statistics = original(self, kinds, names)
        collected.append(statistics)
        return statistics

    monkeypatch.setattr(LayerBlock, "collect", counting)
    model = tiny_model("llama")
    rule = {"format": "int4-g32", "algorithm": "gptq", **({} if sequential else {"sequential": False})}
    quantize_model(model, Plan([make_rule("lm_head", "keep"), make_rule("*", rule)]), calibration=tiny_tokens(4, 16), progress=False)
    if sequential:
        attention = [f"self_attn.{p}_proj" for p in "qkvo"]
        stages = [attention[:3], attention[3:], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
        assert [sorted(s) for s in collected] == [sorted(stage) for stage in stages] * model.config.num_hidden_layers
        done = [sorted(sum(stages[:i], [])) for i in range(4)]
        assert quantized_before == done * model.config.num_hidden_layers
        merged = [{k: v for s in collected[i : i + 4] for k, v in s.items()} for i in range(0, len(collected), 4)]
        collected = merged
    assert len(collected) == model.config.num_hidden_layers
    for statistics in collected:
        attention = [statistics[f"self_attn.{p}_proj"] for p in "qkv"]
        assert attention[0] is attention[1] is attention[2]
        assert statistics["mlp.gate_proj"] is statistics["mlp.up_proj"]
        assert len({id(s) for s in statistics.values()}) == 4  # qkv, o, gate/up, down
        assert attention[0].rows == 4 * 16


def test_pipeline_without_calibration_is_refused():
    with pytest.raises(LowbitError, match="gptq needs calibration text"):
        quantize_model(tiny_model("llama"), gptq_plan(), progress=False)


def test_fp16_activations_that_overflow_fp16_sums():
    """Norm weights of 60 make q/k/v inputs of ~60: their squares summed over 256 tokens pass
    fp16's 65504, but the statistics accumulate in float32, so GPTQ sees a finite Hessian."""
    model = tiny_model("llama").half()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(60.0)
    largest = []
    original = LayerBlock.collect

    def watching(self, kinds, names):
        statistics = original(self, kinds, names)
        if "self_attn.q_proj" in statistics:  # one collection per input group (true sequential)
            largest.append(float(statistics["self_attn.q_proj"].hessian.diagonal().max()) * statistics["self_attn.q_proj"].rows)
        return statistics

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LayerBlock, "collect", watching)
        quantize_model(model, Plan([make_rule("lm_head", "keep"), make_rule("*", {"format": "int4-g32", "algorithm": "gptq"})]),
                       calibration=tiny_tokens(8, 32), progress=False)  # fmt: skip
    assert max(largest) > torch.finfo(torch.float16).max
    for module in model.modules():
        if isinstance(module, QuantLinear):
            assert torch.isfinite(module.dequantize_weight(torch.float32)).all()
    logits = model(tiny_tokens(2, 16, seed=3)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: str(c.options()))
def test_cuda_makes_the_cpu_choices(config):
    """Same codes on CUDA as on the CPU, up to float ties (a handful of rows may diverge)."""
    x = correlated_inputs(512, 300, 91)
    w, h = random_weight((64, 300), 92), hessian_of(x)
    fmt = get_format("int4-g64")
    cpu = library_codes(gptq_quantize(w, h, fmt, config)[0])
    gpu = library_codes(gptq_quantize(w.cuda(), h.cuda(), fmt, config)[0]).cpu()
    assert (cpu != gpu).any(1).sum() <= 3
