"""Bytes of all the weights of a model in one format, from its config alone.

- **lowbit formats** quantize the linear layers of the decoder blocks: attention q/k/v/o and
  MLP gate/up/down, every expert included. Each matrix costs exactly what the format stores for
  it (``Format.storage_bytes``: codes, scales and zero points, a partial last group included).
  Token embeddings and ``lm_head`` stay in 16 bits, as lowbit keeps them by default, and so do
  norms, biases and MoE routers (a handful of small, sensitive tensors no quantizer touches).
  In ``fp32`` everything is 4 bytes. So in ``bf16`` every parameter is exactly 2 bytes and the
  familiar "2 bytes x parameters" figures come out; in a 4-bit format the 16-bit embeddings
  add a visible share for models with a large vocabulary (Llama-3: 2 x 1.05 B parameters).
- **GGUF mixes** (``gguf:Q4_K_M`` …) give every tensor the type llama.cpp would
  (``lowbit.advisor.gguf_mixes``). The figure is the tensor data; a file adds its metadata and
  tokenizer (a few MB).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from lowbit.advisor.gguf_mixes import GGUF_PREFIX, gguf_mix, gguf_tensor_bytes, gguf_types_of, is_gguf_name
from lowbit.advisor.memory import HALF_BYTES
from lowbit.advisor.shapes import (
    EMBEDDING,
    LM_HEAD,
    QUANTIZED_KINDS,
    Dimensions,
    ParameterShape,
    parameter_shapes,
    sizing_config,
)
from lowbit.config import ConfigSource
from lowbit.formats import get_format


def canonical_format_name(format_name: str) -> str:
    """The name reports use: ``int4-g128`` as the registry spells it, GGUF mixes as ``gguf:Q4_K_M``."""
    if is_gguf_name(format_name):
        gguf_mix(format_name)
        return GGUF_PREFIX + format_name.strip().upper().removeprefix(GGUF_PREFIX.upper())
    return get_format(format_name).name


def weight_bytes(config_or_path: ConfigSource, format_name: str, *, keep_embeddings: bool = True) -> int:
    """Bytes of all the weights stored in ``format_name`` (a lowbit format or a ``gguf:`` mix).

    For lowbit formats, the decoder's linear layers take the format's exact storage size and
    the rest stays in 16 bits (fp32 in ``fp32``); ``keep_embeddings=False`` quantizes the
    embeddings and ``lm_head`` too. GGUF mixes decide every tensor, embeddings included, and
    ignore ``keep_embeddings``.
    """
    config = sizing_config(config_or_path)
    return weight_bytes_of_shapes(config, parameter_shapes(config), format_name, keep_embeddings)


def linear_bits_per_weight(config: dict[str, Any], shapes: list[ParameterShape], format_name: str) -> float:
    """Stored bits per weight of the decoder's linear layers in ``format_name``, scales and
    zeros included: the one meaning of "bits/weight" in every lowbit report (compare, eval,
    quantize and size), whatever the embeddings cost."""
    linears = [p for p in shapes if p.kind in QUANTIZED_KINDS]
    if is_gguf_name(format_name):
        types = dict(zip(shapes, gguf_types_of(shapes, format_name, Dimensions.of(config))))
        stored = sum(gguf_tensor_bytes(types[p], p.shape) for p in linears)
    else:
        weight_format = get_format(format_name)
        stored = sum(weight_format.storage_bytes(p.shape) for p in linears)
    return 8 * stored / sum(p.numel for p in linears)


def weight_bytes_of_shapes(
    config: dict[str, Any], shapes: list[ParameterShape], format_name: str, keep_embeddings: bool
) -> int:
    """:func:`weight_bytes` for shapes already computed from ``config`` (a report sizes many formats)."""
    if is_gguf_name(format_name):
        by_type = Counter(zip(gguf_types_of(shapes, format_name, Dimensions.of(config)), (p.shape for p in shapes)))
        return sum(count * gguf_tensor_bytes(gguf_type, shape) for (gguf_type, shape), count in by_type.items())
    weight_format = get_format(format_name)
    quantized_kinds = QUANTIZED_KINDS if keep_embeddings else QUANTIZED_KINDS | {EMBEDDING, LM_HEAD}
    quantized = Counter(p.shape for p in shapes if p.kind in quantized_kinds)
    kept_values = sum(p.numel for p in shapes if p.kind not in quantized_kinds)
    kept_bytes = 4 if weight_format.name == "fp32" else HALF_BYTES
    return (
        sum(count * weight_format.storage_bytes(shape) for shape, count in quantized.items()) + kept_values * kept_bytes
    )
