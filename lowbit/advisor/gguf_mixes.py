"""llama.cpp's quantization mixes (``gguf:Q4_K_M`` …) for sizing, from a config alone.

The type of each tensor is chosen by ``lowbit.export.gguf_mix`` (llama-quantize's
``llama_tensor_get_type``, without an importance matrix), the same code the GGUF writer
quantizes by: this module only names the config's parameters as llama.cpp's rules see them
(``blk.N.attn_v.weight``, ``token_embd.weight``, ``output.weight`` …) and sums the bytes. Norms,
biases and routers stay F32, as ``convert_hf_to_gguf.py`` writes them. The block geometry of
each type is ``lowbit.formats.gguf_types``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

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
from lowbit.config import ConfigSource
from lowbit.errors import UnknownNameError
from lowbit.export.gguf_mix import ModelFacts, TensorSite, choose_types, mix_name, use_more_bits
from lowbit.formats.gguf_types import GGML_TYPES, GgmlType

#: The mixes the sizing report lists, from 8 bits down to 2.
GGUF_MIXES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0",
              "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K")  # fmt: skip

GGUF_PREFIX = "gguf:"
__all__ = ["GGUF_F32_KINDS", "GGUF_MIXES", "GGUF_PREFIX", "GGUF_TYPES", "gguf_mix", "gguf_tensor_bytes",
           "gguf_tensor_types", "gguf_types_of", "is_gguf_name", "use_more_bits"]  # fmt: skip
#: Tensors llama-quantize never quantizes; convert_hf_to_gguf.py writes them as F32.
GGUF_F32_KINDS = frozenset({NORM, BIAS, ROUTER})
#: The ggml types these mixes write (their fallbacks and F16 for rows no block divides included).
GGUF_TYPES: dict[str, GgmlType] = {
    name: GGML_TYPES[name]
    for name in ("F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
}


def is_gguf_name(format_name: str) -> bool:
    """Whether ``format_name`` names a llama.cpp mix (``gguf:...``) rather than a lowbit format."""
    return format_name.strip().lower().startswith(GGUF_PREFIX)


def gguf_mix(name: str) -> str:
    """The canonical name of the mix called ``name`` (``gguf:q4_k_m`` -> ``Q4_K_M``)."""
    key = name.strip().upper().removeprefix(GGUF_PREFIX.upper())
    if key not in GGUF_MIXES:
        raise UnknownNameError(
            f"unknown GGUF mix {name!r}. Known mixes: {', '.join(GGUF_PREFIX + m for m in GGUF_MIXES)}."
        )
    return mix_name(key)


def _sites(shapes: Sequence[ParameterShape]) -> list[TensorSite]:
    """The parameters as llama.cpp names them, as far as its rules look (unique names; the
    experts of a layer, which a GGUF file stacks into one tensor, are numbered)."""
    sites, seen = [], Counter()
    for p in shapes:
        if p.kind == EMBEDDING:
            name = "token_embd.weight"
        elif p.kind == LM_HEAD:
            name = "output.weight"
        elif p.kind == ROUTER:
            name = f"blk.{p.layer}.ffn_gate_inp.weight"
        elif p.kind in (NORM, BIAS):
            name = f"{p.name}:{p.kind}"  # 1-D: F32 whatever the name
        else:
            name = f"blk.{p.layer}.{p.kind}.weight"
        seen[name] += 1
        if seen[name] > 1:
            name = f"{name.removesuffix('.weight')}_{seen[name]}.weight"
        sites.append(TensorSite(name, p.shape))
    return sites


def gguf_types_of(shapes: Sequence[ParameterShape], mix: str, dims: Dimensions) -> list[str]:
    """The ggml type of each parameter in ``shapes`` (all of a model's), as llama-quantize writes ``mix``."""
    facts = ModelFacts(dims.layers, dims.heads, dims.kv_heads, dims.experts)
    sites = _sites(shapes)
    types = choose_types(sites, gguf_mix(mix), facts).types
    return [types[site.name] for site in sites]


def gguf_tensor_types(config_or_path: ConfigSource, mix_name: str) -> list[tuple[str, str]]:
    """``(parameter name, ggml type)`` for every tensor, as llama-quantize would write the mix."""
    config = sizing_config(config_or_path)
    shapes = parameter_shapes(config)
    return [(p.name, kind) for p, kind in zip(shapes, gguf_types_of(shapes, mix_name, Dimensions.of(config)))]


def gguf_tensor_bytes(gguf_type: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ``shape`` stored in ``gguf_type`` (rows run along the last dimension)."""
    block = GGML_TYPES[gguf_type]
    row = shape[-1]
    return math.prod(shape[:-1]) * (row // block.block_size) * block.block_bytes
