"""SmoothQuant (``lowbit/algorithms/smoothquant.py``), the W8A8 schemes and the per-token
activation quantizers (``lowbit/kernels/activation.py``).

The smoothing scale is checked against the paper's formula in float64, the FP8 activation
quantizer against an E4M3 grid built from the bit layout (not from torch's float8 cast),
SmoothQuant through the pipeline by beating plain W8A8 on a tiny model with activation
outliers, and the W8A8 layers by computing on quantized inputs in evaluation.
"""

from __future__ import annotations

import pytest
import torch
from test_awq import logit_kl, logits, with_outliers
from tiny_models import ARCHITECTURES, tiny_model, tiny_tokens

import lowbit
from lowbit.algorithms import SmoothQuantConfig, config_class
from lowbit.algorithms.smoothquant import smoothing_scale
from lowbit.errors import LowbitError, UnknownNameError
from lowbit.formats import get_format
from lowbit.kernels.activation import (
    activation_quantizer,
    fake_quantize_fp8_per_token,
    fake_quantize_int8_per_token,
)
from lowbit.nn import QuantLinear
from lowbit.pipeline import quantize_model
from lowbit.plan import Plan, make_rule, resolve_scheme


def sq_plan(scheme: str = "w8a8", **options) -> Plan:
    return Plan([make_rule("lm_head", "keep"), make_rule("*", {"format": scheme, "method": "smoothquant", **options})])


# ---------------------------------------------------------------- the pieces


def test_smoothing_scale_matches_the_formula():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(37, generator=generator, dtype=torch.float64) * 30
    weights = [torch.randn(5, 37, generator=generator, dtype=torch.float64), torch.randn(11, 37, generator=generator, dtype=torch.float64)]
    x[4] = 0  # a dead channel
    weights[0][:, 9] = weights[1][:, 9] = 0  # a column of zeros in every linear
    for alpha in (0.5, 0.8, 1.0):
        w = torch.cat(weights).abs().amax(0)
        expected = x.pow(alpha) / w.pow(1 - alpha)
        expected[4] = expected[9] = 1
        got = smoothing_scale(x.float(), [w_.float() for w_ in weights], alpha)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


def e4m3_grid() -> torch.Tensor:
    """Every finite non-negative E4M3 (fn) value, from its bit layout: 4 exponent bits (bias 7),
    3 mantissa bits, subnormals at exponent 0, no infinities, S.1111.111 is NaN."""
    values = []
    for exponent in range(16):
        for mantissa in range(8):
            if exponent == 15 and mantissa == 7:
                continue
            values.append(mantissa / 8 * 2.0**-6 if exponent == 0 else (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return torch.tensor(values, dtype=torch.float64)


def reference_fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    grid = e4m3_grid()
    assert grid.max() == 448
    x = x.double()
    scale = x.abs().amax(-1, keepdim=True) / 448
    y = x / torch.where(scale == 0, torch.ones_like(scale), scale)
    distance = (y.abs().unsqueeze(-1) - grid).abs()
    nearest = distance.min(-1, keepdim=True).values
    ties = distance == nearest  # a tie goes to the even mantissa (an even index on the grid)
    index = torch.where(ties, torch.arange(grid.numel()) % 2 == 0, False).int().argmax(-1)
    index = torch.where(ties.sum(-1) > 1, index, distance.argmin(-1))
    return torch.sign(y) * grid[index] * scale


@pytest.mark.parametrize("shape", [(3, 7, 45), (1, 130), (5, 3)])
def test_fp8_per_token_matches_an_e4m3_grid(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=generator) * torch.logspace(-3, 3, shape[-1])
    x.reshape(-1, shape[-1])[0] = 0  # an all-zero token stays zero
    got = fake_quantize_fp8_per_token(x)
    assert got.dtype == x.dtype
    torch.testing.assert_close(got.double(), reference_fp8_per_token(x), rtol=0, atol=1e-6 * x.abs().max().item())
    assert (got.reshape(-1, shape[-1])[0] == 0).all()
    half = fake_quantize_fp8_per_token(x.half())
    assert half.dtype == torch.float16 and torch.isfinite(half).all()


def test_activation_quantizers_by_name():
    assert activation_quantizer("int8-per-token") is fake_quantize_int8_per_token
    assert activation_quantizer("fp8-per-token") is fake_quantize_fp8_per_token
    assert activation_quantizer(None) is None
    with pytest.raises(UnknownNameError, match="unknown activation quantizer 'int4-per-token'; available: int8-per-token, fp8-per-token"):
        activation_quantizer("int4-per-token")
    with pytest.raises(UnknownNameError, match="unknown activation quantizer"):
        make_rule("*", {"format": "int8", "activations": "int4-per-token"})


def test_config_and_presets():
    assert config_class("smoothquant") is SmoothQuantConfig and SmoothQuantConfig.folds_scales
    for bad in (0, 1.5, "half", True):
        with pytest.raises(LowbitError, match="algorithm 'smoothquant': alpha"):
            SmoothQuantConfig(alpha=bad)
    plan = resolve_scheme("w8a8", "smoothquant")
    rule = plan.rules[-1]
    assert rule.format == get_format("int8") and rule.activations == "int8-per-token" and rule.algorithm == "smoothquant"
    assert plan.name == "w8a8 (smoothquant)"
    fp8 = resolve_scheme("w8a8-fp8").rules[-1]
    assert fp8.format == get_format("fp8") and fp8.activations == "fp8-per-token" and fp8.algorithm == "rtn"
    assert Plan.from_dict(plan.to_dict()).rules == plan.rules
    assert rule.to_dict() == {"pattern": "*", "format": "int8", "algorithm": "smoothquant", "activations": "int8-per-token"}
    assert "activations int8-per-token" in rule.describe()


# ---------------------------------------------------------------- through the pipeline


def test_smoothquant_beats_plain_w8a8_where_activations_have_outliers():
    calibration, held_out = tiny_tokens(16, 64, seed=1), tiny_tokens(4, 32, seed=2)
    reference = with_outliers(tiny_model("llama"))
    smooth = quantize_model(with_outliers(tiny_model("llama")), sq_plan(), calibration=calibration, progress=False)
    plain = quantize_model(with_outliers(tiny_model("llama")), resolve_scheme("w8a8"), progress=False)
    assert logit_kl(reference, smooth, held_out) < 0.7 * logit_kl(reference, plain, held_out)
    # the norms took the smoothing (their outlier channels shrank), the o/down inputs were left alone
    layer, original = smooth.model.layers[0], reference.model.layers[0]
    assert layer.input_layernorm.weight.abs().max() < original.input_layernorm.weight.abs().max()


def test_smooth_linears_smooths_down_proj_through_up_proj():
    """Outliers in down_proj's input (a few rows of up_proj scaled up): smoothing it through
    up_proj's rows beats smoothing the norms alone."""

    def make():
        model = tiny_model("llama")
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.up_proj.weight[::37] *= 50
        return model

    calibration, held_out = tiny_tokens(16, 64, seed=1), tiny_tokens(4, 32, seed=2)
    reference = make()
    kl = {
        linears: logit_kl(reference, quantize_model(make(), sq_plan(smooth_linears=linears), calibration=calibration, progress=False), held_out)
        for linears in (False, True)
    }
    assert kl[True] < 0.6 * kl[False], kl


@pytest.mark.parametrize("scheme, quantizer", [("w8a8", fake_quantize_int8_per_token), ("w8a8-fp8", fake_quantize_fp8_per_token)])
def test_w8a8_layers_quantize_their_inputs_in_evaluation(scheme, quantizer):
    model = quantize_model(tiny_model("qwen2"), sq_plan(scheme), calibration=tiny_tokens(4, 32), progress=False)
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == 14
    for name, module in quantized.items():
        assert module.input_quantizer is quantizer, name
        assert model.lowbit_manifest["modules"][name]["activations"] == quantizer.__name__.split("_")[2] + "-per-token"
    module = quantized["model.layers.0.self_attn.q_proj"]
    x = torch.randn(2, 5, module.in_features) * torch.linspace(0.1, 30, module.in_features)
    expected = torch.nn.functional.linear(quantizer(x), module.dequantize_weight(torch.float32), module.bias)
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(module(x), torch.nn.functional.linear(x, module.dequantize_weight(torch.float32), module.bias), atol=1e-3)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_w8a8_smoothquant_stays_close_on_every_architecture(arch):
    tokens, held_out = tiny_tokens(8, 32), tiny_tokens(2, 16, seed=3)
    model = quantize_model(tiny_model(arch), sq_plan(), calibration=tokens, progress=False)
    assert logit_kl(tiny_model(arch), model, held_out) < 1e-3


def test_fp16_activation_overflow_and_dead_channels():
    model = tiny_model("llama").half()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(300.0)
            layer.input_layernorm.weight[7] = 0
    quantize_model(model, sq_plan(), calibration=tiny_tokens(8, 32), progress=False)
    assert all(torch.isfinite(layer.input_layernorm.weight).all() for layer in model.model.layers)
    assert torch.isfinite(logits(model, tiny_tokens(2, 16, seed=3))).all()


def test_without_calibration_is_refused():
    with pytest.raises(LowbitError, match="smoothquant needs calibration text"):
        quantize_model(tiny_model("llama"), sq_plan(), progress=False)


def test_w8a8_round_trips_through_a_native_checkpoint(tmp_path):
    model = lowbit.quantize(tiny_model("llama"), "w8a8", method="smoothquant", calibration=tiny_tokens(4, 32), progress=False, keep_dtype="fp32")
    lowbit.save(model, tmp_path / "out")
    loaded = lowbit.load(tmp_path / "out")
    assert loaded.get_submodule("model.layers.0.mlp.down_proj").input_quantizer is fake_quantize_int8_per_token
    held_out = tiny_tokens(2, 16, seed=4)
    torch.testing.assert_close(logits(loaded, held_out), logits(model, held_out), rtol=1e-4, atol=1e-4)
    from transformers import AutoModelForCausalLM  # after import lowbit: its quantizer loads it

    through_transformers = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert through_transformers.get_submodule("model.layers.0.mlp.down_proj").input_quantizer is fake_quantize_int8_per_token
    torch.testing.assert_close(logits(through_transformers, held_out), logits(model, held_out), rtol=1e-4, atol=1e-4)


@pytest.mark.heavy
def test_w8a8_on_smollm2(tmp_path_factory):
    """SmolLM2-135M, 8 dev windows of 512 tokens, activations quantized in evaluation.
    Measured: W8A8 RTN +3.5% perplexity (KL 0.028), SmoothQuant +1.3% (KL 0.0100), FP8 W8A8
    +3.1% (KL 0.025). The issue's target, within 1%, is not met yet: asserted is what holds."""
    import copy

    from test_awq import smollm2_protocol

    from lowbit.eval import evaluate_windows

    base, dev, calibration, reference = smollm2_protocol(tmp_path_factory)
    own = evaluate_windows(base, dev, reference, progress=False)["perplexity"]
    got = {}
    for scheme, method in (("w8a8", None), ("w8a8", "smoothquant"), ("w8a8-fp8", None)):
        model = quantize_model(copy.deepcopy(base), resolve_scheme(scheme, method), calibration=calibration, progress=False)
        result = evaluate_windows(model, dev, reference, progress=False)
        got[scheme, method] = (result["perplexity"] / own, result["kl_divergence"])
    assert got["w8a8", "smoothquant"][1] < 0.5 * got["w8a8", None][1], got
    assert got["w8a8", "smoothquant"][0] < 1.02 and got["w8a8-fp8", None][0] < 1.04, got
