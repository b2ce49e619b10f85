"""The architecture table against real transformers modules: every linear of every layer in
exactly one input group, the group's members really reading one input, that input really the
output of the named ``previous`` module, and the folds AWQ relies on exact (a per-channel scale
moved into the previous norm or linear leaves the model's logits unchanged)."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import ARCHITECTURES as TESTED
from tiny_models import COMMON, EXTRA, tiny_tokens
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from lowbit.arch import (
    ARCHITECTURES,
    GENERIC,
    KNOWN_ARCHITECTURES,
    LINEAR,
    NORM,
    InputGroup,
    architecture_of,
    decoder_layers,
    input_groups_of,
)
from lowbit.errors import LowbitError

#: configs of the families known to sizing but not pipeline-tested (MoE ones kept small)
SIZING_ONLY_EXTRA = {
    "granite": {},
    "gemma3_text": {"sliding_window": 16, "query_pre_attn_scalar": 24},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48,
    },
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
}
FAMILIES = tuple(KNOWN_ARCHITECTURES)
MHA = {"num_key_value_heads": COMMON["num_attention_heads"]}


def family_model(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random ``model_type`` causal LM in float32 with weights wide enough to matter."""
    torch.manual_seed(seed)
    extra = EXTRA[model_type] if model_type in EXTRA else SIZING_ONLY_EXTRA[model_type]
    config = AutoConfig.for_model(model_type, **{**COMMON, **extra, **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0, 0.05)
            else:  # norms and biases away from their defaults, so a wrong fold shows
                parameter.normal_(0, 0.3)
    return model.eval()


def linear_names(layer: nn.Module) -> set[str]:
    return {name for name, module in layer.named_modules() if isinstance(module, nn.Linear)}


# -- the table -----------------------------------------------------------------------------------


def test_pipeline_tested_families_are_the_tiny_models():
    assert set(ARCHITECTURES) == set(TESTED)
    assert all(KNOWN_ARCHITECTURES[name].pipeline_tested for name in TESTED)
    assert set(KNOWN_ARCHITECTURES) - set(ARCHITECTURES) == set(SIZING_ONLY_EXTRA)
    assert not any(KNOWN_ARCHITECTURES[name].pipeline_tested for name in SIZING_ONLY_EXTRA)


def test_input_group_needs_a_kind_with_its_previous_module():
    with pytest.raises(ValueError):
        InputGroup(("mlp.down_proj",), "mlp.up_proj")
    with pytest.raises(ValueError):
        InputGroup(("mlp.down_proj",), "mlp.up_proj", "activation")


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_linear_in_exactly_one_group_with_a_kind(model_type):
    model = family_model(model_type)
    architecture = architecture_of(model)
    assert architecture is KNOWN_ARCHITECTURES[model_type]
    for layer in decoder_layers_quietly(model):
        named = [name for group in architecture.input_groups for name in group.linears]
        assert sorted(named) == sorted(linear_names(layer))  # each once, none missing, none extra
        assert set(architecture.linear_kinds) == linear_names(layer)
        assert input_groups_of(model, layer) == architecture.input_groups


#: the llama.cpp architecture convert_hf_to_gguf.py writes each family as
GGUF_ARCHITECTURE = {
    "llama": "LLAMA", "mistral": "LLAMA", "mixtral": "LLAMA", "granite": "GRANITE", "phi3": "PHI3",
    "qwen2": "QWEN2", "qwen2_moe": "QWEN2MOE", "qwen3": "QWEN3", "qwen3_moe": "QWEN3MOE",
    "gemma": "GEMMA", "gemma2": "GEMMA2", "gemma3_text": "GEMMA3",
}  # fmt: skip


@pytest.mark.parametrize("model_type", FAMILIES)
def test_linear_kinds_are_the_names_llama_cpp_gives(model_type):
    import gguf
    from gguf.tensor_mapping import TensorNameMap

    names = TensorNameMap(gguf.MODEL_ARCH[GGUF_ARCHITECTURE[model_type]], 1)
    for local, kind in KNOWN_ARCHITECTURES[model_type].linear_kinds.items():
        assert names.get_name(f"model.layers.0.{local}") == f"blk.0.{kind}", local


@pytest.mark.parametrize("model_type", FAMILIES)
def test_groups_share_the_output_of_their_previous_module(model_type):
    """Hooks on the real modules: a group's linears receive one and the same input, linears that
    do are in one group, and for a norm that input is exactly the norm's output."""
    model = family_model(model_type)
    architecture = KNOWN_ARCHITECTURES[model_type]
    layer = decoder_layers_quietly(model)[0]
    inputs, outputs, handles = {}, {}, []

    def record(name):
        def hook(_module, args, output):
            inputs[name], outputs[name] = args, output

        return hook

    for name, module in layer.named_modules():
        handles.append(module.register_forward_hook(record(name)))
    with torch.no_grad():
        model(tiny_tokens())
    for handle in handles:
        handle.remove()
    group_of = {name: group for group in architecture.input_groups for name in group.linears}
    for a in group_of:  # linears reading one input share a group (one statistic, not two)
        for b in group_of:
            if inputs[a][0].shape == inputs[b][0].shape and torch.equal(inputs[a][0], inputs[b][0]):
                assert group_of[a] is group_of[b], (a, b)
    for group in architecture.input_groups:
        first = inputs[group.linears[0]][0]
        for name in group.linears[1:]:
            assert torch.equal(inputs[name][0], first), (group, name)
        if group.previous_kind == NORM:
            norm = layer.get_submodule(group.previous)
            assert "norm" in type(norm).__name__.lower() and norm.weight.shape == (COMMON["hidden_size"],)
            assert torch.equal(outputs[group.previous].reshape(first.shape), first), group
        elif group.previous_kind == LINEAR:
            assert isinstance(layer.get_submodule(group.previous), nn.Linear)


def decoder_layers_quietly(model: nn.Module) -> nn.ModuleList:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sizing-only families warn that they are not pipeline-tested
        return decoder_layers(model)[1]


# -- folds -------------------------------------------------------------------------------------------


def fold(layer: nn.Module, group: InputGroup, scale: torch.Tensor, norm_offset: float) -> None:
    """Multiply the group's input columns by ``scale``; divide the previous module's output by it."""
    with torch.no_grad():
        for name in group.linears:
            layer.get_submodule(name).weight.mul_(scale)
        previous = layer.get_submodule(group.previous)
        if group.previous_kind == NORM:
            previous.weight.copy_((norm_offset + previous.weight) / scale - norm_offset)
        else:
            previous.weight.div_(scale[:, None])
            if previous.bias is not None:
                previous.bias.div_(scale)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


FOLDS = [
    (model_type, index)
    for model_type, architecture in KNOWN_ARCHITECTURES.items()
    for index, group in enumerate(architecture.input_groups)
    if group.previous is not None
]


@pytest.mark.parametrize(
    "model_type, index", FOLDS, ids=[f"{t}-{KNOWN_ARCHITECTURES[t].input_groups[i].linears[0]}" for t, i in FOLDS]
)
def test_fold_leaves_the_logits_unchanged(model_type, index):
    """On a multi-head attention config (so v_proj's outputs are o_proj's inputs), in every layer."""
    model = family_model(model_type, **MHA)
    architecture = KNOWN_ARCHITECTURES[model_type]
    group = architecture.input_groups[index]
    tokens = tiny_tokens()
    with torch.no_grad():
        reference = model(tokens).logits
    generator = torch.Generator().manual_seed(index)
    for layer in decoder_layers_quietly(model):
        width = layer.get_submodule(group.linears[0]).in_features
        scale = torch.exp(torch.empty(width).uniform_(-1.4, 1.4, generator=generator))  # 0.25 .. 4
        fold(layer, group, scale, architecture.norm_offset)
    with torch.no_grad():
        assert relative_difference(model(tokens).logits, reference) < 1e-4


@pytest.mark.parametrize("model_type", [t for t, a in KNOWN_ARCHITECTURES.items() if a.norm_offset])
def test_a_fold_that_ignores_norm_offset_changes_the_logits(model_type):
    model = family_model(model_type)
    group = KNOWN_ARCHITECTURES[model_type].input_groups[0]
    tokens = tiny_tokens()
    with torch.no_grad():
        reference = model(tokens).logits
    layer = decoder_layers_quietly(model)[0]
    fold(layer, group, torch.full((COMMON["hidden_size"],), 2.0), norm_offset=0.0)
    with torch.no_grad():
        assert relative_difference(model(tokens).logits, reference) > 1e-2


@pytest.mark.parametrize("model_type", FAMILIES)
def test_grouped_query_attention_has_no_v_to_o_fold(model_type):
    """With GQA v_proj has fewer outputs than o_proj has inputs: an algorithm checking shapes skips the fold."""
    model = family_model(model_type)  # COMMON: 4 heads, 2 KV heads
    layer = decoder_layers_quietly(model)[0]
    for group in KNOWN_ARCHITECTURES[model_type].input_groups:
        if group.previous_kind == LINEAR and group.previous.endswith("v_proj"):
            assert layer.get_submodule(group.previous).out_features < layer.get_submodule(group.linears[0]).in_features


# -- lookups and the fallback ---------------------------------------------------------------------------


def test_architecture_of_a_config_dict():
    assert architecture_of({"model_type": "gemma2"}) is KNOWN_ARCHITECTURES["gemma2"]
    assert architecture_of(AutoConfig.for_model("qwen3")) is KNOWN_ARCHITECTURES["qwen3"]
    with pytest.warns(UserWarning, match="'my-model' is not in lowbit's tested list.*model.layers"):
        generic = architecture_of({"model_type": "my-model"})
    assert generic.model_type == "my-model" and generic.input_groups == () and not generic.pipeline_tested
    assert (generic.qkv_bias, generic.norms_per_layer, generic.tied_by_default) == (False, 2, False)  # Llama layout


def test_unknown_model_gets_one_group_per_linear():
    model = family_model("llama")
    model.config.model_type = "my-llama-variant"
    with pytest.warns(UserWarning, match="not in lowbit's tested list.*model.layers"):
        architecture = architecture_of(model)
    assert architecture.layers_path == "model.layers" and architecture.input_groups == GENERIC.input_groups
    layer = model.model.layers[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # input_groups_of does not repeat the warning
        groups = input_groups_of(model, layer)
    assert sorted(g.linears for g in groups) == sorted((name,) for name in linear_names(layer))
    assert all(g.previous is None for g in groups)


def test_tested_family_has_no_warning_and_sizing_only_family_warns():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path, layers = decoder_layers(family_model("gemma2"))
    assert path == "model.layers" and len(layers) == COMMON["num_hidden_layers"]
    with pytest.warns(UserWarning, match="'mixtral' is not in lowbit's tested list.*model.layers"):
        decoder_layers(family_model("mixtral"))


def test_extra_linear_gets_its_own_group_and_a_missing_one_is_refused():
    model = family_model("llama")
    layer = model.model.layers[0]
    layer.mlp.extra_proj = nn.Linear(8, 8)
    groups = input_groups_of(model, layer)
    assert groups[:-1] == KNOWN_ARCHITECTURES["llama"].input_groups
    assert groups[-1] == InputGroup(("mlp.extra_proj",))
    del layer.mlp.up_proj
    with pytest.raises(LowbitError, match="no module mlp.up_proj"):
        input_groups_of(model, layer)


def test_model_without_layers_is_refused():
    with pytest.raises(LowbitError, match="unsupported architecture"):
        architecture_of(nn.Sequential(nn.Linear(4, 4)))
