"""How much memory a model needs, in every format, from its ``config.json`` alone: the public face.

No weight is read. The work is split by concern, one module each:

- ``lowbit.config``: reading the config (a dict, a ``config.json``, or a model directory);
- ``shapes``: the shape of every parameter, from the config and the architecture table;
- ``gguf_mixes``: llama.cpp's per-tensor type rules for its mixes (``gguf:Q4_K_M`` …), as data
  (block geometry in ``lowbit.formats.gguf_types``);
- ``weights``: the bytes of all the weights in a lowbit format or a GGUF mix;
- ``memory``: KV cache, activations, and reading amounts of memory (``24GB``);
- ``report``: ``size_report`` (every figure, JSON-serializable, with its assumptions and notes)
  and ``format_report`` (the table ``lowbit size`` prints).
"""

from __future__ import annotations

from lowbit.advisor.gguf_mixes import (
    GGUF_MIXES,
    GGUF_TYPES,
    gguf_mix,
    gguf_tensor_bytes,
    gguf_tensor_types,
    use_more_bits,
)
from lowbit.advisor.memory import activation_bytes, attention_spans, kv_cache_bytes, layer_types, parse_memory
from lowbit.advisor.report import ASSUMPTIONS, DEFAULT_FORMATS, format_report, size_report
from lowbit.advisor.shapes import ParameterShape, parameter_count, parameter_shapes
from lowbit.advisor.weights import canonical_format_name, weight_bytes
from lowbit.config import read_config

__all__ = [
    "ASSUMPTIONS",
    "DEFAULT_FORMATS",
    "GGUF_MIXES",
    "GGUF_TYPES",
    "ParameterShape",
    "activation_bytes",
    "attention_spans",
    "canonical_format_name",
    "format_report",
    "gguf_mix",
    "gguf_tensor_bytes",
    "gguf_tensor_types",
    "kv_cache_bytes",
    "layer_types",
    "parameter_count",
    "parameter_shapes",
    "parse_memory",
    "read_config",
    "size_report",
    "use_more_bits",
    "weight_bytes",
]
