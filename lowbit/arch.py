"""Architecture knowledge, in one table rather than a class per model family.

Each entry of ``KNOWN_ARCHITECTURES`` says, for one ``model_type``, what neither the weights
nor the config tell: where the decoder layers are, which linears of a layer read the same
input (one Hessian or one activation statistic serves them all) and which module produces
that input (where an AWQ or SmoothQuant scale can be folded), how its norms scale (Gemma's
``1 + weight``), the llama.cpp tensor category of each linear, and the few layout facts the
sizing advisor needs that a ``config.json`` leaves out (Qwen2's q/k/v biases, Gemma's extra
norms …).

``ARCHITECTURES`` is the subset the pipeline is tested on, each with a tiny random model in
the test suite. The other entries are known to the sizing advisor and verified against real
transformers modules in ``tests/test_arch.py``, but not run through the pipeline. Any other
decoder-only model whose layers sit at one of the usual places gets the generic fallback,
with a warning: its layers are found, and each linear is its own input group with nothing to
fold into.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from torch import nn

from lowbit.errors import LowbitError
from lowbit.nn import is_linear

# llama.cpp's tensor categories (the names ``convert_hf_to_gguf.py`` gives a layer's linears,
# on which ``llama-quantize``'s type rules key).
ATTN_Q, ATTN_K, ATTN_V, ATTN_OUTPUT, ATTN_QKV = "attn_q", "attn_k", "attn_v", "attn_output", "attn_qkv"
FFN_GATE, FFN_UP, FFN_DOWN = "ffn_gate", "ffn_up", "ffn_down"
FFN_GATE_SHARED, FFN_UP_SHARED, FFN_DOWN_SHARED = "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"
FFN_ROUTER_SHARED = "ffn_gate_inp_shexp"

NORM, LINEAR = "norm", "linear"


@dataclass(frozen=True)
class InputGroup:
    """Linears of a decoder layer that read the same input, and the module whose output it is.

    ``linears`` are names local to a decoder layer (``self_attn.q_proj``). They share one
    input, so one Hessian or one per-channel statistic serves them all. ``previous`` is the
    module that produces that input and into which a per-input-channel scale ``s`` folds
    exactly (AWQ, SmoothQuant): multiplying the group's input columns by ``s`` is undone by
    dividing ``previous``'s output channels by ``s``.

    - ``previous_kind == "norm"``: divide the norm's multiplier by ``s``. The multiplier is
      ``norm_offset + weight`` (:attr:`Architecture.norm_offset`), so the new weight is
      ``(norm_offset + weight) / s - norm_offset``.
    - ``previous_kind == "linear"``: divide the previous linear's weight rows (and bias) by
      ``s``. This is exact only when that linear's outputs map one to one onto the group's
      inputs, and the algorithm must check the shapes before folding: with grouped-query
      attention ``v_proj`` has fewer outputs than ``o_proj`` has inputs (each value head
      serves several query heads), so the fold does not exist and the scale is skipped, as
      AutoAWQ does.
    - ``None``: no exact fold exists (a fused projection of which only a slice feeds the group,
      or a norm that also feeds modules outside the group); the group still shares statistics.
    """

    linears: tuple[str, ...]
    previous: str | None = None
    previous_kind: str | None = None

    def __post_init__(self) -> None:
        if (self.previous is None) != (self.previous_kind is None) or self.previous_kind not in (None, NORM, LINEAR):
            raise ValueError(f"an input group's previous module needs a kind of {NORM!r} or {LINEAR!r}: {self}")


#: Llama-style layers: attention then a gated MLP, each after an RMSNorm.
LLAMA_GROUPS = (
    InputGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", NORM),
    InputGroup(("self_attn.o_proj",), "self_attn.v_proj", LINEAR),
    InputGroup(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", NORM),
    InputGroup(("mlp.down_proj",), "mlp.up_proj", LINEAR),
)
#: Gemma 2 and 3 normalize the attention output before the residual (``post_attention_layernorm``)
#: and the MLP input with ``pre_feedforward_layernorm``.
GEMMA2_GROUPS = (
    *LLAMA_GROUPS[:2],
    InputGroup(("mlp.gate_proj", "mlp.up_proj"), "pre_feedforward_layernorm", NORM),
    LLAMA_GROUPS[3],
)
#: Phi-3 fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``. ``o_proj`` reads the
#: attention over the value slice of ``qkv_proj`` and ``down_proj`` the product of the two
#: halves of ``gate_up_proj``: a scale would have to go into a slice of a fused module's rows,
#: which a whole-module fold cannot express, so neither has a ``previous``.
PHI3_GROUPS = (
    InputGroup(("self_attn.qkv_proj",), "input_layernorm", NORM),
    InputGroup(("self_attn.o_proj",)),
    InputGroup(("mlp.gate_up_proj",), "post_attention_layernorm", NORM),
    InputGroup(("mlp.down_proj",)),
)
#: Mixture-of-experts layers: transformers keeps the experts as fused 3-D parameters and the
#: router as its own module, not as linears; their norm feeds them too, so only attention
#: has groups that fold.
MOE_GROUPS = LLAMA_GROUPS[:2]
#: Qwen2-MoE adds a shared expert (a gated MLP of linears) beside the routed ones, with a
#: gate of its own. The norm before them also feeds the router and the experts: no fold.
QWEN2_MOE_GROUPS = (
    *MOE_GROUPS,
    InputGroup(("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert_gate")),
    InputGroup(("mlp.shared_expert.down_proj",), "mlp.shared_expert.up_proj", LINEAR),
)

LLAMA_LINEAR_KINDS: Mapping[str, str] = MappingProxyType({
    "self_attn.q_proj": ATTN_Q,
    "self_attn.k_proj": ATTN_K,
    "self_attn.v_proj": ATTN_V,
    "self_attn.o_proj": ATTN_OUTPUT,
    "mlp.gate_proj": FFN_GATE,
    "mlp.up_proj": FFN_UP,
    "mlp.down_proj": FFN_DOWN,
})  # fmt: skip
#: llama.cpp keeps Phi-3's fusions: ``attn_qkv``, and gate/up as one ``ffn_up`` of twice the width.
PHI3_LINEAR_KINDS: Mapping[str, str] = MappingProxyType({
    "self_attn.qkv_proj": ATTN_QKV,
    "self_attn.o_proj": ATTN_OUTPUT,
    "mlp.gate_up_proj": FFN_UP,
    "mlp.down_proj": FFN_DOWN,
})  # fmt: skip
MOE_LINEAR_KINDS: Mapping[str, str] = MappingProxyType(
    {name: kind for name, kind in LLAMA_LINEAR_KINDS.items() if name.startswith("self_attn.")}
)
QWEN2_MOE_LINEAR_KINDS: Mapping[str, str] = MappingProxyType({
    **MOE_LINEAR_KINDS,
    "mlp.shared_expert.gate_proj": FFN_GATE_SHARED,
    "mlp.shared_expert.up_proj": FFN_UP_SHARED,
    "mlp.shared_expert.down_proj": FFN_DOWN_SHARED,
    "mlp.shared_expert_gate": FFN_ROUTER_SHARED,
})  # fmt: skip


@dataclass(frozen=True)
class Architecture:
    """What lowbit knows of one model family (one ``model_type``)."""

    model_type: str
    #: attribute path of the decoder layers
    layers_path: str = "model.layers"
    #: every linear of a decoder layer in exactly one group; empty when unknown (the generic
    #: fallback), in which case :func:`input_groups_of` makes one group per linear it finds
    input_groups: tuple[InputGroup, ...] = LLAMA_GROUPS
    #: an RMSNorm multiplies by ``norm_offset + weight``: 1 for Gemma, whose norms store ``weight - 1``
    norm_offset: float = 0.0
    #: local linear name -> llama.cpp tensor category
    linear_kinds: Mapping[str, str] = field(default_factory=lambda: LLAMA_LINEAR_KINDS, hash=False)
    # What the sizing advisor needs that a config.json does not say:
    #: q/k/v projections carry a bias (Qwen2), unless the config says otherwise
    qkv_bias: bool = False
    #: an RMSNorm over head_dim for q and for k in every layer (Qwen3, Gemma3)
    qk_norm: bool = False
    #: Gemma2/3 add a norm before and after the MLP
    norms_per_layer: int = 2
    #: tie_word_embeddings when the config omits it
    tied_by_default: bool = False
    #: head_dim when the config omits it (the family's transformers default); None: hidden / heads
    default_head_dim: int | None = None
    #: every N-th layer attends fully, the others slide
    sliding_window_pattern: int | None = None
    #: run through the pipeline in the test suite (a tiny random model per family)
    pipeline_tested: bool = False


def _entries(*architectures: Architecture) -> dict[str, Architecture]:
    return {architecture.model_type: architecture for architecture in architectures}


#: ``model_type`` -> entry, for every family lowbit knows.
KNOWN_ARCHITECTURES: dict[str, Architecture] = _entries(
    Architecture("llama", pipeline_tested=True),
    Architecture("mistral", pipeline_tested=True),
    Architecture("qwen2", qkv_bias=True, pipeline_tested=True),
    Architecture("qwen3", qk_norm=True, default_head_dim=128, pipeline_tested=True),
    Architecture("phi3", input_groups=PHI3_GROUPS, linear_kinds=PHI3_LINEAR_KINDS, pipeline_tested=True),
    Architecture("gemma", norm_offset=1.0, tied_by_default=True, default_head_dim=256, pipeline_tested=True),
    Architecture(
        "gemma2",
        input_groups=GEMMA2_GROUPS,
        norm_offset=1.0,
        norms_per_layer=4,
        tied_by_default=True,
        default_head_dim=256,
        sliding_window_pattern=2,
        pipeline_tested=True,
    ),
    # known to the sizing advisor; module names checked in tests/test_arch.py, not pipeline-tested
    Architecture("granite"),
    Architecture(
        "gemma3_text",
        input_groups=GEMMA2_GROUPS,
        norm_offset=1.0,
        qk_norm=True,
        norms_per_layer=4,
        tied_by_default=True,
        default_head_dim=256,
        sliding_window_pattern=6,
    ),
    Architecture("mixtral", input_groups=MOE_GROUPS, linear_kinds=MOE_LINEAR_KINDS),
    Architecture("qwen2_moe", input_groups=QWEN2_MOE_GROUPS, linear_kinds=QWEN2_MOE_LINEAR_KINDS, qkv_bias=True),
    Architecture("qwen3_moe", input_groups=MOE_GROUPS, linear_kinds=MOE_LINEAR_KINDS, qk_norm=True),
)

#: The families the pipeline is tested on.
ARCHITECTURES: dict[str, Architecture] = {
    model_type: architecture for model_type, architecture in KNOWN_ARCHITECTURES.items() if architecture.pipeline_tested
}

#: The entry for a ``model_type`` not in the table: layers found at one of ``FALLBACK_PATHS``,
#: input groups derived one per linear, the Llama layout for sizing.
GENERIC = Architecture("generic", input_groups=(), linear_kinds=MappingProxyType({}))

#: where other decoder-only models keep their layers
FALLBACK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.blocks")


def _get_path(model: nn.Module, path: str) -> nn.Module | None:
    module = model
    for attribute in path.split("."):
        module = getattr(module, attribute, None)
        if module is None:
            return None
    return module


def _model_type(model_or_config: nn.Module | Mapping[str, Any] | Any) -> str | None:
    if isinstance(model_or_config, Mapping):
        return model_or_config.get("model_type")
    if isinstance(model_or_config, nn.Module):
        return getattr(getattr(model_or_config, "config", None), "model_type", None)
    return getattr(model_or_config, "model_type", None)  # a transformers PretrainedConfig


def _tested_list() -> str:
    return ", ".join(ARCHITECTURES)


def _fallback_layers_path(model: nn.Module, model_type: str | None) -> str:
    for path in FALLBACK_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return path
    raise LowbitError(
        f"unsupported architecture {model_type!r}: lowbit quantizes decoder-only causal LMs "
        f"({_tested_list()}, and others that keep their layers at {' or '.join(FALLBACK_PATHS)})"
    )


def architecture_of(model_or_config: nn.Module | Mapping[str, Any] | Any) -> Architecture:
    """The table entry for a model (an ``nn.Module`` with a ``.config``) or a config (dict or
    ``PretrainedConfig``).

    A ``model_type`` not in the table gets the generic fallback, with a warning: for a model,
    its layers at the first of ``FALLBACK_PATHS`` it has (a clear error if it has none); for a
    config, ``model.layers`` is assumed.
    """
    model_type = _model_type(model_or_config)
    if model_type in KNOWN_ARCHITECTURES:
        return KNOWN_ARCHITECTURES[model_type]
    if isinstance(model_or_config, nn.Module):
        path = _fallback_layers_path(model_or_config, model_type)
    else:
        path = GENERIC.layers_path
    warnings.warn(
        f"architecture {model_type!r} is not in lowbit's tested list ({_tested_list()}); using its layers at "
        f"{path}, each linear with its own input statistics and no scale folding",
        stacklevel=2,
    )
    return replace(GENERIC, model_type=model_type or GENERIC.model_type, layers_path=path)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, layers)`` of a causal LM's decoder layers; a clear error if it has none.

    A family known to the table but not tested through the pipeline is used with a warning,
    as an unknown one is (:func:`architecture_of` warns for those).
    """
    architecture = architecture_of(model)
    model_type = architecture.model_type
    if model_type in KNOWN_ARCHITECTURES and not architecture.pipeline_tested:
        warnings.warn(
            f"architecture {model_type!r} is not in lowbit's tested list ({_tested_list()}); "
            f"using its layers at {architecture.layers_path}",
            stacklevel=2,
        )
    return architecture.layers_path, _get_path(model, architecture.layers_path)


def input_groups_of(model: nn.Module, layer: nn.Module) -> tuple[InputGroup, ...]:
    """The input groups of one decoder ``layer`` of ``model``: the table's, then every linear the
    table does not name (a variant's extra module, or any linear of an unknown family) alone.

    Raises :class:`LowbitError` when the layer lacks a module the table names for its family.
    No warning: :func:`decoder_layers` has already said when the family is not tested.
    """
    model_type = _model_type(model)
    known = KNOWN_ARCHITECTURES.get(model_type, GENERIC).input_groups
    modules = dict(layer.named_modules())
    for group in known:
        for name in (*group.linears, *([group.previous] if group.previous else [])):
            if name not in modules:
                raise LowbitError(
                    f"this {model_type} model's decoder layer has no module {name}, which lowbit's table names "
                    "for that family; it is a variant lowbit does not know (report it with its config.json)"
                )
    named = {name for group in known for name in group.linears}
    alone = tuple(InputGroup((name,)) for name, module in modules.items() if is_linear(module) and name not in named)
    return known + alone


def base_model(model: nn.Module, layers_path: str) -> nn.Module:
    """The module that owns the decoder layers (runs embeddings, masks and layers, not lm_head)."""
    owner_path = layers_path.rsplit(".", 1)[0]
    return _get_path(model, owner_path)
