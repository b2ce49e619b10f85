"""The pipeline (``lowbit.quantize`` / ``lowbit.pipeline.quantize_model``) on tiny random models
of every tested architecture.

References used here, all computed independently of the pipeline:

- the packed parts of every quantized linear must equal the format's own ``quantize`` of
  the original weight (RTN without clipping is exactly that), so the right weight went into
  the right module;
- calibration statistics must equal the per-input-channel mean square of each linear's
  input, collected in float64 with our own forward hooks on the original float model (layer
  0) and on a copy whose layer 0 is the pipeline's quantized layer 0 (layer 1: later layers
  are calibrated on what their quantized predecessors really produce);
- ``generate()`` must equal a greedy argmax loop written out by hand (no KV cache);
- the memory footprint must equal the original minus every dense weight replaced plus the
  format's exact ``storage_bytes`` for it.
"""

from __future__ import annotations

import copy
import gc
import math
import warnings
import weakref

import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_model, tiny_tokens
from torch import nn

import lowbit
from lowbit.algorithms import RTNConfig
from lowbit.algorithms.rtn import quantize_rtn
from lowbit.arch import ARCHITECTURES as LOWBIT_ARCHITECTURES
from lowbit.arch import input_groups_of
from lowbit.errors import LowbitError
from lowbit.formats import get_format
from lowbit.nn import QuantLinear
from lowbit.pipeline import LayerBlock, capture_layer_inputs, quantize_model
from lowbit.plan import Plan, make_rule

#: relative Frobenius error of the logits: int8 (per channel) is tight, 4-bit is looser
LOGIT_BOUND = {"int8": 0.03, "int4-g32": 0.35}


def decoder_linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.model.layers.named_modules(prefix="model.layers") if isinstance(module, nn.Linear)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def footprint_by_hand(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, each counted once (what get_memory_footprint sums)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def quantize_quietly(model, scheme, **kwargs):
    return lowbit.quantize(model, scheme, progress=False, **kwargs)


# -- every architecture ---------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_is_tested_by_lowbit(arch):
    assert arch in LOWBIT_ARCHITECTURES


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_quantize_every_architecture(arch):
    original = tiny_model(arch)
    model = copy.deepcopy(original)
    tokens = tiny_tokens()
    with torch.no_grad():
        reference_logits = original(tokens).logits
    names = decoder_linear_names(original)
    assert names, "the tiny model has linears in its decoder layers"
    footprint_before = model.get_memory_footprint()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tested architecture quantizes without any warning
        result = quantize_quietly(model, "int4-g32")

    assert result is model  # in place: never a second copy of the model
    fmt = get_format("int4-g32")
    replaced_dense = replaced_packed = 0
    for name in names:
        module = model.get_submodule(name)
        dense = original.get_submodule(name)
        assert isinstance(module, QuantLinear) and not isinstance(module, nn.Linear), name
        assert module.format_name == "int4-g32"
        assert (module.out_features, module.in_features) == tuple(dense.weight.shape)
        # the packed parts are exactly the format's quantization of the original weight
        expected = fmt.quantize(dense.weight.data)
        assert set(module.part_names) == set(expected.parts)
        for part, tensor in expected.parts.items():
            assert torch.equal(getattr(module, "weight_" + part), tensor), (name, part)
        # parts are buffers (uint8 codes, float16 scales), never Parameters or float32 weights
        buffers = dict(module.named_buffers(recurse=False))
        parameters = dict(module.named_parameters(recurse=False))
        assert set(buffers) == {"weight_" + p for p in module.part_names}
        assert set(parameters) <= {"bias"}
        assert all(b.dtype in (torch.uint8, torch.float16) for b in buffers.values()), {k: b.dtype for k, b in buffers.items()}
        assert not hasattr(module, "weight")
        # the bias is kept as it was (qwen2 has q/k/v biases)
        if dense.bias is None:
            assert module.bias is None
        else:
            assert torch.equal(module.bias, dense.bias)
        # dequantize_weight() is the format's dequantization of the qtensor
        assert torch.equal(module.dequantize_weight(), fmt.dequantize(module.qtensor, torch.float32))
        assert torch.equal(module.dequantize_weight(), expected.dequantize())
        replaced_dense += dense.weight.numel() * dense.weight.element_size()
        replaced_packed += fmt.storage_bytes(tuple(dense.weight.shape))

    # presets keep lm_head dense (and tied to the embedding where the model ties them)
    assert type(model.lm_head) is nn.Linear
    stored = getattr(torch, model.lowbit_manifest["kept_dtype"])  # kept tensors are rounded to their stored 16 bits
    assert torch.equal(model.lm_head.weight, original.lm_head.weight.to(stored).float())
    if original.config.tie_word_embeddings:
        assert model.lm_head.weight is model.get_input_embeddings().weight
    assert set(model.lowbit_manifest["modules"]) == set(names)

    # the footprint reflects the packed sizes, exactly
    footprint_after = model.get_memory_footprint()
    assert footprint_after == footprint_by_hand(model)
    assert footprint_after == footprint_before - replaced_dense + replaced_packed
    assert footprint_after < footprint_before

    with torch.no_grad():
        logits = model(tokens).logits
    assert relative_error(logits, reference_logits) < LOGIT_BOUND["int4-g32"]

    # generate() works through the quantized modules, KV cache included: it equals a greedy
    # argmax loop that recomputes the whole sequence at every step
    prompt = tokens[:1, :6]
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False, pad_token_id=0)
    by_hand = prompt
    with torch.no_grad():
        for _ in range(4):
            next_token = model(by_hand).logits[:, -1].argmax(-1, keepdim=True)
            by_hand = torch.cat([by_hand, next_token], dim=1)
    assert torch.equal(generated, by_hand)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_int8_is_closer_than_int4(arch):
    tokens = tiny_tokens()
    errors = {}
    for scheme in ("int8", "int4-g32"):
        model = tiny_model(arch)
        with torch.no_grad():
            reference = model(tokens).logits
            quantize_quietly(model, scheme)
            errors[scheme] = relative_error(model(tokens).logits, reference)
    assert errors["int8"] < LOGIT_BOUND["int8"], errors
    assert errors["int4-g32"] < LOGIT_BOUND["int4-g32"], errors
    # int8's grid is 17x finer than int4's: its error is several times smaller
    assert errors["int8"] * 4 < errors["int4-g32"], errors
    assert errors["int8"] > 0  # it did quantize something


def test_quantize_keeps_working_on_a_bf16_model():
    model = tiny_model("qwen2").to(torch.bfloat16)
    tokens = tiny_tokens()
    with torch.no_grad():
        reference = model(tokens).logits.float()
        quantize_quietly(model, "int8")
        logits = model(tokens).logits
    assert logits.dtype == torch.bfloat16
    assert relative_error(logits.float(), reference) < LOGIT_BOUND["int8"]
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.bias.dtype == torch.bfloat16 and q_proj.dequantize_weight().dtype == torch.bfloat16


# -- calibration ------------------------------------------------------------------------


def reference_mean_squares(model: nn.Module, layer_index: int, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean square of each input channel of each linear of one layer, in float64, by running the
    whole model with our own hooks."""
    layer = model.model.layers[layer_index]
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear):

            def hook(_module, inputs, _output, name=name):
                x = inputs[0].double().reshape(-1, inputs[0].shape[-1])
                sums[name] = sums.get(name, 0) + x.square().sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(tokens, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] / counts[name] for name in sums}


def assert_statistics_close(actual: dict, expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for name, reference in expected.items():
        got = actual[name].mean_square
        assert got.dtype == torch.float32
        # float32 accumulation against a float64 reference
        torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=0, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])
def test_layer0_statistics_from_captured_inputs(arch):
    """capture_layer_inputs + LayerBlock.collect on layer 0 == hooks on the float model."""
    model = tiny_model(arch)
    tokens = tiny_tokens(5, 24)
    state = capture_layer_inputs(model, "model.layers", tokens, batch_size=2)
    assert len(state.hidden) == 3 and all(len(calls) == 3 for calls in state.calls)  # batches of 2, 2, 1
    # the model is put back together afterwards
    assert all(type(layer).__name__.endswith("DecoderLayer") for layer in model.model.layers)

    layer = model.model.layers[0]
    names = [name for name, m in layer.named_modules() if isinstance(m, nn.Linear)]
    groups = input_groups_of(model, layer)
    statistics = LayerBlock(0, layer, torch.device("cpu"), groups, state).collect(frozenset({"input_mean_square"}), names)
    assert_statistics_close(statistics, reference_mean_squares(model, 0, tokens))


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma2"])
def test_linears_sharing_an_input_share_one_collector(arch):
    """q/k/v (and gate/up) read the same input: one collector serves them, so a Hessian is
    built once per input. Its Hessian, mean square and absmax equal float64 references."""
    model = tiny_model(arch)
    tokens = tiny_tokens(5, 24)
    state = capture_layer_inputs(model, "model.layers", tokens, batch_size=2)
    layer = model.model.layers[0]
    input_groups = input_groups_of(model, layer)
    groups = [group.linears for group in input_groups]
    names = [name for name, m in layer.named_modules() if isinstance(m, nn.Linear)]
    kinds = frozenset({"hessian", "input_mean_square", "input_absmax", "input_absmean"})
    statistics = LayerBlock(0, layer, torch.device("cpu"), input_groups, state).collect(kinds, names)
    assert set(statistics) == set(names)
    collectors = {id(s) for s in statistics.values()}
    assert len(collectors) == len(groups)  # one per input
    assert len(groups) < len(names) or arch == "phi3"  # phi3 fuses q/k/v and gate/up: nothing left to share
    for group in groups:
        assert len({id(statistics[name]) for name in group}) == 1
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = [
        layer.get_submodule(name).register_forward_hook(lambda _m, i, _o, name=name: inputs.setdefault(name, []).append(i[0]))
        for name in names
    ]
    with torch.no_grad():
        model(tokens, use_cache=False)
    for handle in handles:
        handle.remove()
    for name in names:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[name]]).double()
        got = statistics[name]
        torch.testing.assert_close(got.hessian.double(), x.T @ x / x.shape[0], rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(got.mean_square.double(), x.square().mean(0), rtol=1e-5, atol=0, msg=name)
        torch.testing.assert_close(got.absmax.double(), x.abs().amax(0), rtol=1e-6, atol=0, msg=name)
        torch.testing.assert_close(got.absmean.double(), x.abs().mean(0), rtol=1e-5, atol=0, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_calibrated_quantization_matches_reference(arch, monkeypatch):
    """int4-g32+clip with calibration: every layer's statistics and every linear's codes equal
    a reference built from our own hooks (layer 1 on the partially quantized model)."""
    from lowbit import pipeline

    original = tiny_model(arch)
    model = copy.deepcopy(original)
    tokens = tiny_tokens(10, 24)  # more than one batch of 8: batches are accumulated
    recorded = []
    real = pipeline.LayerBlock.collect

    def recording(block, kinds, names):
        result = real(block, kinds, names)
        recorded.append(result)
        return result

    monkeypatch.setattr(pipeline.LayerBlock, "collect", recording)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_quietly(model, "int4-g32+clip", calibration=tokens)
    assert len(recorded) == 2  # one collection per decoder layer
    assert model.lowbit_manifest["calibration"] == {"samples": 10, "length": 24}

    layer0 = reference_mean_squares(original, 0, tokens)
    partially_quantized = copy.deepcopy(original)
    partially_quantized.model.layers[0] = copy.deepcopy(model.model.layers[0])
    layer1 = reference_mean_squares(partially_quantized, 1, tokens)
    assert_statistics_close(recorded[0], layer0)
    assert_statistics_close(recorded[1], layer1)
    # the check can tell: the float model's layer-1 statistics are measurably different
    float_layer1 = reference_mean_squares(original, 1, tokens)
    assert max(((float_layer1[n] - layer1[n]).abs() / layer1[n]).max().item() for n in layer1) > 1e-3

    fmt = get_format("int4-g32")
    differs_from_plain = 0
    for index, statistics in ((0, layer0), (1, layer1)):
        for name, mean_square in statistics.items():
            full = f"model.layers.{index}.{name}"
            weight = original.get_submodule(full).weight.data
            expected = quantize_rtn(weight, fmt, RTNConfig(clip_search=True), mean_square.float())
            got = model.get_submodule(full).qtensor
            assert all(torch.equal(got.parts[p], expected.parts[p]) for p in expected.parts), full
            differs_from_plain += not torch.equal(got.parts["scale"], fmt.quantize(weight).parts["scale"])
            assert model.lowbit_manifest["modules"][full] == {
                "format": "int4-g32", "spec": fmt.spec(), "algorithm": "rtn", "clip_search": True
            }  # fmt: skip
    assert differs_from_plain > 0  # the search did clip


def test_gemma2_layers_get_their_own_attention_masks():
    """Gemma 2 alternates sliding-window and full attention: each layer's recorded mask is
    the one it needs (sliding window 16, 24 tokens, so the two differ)."""
    model = tiny_model("gemma2")
    length = 24
    window = model.config.sliding_window
    tokens = tiny_tokens(3, length)
    state = capture_layer_inputs(model, "model.layers", tokens, batch_size=2)
    i = torch.arange(length).unsqueeze(1)
    j = torch.arange(length).unsqueeze(0)
    causal = j <= i
    expected = {"sliding_attention": causal & (i - j < window), "full_attention": causal}
    layer_types = model.config.layer_types
    assert set(layer_types) == set(expected)
    for index, calls in enumerate(state.calls):
        for call in calls:
            mask = call.kwargs["attention_mask"]
            allowed = mask if mask.dtype == torch.bool else mask == 0
            assert allowed.shape[-2:] == (length, length)
            for row in allowed.reshape(-1, length, length):
                assert torch.equal(row, expected[layer_types[index]]), (index, layer_types[index])


def test_calibration_is_ignored_with_a_warning_when_no_algorithm_uses_it():
    model = tiny_model("llama")
    plain = quantize_quietly(copy.deepcopy(model), "int4-g32")
    with pytest.warns(UserWarning, match="uses no calibration statistics"):
        quantize_quietly(model, "int4-g32", calibration=tiny_tokens())
    assert model.lowbit_manifest["calibration"] is None
    for name, module in plain.named_modules():
        if isinstance(module, QuantLinear):
            assert torch.equal(module.weight_packed, model.get_submodule(name).weight_packed)


# -- memory -----------------------------------------------------------------------------


@pytest.mark.parametrize("calibrated", [False, True])
def test_no_second_copy_survives_quantization(calibrated):
    """Modules are replaced in place and the dense weights they held are released: nothing
    (no calibration state, no closure, no manifest) keeps a second float copy alive."""
    model = tiny_model("mistral")
    embedding_storage = model.get_input_embeddings().weight.data_ptr()
    names = decoder_linear_names(model)
    dense = [weakref.ref(model.get_submodule(name)) for name in names]
    dense_weights = [weakref.ref(model.get_submodule(name).weight) for name in names]
    kwargs = {"calibration": tiny_tokens(4, 24)} if calibrated else {}
    result = quantize_quietly(model, "int4-g32+clip" if calibrated else "int4-g32", **kwargs)
    gc.collect()
    assert result is model
    assert all(ref() is None for ref in dense), "a replaced nn.Linear is still referenced"
    assert all(ref() is None for ref in dense_weights), "a replaced dense weight is still referenced"
    assert model.get_input_embeddings().weight.data_ptr() == embedding_storage  # not copied
    assert next(model.parameters()).device.type == "cpu"


# -- architectures ----------------------------------------------------------------------


def tiny_bert():
    from transformers import AutoConfig, AutoModelForMaskedLM

    config = AutoConfig.for_model(
        "bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=256
    )
    return AutoModelForMaskedLM.from_config(config).eval()


@pytest.mark.parametrize(
    "make", [tiny_bert, lambda: nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))], ids=["bert", "plain-module"]
)
def test_unsupported_architecture_is_refused(make):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LowbitError, match="unsupported architecture") as error:
        quantize_quietly(model, "int8")
    for name in ARCHITECTURES:
        assert name in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def _renamed_llama():
    model = tiny_model("llama")
    model.config.model_type = "my-llama-variant"
    return model


def _tiny_causal(model_type, **config):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)).eval()


FALLBACKS = {
    "renamed-llama": (_renamed_llama, "model.layers"),
    "gpt_neox": (
        lambda: _tiny_causal(
            "gpt_neox", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=256
        ),
        "gpt_neox.layers",
    ),
    "opt": (
        lambda: _tiny_causal(
            "opt", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96, vocab_size=256, word_embed_proj_dim=64
        ),
        "model.decoder.layers",
    ),
}


@pytest.mark.parametrize("name", FALLBACKS)
def test_generic_fallback_warns_and_works(name):
    make, path = FALLBACKS[name]
    model = make()
    tokens = tiny_tokens()
    with torch.no_grad():
        reference = model(tokens).logits
    with pytest.warns(UserWarning, match=rf"not in lowbit's tested list.*{path}"):
        quantize_quietly(model, "int8")
    layers = model.get_submodule(path)
    linears = [m for m in layers.modules() if isinstance(m, (nn.Linear, QuantLinear))]
    assert linears and all(isinstance(m, QuantLinear) for m in linears)
    with torch.no_grad():
        assert relative_error(model(tokens).logits, reference) < LOGIT_BOUND["int8"]


def test_gpt2_fallback_warns_and_works():
    model = _tiny_causal("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0)
    with pytest.warns(UserWarning, match="transformer.h"):
        quantize_quietly(model, "int8")
    assert any(isinstance(m, QuantLinear) for m in model.transformer.h.modules())


# -- plans against a model ----------------------------------------------------------------


def test_plan_rule_that_matches_nothing_warns():
    model = tiny_model("llama")
    plan = Plan([make_rule("*.no_such_proj", "int8"), make_rule("*.mlp.*", "int8")])
    with pytest.warns(UserWarning, match=r"'\*\.no_such_proj' matches no linear layer"):
        quantize_quietly(model, plan)
    assert set(model.lowbit_manifest["modules"]) == {n for n in decoder_linear_names(tiny_model("llama")) if ".mlp." in n}
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear


def test_plan_first_match_wins_on_a_model():
    model = tiny_model("qwen3")
    plan = Plan(
        [
            make_rule("*.down_proj", "int8"),
            make_rule("*.mlp.*", "nf4"),
            make_rule("*.self_attn.*", "keep"),
            make_rule("*", "int4-g32"),
        ]
    )
    quantize_quietly(model, plan)
    for name in decoder_linear_names(tiny_model("qwen3")):
        module = model.get_submodule(name)
        if name.endswith("down_proj"):
            assert module.format_name == "int8"
        elif ".mlp." in name:
            assert module.format_name == "nf4"
        else:
            assert type(module) is nn.Linear, name
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.format_name == "int4-g32"


def test_plan_that_quantizes_nothing_errors():
    model = tiny_model("llama")
    with pytest.raises(LowbitError, match="quantizes no layer"):
        quantize_quietly(model, Plan([make_rule("*", "keep")]))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_quantizing_a_quantized_model_errors():
    model = quantize_quietly(tiny_model("llama"), "int4-g32")
    packed = model.model.layers[0].self_attn.q_proj.weight_packed.clone()
    with pytest.raises(LowbitError):
        quantize_quietly(model, "int8")
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight_packed, packed)
    fully = quantize_quietly(tiny_model("llama"), Plan([make_rule("*", "int8")]))
    with pytest.raises(LowbitError, match="already quantized"):
        quantize_quietly(fully, "int8")


def test_quantizing_a_preset_quantized_model_says_already_quantized():
    model = quantize_quietly(tiny_model("llama"), "int4-g32")
    with pytest.raises(LowbitError, match="already quantized"):
        quantize_quietly(model, "int8")


def test_requantizing_refuses_or_keeps_a_loadable_manifest(tmp_path):
    model = quantize_quietly(tiny_model("llama"), "int4-g32")
    try:
        quantize_quietly(model, Plan([make_rule("*", "int8")]))
    except LowbitError:
        return  # refusing is a fine answer
    assert "model.layers.0.self_attn.q_proj" in model.lowbit_manifest["modules"]
    lowbit.save(model, tmp_path / "out")
    lowbit.load(tmp_path / "out")


# -- tied embeddings ----------------------------------------------------------------------


def test_quantizing_a_tied_lm_head_unties_it():
    original = tiny_model("llama")
    assert original.config.tie_word_embeddings
    assert original.lm_head.weight is original.get_input_embeddings().weight
    model = copy.deepcopy(original)
    quantize_quietly(model, Plan([make_rule("*", "int8")]))
    embedding = model.get_input_embeddings()
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.format_name == "int8"
    assert model.config.tie_word_embeddings is False
    # the embedding stays dense, a float32 Parameter, rounded to the 16 bits it is stored in
    assert isinstance(embedding.weight, nn.Parameter) and embedding.weight.dtype == torch.float32
    assert torch.equal(embedding.weight, original.get_input_embeddings().weight.half().float())
    expected = get_format("int8").quantize(original.get_input_embeddings().weight.data)
    assert torch.equal(model.lm_head.weight_packed, expected.parts["packed"])
    # the footprint has the dense embedding once and the packed head
    vocab, hidden = embedding.weight.shape
    assert model.get_memory_footprint() == footprint_by_hand(model)
    assert model.lm_head.qtensor.nbytes == get_format("int8").storage_bytes((vocab, hidden))
    tokens = tiny_tokens()
    with torch.no_grad():
        assert relative_error(model(tokens).logits, original(tokens).logits) < LOGIT_BOUND["int8"]


def test_quantize_accepts_a_device_and_a_format_name():
    model = tiny_model("phi3")
    quantize_quietly(model, "int5-g16", device="cpu")
    assert model.lowbit_manifest["plan"]["name"] == "int5-g16"
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.format_name == "int5-g16"
    out_features, in_features = qkv.out_features, qkv.in_features
    groups = math.ceil(in_features / 16)
    # asymmetric int5: codes + float16 scales + 5-bit zeros, per row
    assert qkv.qtensor.nbytes == out_features * (math.ceil(in_features * 5 / 8) + 2 * groups + math.ceil(groups * 5 / 8))


def test_lm_head_without_statistics_warns():
    model = tiny_model("llama", tie_word_embeddings=False)
    plan = Plan([make_rule("*", "int4-g32+clip")])
    with pytest.warns(UserWarning, match="lm_head is outside the decoder layers"):
        quantize_model(copy.deepcopy(model), plan, calibration=tiny_tokens(4, 16), progress=False)
