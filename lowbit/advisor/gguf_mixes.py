"""llama.cpp's quantization mixes (``gguf:Q4_K_M`` …), as data.

A mix is a ``llama-quantize`` file type: the type of each tensor is chosen by the rules of
``llama_tensor_get_type`` (src/llama-quant.cpp, without an importance matrix), written here
as data; rows that are not a multiple of a type's block fall back as ``tensor_type_fallback``
does. ``token_embd`` and ``output`` are quantized as the mix says; norms, biases and routers
are F32, as ``convert_hf_to_gguf.py`` writes them. The block geometry of each type is
``lowbit.formats.gguf_types``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lowbit.advisor.shapes import (
    BIAS,
    EMBEDDING,
    LM_HEAD,
    NORM,
    ROUTER,
    Dimensions,
    ParameterShape,
    parameter_shapes,
    sizing_config,
)
from lowbit.arch import ATTN_K, ATTN_OUTPUT, ATTN_V, FFN_DOWN
from lowbit.config import ConfigSource
from lowbit.errors import UnknownNameError
from lowbit.formats.gguf_types import GGML_TYPES, TENSOR_TYPE_FALLBACK, GgmlType


@dataclass(frozen=True)
class LayerSite:
    """Where a tensor sits, as llama.cpp's type rules see it."""

    layer: int | None
    layers: int
    gqa_ratio: int  # n_head / n_head_kv
    experts: int


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers, and every third between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


#: The conditions a rule may name; each is true or false for a tensor at a ``LayerSite``.
RULE_CONDITIONS: dict[str, Callable[[LayerSite], bool]] = {
    "always": lambda site: True,
    "more_bits": lambda site: use_more_bits(site.layer, site.layers),
    "first_eighth": lambda site: site.layer < site.layers // 8,
    "first_sixteenth": lambda site: site.layer < site.layers // 16,
    "first_2_layers": lambda site: site.layer < 2,
    "first_4_layers": lambda site: site.layer < 4,
    "gqa_4": lambda site: site.gqa_ratio >= 4,
    "8_experts": lambda site: site.experts == 8,
    # llama.cpp's LLM_TYPE_70B: 80 layers with grouped-query attention (Llama-2/3-70B, Qwen2-72B)
    "70b": lambda site: site.layers == 80 and site.gqa_ratio > 1,
}


@dataclass(frozen=True)
class TypeRule:
    """Tensors of ``kind`` get ``gguf_type`` when the condition ``when`` holds."""

    kind: str
    gguf_type: str
    when: str = "always"


@dataclass(frozen=True)
class TypePromotion:
    """After the rules: tensors of ``kind`` that got one of ``replaces`` get ``gguf_type`` when ``when`` holds."""

    kind: str
    replaces: tuple[str, ...]
    gguf_type: str
    when: str


@dataclass(frozen=True)
class GgufMix:
    """A llama-quantize file type: the base type, and the rules that pick other types per tensor.

    The first rule that matches a tensor decides its type; a tensor no rule matches gets
    ``base``. ``output`` (and a tied ``token_embd``) gets ``output_type``, or Q8_0 when its rows
    are not a multiple of the base type's block.
    """

    base: str
    rules: tuple[TypeRule, ...] = ()
    output_type: str = "Q6_K"


#: Rules every mix applies before its own (llama.cpp bumps Mixtral-style 8-expert models' K and V).
COMMON_RULES = (TypeRule(ATTN_V, "Q8_0", "8_experts"), TypeRule(ATTN_K, "Q8_0", "8_experts"))
#: 70B models: attn_v is 8x smaller than attn_q, so a better type costs almost nothing.
PROMOTIONS = (TypePromotion(ATTN_V, ("Q3_K", "Q4_K"), "Q5_K", "70b"),)

#: llama-quantize's mixes from 8 bits down to 2, as ``llama_tensor_get_type_impl`` picks them without an
#: importance matrix.
GGUF_MIXES: dict[str, GgufMix] = {
    "Q8_0": GgufMix("Q8_0", output_type="Q8_0"),
    "Q6_K": GgufMix("Q6_K"),
    "Q5_K_M": GgufMix("Q5_K", (TypeRule(ATTN_V, "Q6_K", "more_bits"), TypeRule(FFN_DOWN, "Q6_K", "more_bits"))),
    "Q5_K_S": GgufMix("Q5_K"),
    "Q5_1": GgufMix("Q5_1"),
    "Q5_0": GgufMix("Q5_0"),
    "Q4_K_M": GgufMix(
        "Q4_K",
        (
            TypeRule(ATTN_V, "Q6_K", "more_bits"),
            TypeRule(FFN_DOWN, "Q6_K", "more_bits"),
            TypeRule(ATTN_OUTPUT, "Q5_K", "8_experts"),
        ),
    ),
    "Q4_K_S": GgufMix(
        "Q4_K",
        (
            TypeRule(ATTN_V, "Q5_K", "first_4_layers"),
            TypeRule(FFN_DOWN, "Q5_K", "first_eighth"),
            TypeRule(ATTN_OUTPUT, "Q5_K", "8_experts"),
        ),
    ),
    "Q4_1": GgufMix("Q4_1"),
    "Q4_0": GgufMix("Q4_0"),
    "Q3_K_L": GgufMix(
        "Q3_K",
        (
            TypeRule(ATTN_V, "Q5_K"),
            TypeRule(FFN_DOWN, "Q5_K"),
            TypeRule(ATTN_OUTPUT, "Q3_K", "8_experts"),
            TypeRule(ATTN_OUTPUT, "Q5_K"),
        ),
    ),
    "Q3_K_M": GgufMix(
        "Q3_K",
        (
            TypeRule(ATTN_V, "Q5_K", "first_2_layers"),
            TypeRule(ATTN_V, "Q4_K"),
            TypeRule(FFN_DOWN, "Q5_K", "first_sixteenth"),
            TypeRule(FFN_DOWN, "Q4_K"),
            TypeRule(ATTN_OUTPUT, "Q5_K", "8_experts"),
            TypeRule(ATTN_OUTPUT, "Q4_K"),
        ),
    ),
    "Q3_K_S": GgufMix("Q3_K", (TypeRule(ATTN_OUTPUT, "Q5_K", "8_experts"),)),
    "Q2_K": GgufMix(
        "Q2_K",
        (
            TypeRule(ATTN_V, "Q4_K", "gqa_4"),
            TypeRule(ATTN_V, "Q3_K"),
            TypeRule(FFN_DOWN, "Q3_K"),
            TypeRule(ATTN_OUTPUT, "Q5_K", "8_experts"),
            TypeRule(ATTN_OUTPUT, "Q3_K"),
        ),
    ),
}

GGUF_PREFIX = "gguf:"
#: Tensors llama-quantize never quantizes; convert_hf_to_gguf.py writes them as F32.
GGUF_F32_KINDS = frozenset({NORM, BIAS, ROUTER})
#: The last resort for a row no block divides (and what a K-quant mix leaves unquantized).
UNQUANTIZED = "F16"


def _types_the_mixes_write() -> dict[str, GgmlType]:
    chosen = {"F32", UNQUANTIZED, "Q8_0"}  # norms; rows nothing divides; output rows the base cannot hold
    for mix in GGUF_MIXES.values():
        chosen |= {mix.base, mix.output_type} | {rule.gguf_type for rule in mix.rules}
    chosen |= {rule.gguf_type for rule in COMMON_RULES} | {promotion.gguf_type for promotion in PROMOTIONS}
    chosen |= {TENSOR_TYPE_FALLBACK[name] for name in chosen if name in TENSOR_TYPE_FALLBACK}
    return {name: GGML_TYPES[name] for name in GGML_TYPES if name in chosen}


#: The ggml types these mixes can write, with their block geometry.
GGUF_TYPES: dict[str, GgmlType] = _types_the_mixes_write()


def is_gguf_name(format_name: str) -> bool:
    """Whether ``format_name`` names a llama.cpp mix (``gguf:...``) rather than a lowbit format."""
    return format_name.strip().lower().startswith(GGUF_PREFIX)


def gguf_mix(name: str) -> GgufMix:
    """The mix called ``name`` (``gguf:Q4_K_M`` or ``Q4_K_M``, any case)."""
    key = name.strip().upper().removeprefix(GGUF_PREFIX.upper())
    if key not in GGUF_MIXES:
        raise UnknownNameError(
            f"unknown GGUF mix {name!r}. Known mixes: {', '.join(GGUF_PREFIX + m for m in GGUF_MIXES)}."
        )
    return GGUF_MIXES[key]


def gguf_tensor_types(config_or_path: ConfigSource, mix_name: str) -> list[tuple[str, str]]:
    """``(parameter name, ggml type)`` for every tensor, as llama-quantize would write the mix."""
    config = sizing_config(config_or_path)
    dims, mix = Dimensions.of(config), gguf_mix(mix_name)
    return [(p.name, gguf_type_of(p, mix, dims)) for p in parameter_shapes(config)]


def gguf_type_of(parameter: ParameterShape, mix: GgufMix, dims: Dimensions) -> str:
    """The rules of ``llama_tensor_get_type`` for one tensor, then the fallback for its row length."""
    if parameter.kind in GGUF_F32_KINDS:
        return "F32"
    row = parameter.shape[-1]
    if parameter.kind == LM_HEAD or (parameter.kind == EMBEDDING and dims.tied):
        chosen = "Q8_0" if row % GGUF_TYPES[mix.base].block_size else mix.output_type
    else:
        site = LayerSite(parameter.layer, dims.layers, dims.heads // dims.kv_heads, dims.experts)
        chosen = _first_rule_type(parameter.kind, COMMON_RULES + mix.rules, site) or mix.base
        for promotion in PROMOTIONS:
            if (
                promotion.kind == parameter.kind
                and chosen in promotion.replaces
                and RULE_CONDITIONS[promotion.when](site)
            ):
                chosen = promotion.gguf_type
    return type_for_row(chosen, row)


def _first_rule_type(kind: str, rules: Iterable[TypeRule], site: LayerSite) -> str | None:
    return next((rule.gguf_type for rule in rules if rule.kind == kind and RULE_CONDITIONS[rule.when](site)), None)


def type_for_row(gguf_type: str, row: int) -> str:
    """``gguf_type`` if ``row`` is a multiple of its block, else llama.cpp's fallback, else F16."""
    if row % GGUF_TYPES[gguf_type].block_size == 0:
        return gguf_type
    fallback = TENSOR_TYPE_FALLBACK.get(gguf_type)
    if fallback is not None and row % GGUF_TYPES[fallback].block_size == 0:
        return fallback
    return UNQUANTIZED  # llama.cpp does so for K-quants, and refuses a legacy type outright


def gguf_tensor_bytes(gguf_type: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ``shape`` stored in ``gguf_type`` (rows run along the last dimension)."""
    block = GGUF_TYPES[gguf_type]
    row = shape[-1]
    return math.prod(shape[:-1]) * (row // block.block_size) * block.block_bytes
