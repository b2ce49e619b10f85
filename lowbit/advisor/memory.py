"""Memory besides the weights, from a config alone: the KV cache and the activations of one
forward, and amounts of memory as people write them (``24GB``, ``80 GiB``).

- **KV cache**: K and V for every layer, ``num_key_value_heads x head_dim`` values per token
  (so GQA models need ``num_attention_heads / num_key_value_heads`` times less than MHA), 16
  bits per value. A sliding-window layer keeps at most its window, as transformers' and
  llama.cpp's caches do by default.
- **Activations** of one forward over ``batch x context`` tokens with fused attention (no
  ``context x context`` score matrix): per token ``2 x hidden + 3 x MLP width`` values in 16
  bits, plus fp32 logits for the last token of each sequence. Runtimes that feed the prompt in
  chunks (llama.cpp, vLLM) need less.

Sizes are in bytes; ``GB`` means 10^9 bytes and ``GiB`` 2^30 bytes (a card sold as "24 GB" has 24 GiB).
"""

from __future__ import annotations

import re

from lowbit.advisor.shapes import Dimensions, architecture_for_sizing, sizing_config
from lowbit.config import ConfigSource
from lowbit.errors import LowbitError

GB = 10**9
GiB = 2**30

#: CUDA context (0.3-0.6 GiB with PyTorch), cuBLAS/cuDNN workspaces and allocator fragmentation.
RUNTIME_OVERHEAD_BYTES = GiB
#: Bytes of a value kept in 16 bits (bf16 or fp16): KV cache, activations, unquantized tensors.
HALF_BYTES = 2

FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"


def layer_types(config_or_path: ConfigSource) -> list[str]:
    """``full_attention`` or ``sliding_attention`` (or the config's own word) for every layer.

    From ``layer_types`` when the config lists them; otherwise a ``sliding_window`` (unless
    ``use_sliding_window`` is false) applies to every layer, to the layers from
    ``max_window_layers`` on (Qwen), or to all but every ``sliding_window_pattern``-th layer
    (Gemma2 alternates, Gemma3 has one full layer in six).
    """
    config = sizing_config(config_or_path)
    layers = config["num_hidden_layers"]
    if config.get("layer_types"):
        if len(config["layer_types"]) != layers:
            raise LowbitError(f"the config lists {len(config['layer_types'])} layer_types for {layers} layers.")
        return list(config["layer_types"])
    if not config.get("sliding_window") or config.get("use_sliding_window") is False:
        return [FULL_ATTENTION] * layers
    pattern = config.get("sliding_window_pattern") or architecture_for_sizing(config).sliding_window_pattern
    if pattern:
        return [FULL_ATTENTION if (i + 1) % pattern == 0 else SLIDING_ATTENTION for i in range(layers)]
    first_sliding = config.get("max_window_layers") or 0
    return [SLIDING_ATTENTION if i >= first_sliding else FULL_ATTENTION for i in range(layers)]


def attention_spans(config_or_path: ConfigSource, context: int) -> list[int]:
    """Tokens each layer's KV cache holds at ``context``: all of them, or at most the window."""
    config = sizing_config(config_or_path)
    check_positive("context", context)
    window = config.get("sliding_window") or context
    return [min(context, window) if kind == SLIDING_ATTENTION else context for kind in layer_types(config)]


def kv_cache_bytes(config_or_path: ConfigSource, context: int, batch: int = 1, dtype_bytes: int = HALF_BYTES) -> int:
    """Bytes of the KV cache: 2 (K and V) x kv_heads x head_dim x tokens held x batch x bytes, per layer.

    ``num_key_value_heads`` makes it GQA aware; sliding-window layers hold at most their window.
    """
    config = sizing_config(config_or_path)
    check_positive("batch", batch)
    dims = Dimensions.of(config)
    per_token = 2 * dims.kv_heads * dims.head_dim * dtype_bytes
    return per_token * batch * sum(attention_spans(config, context))


def activation_bytes(config_or_path: ConfigSource, context: int, batch: int = 1) -> int:
    """Peak activations of one forward over ``batch x context`` tokens (see the module docstring)."""
    config = sizing_config(config_or_path)
    check_positive("context", context)
    check_positive("batch", batch)
    dims = Dimensions.of(config)
    per_token = (2 * dims.hidden + 3 * dims.mlp_width) * HALF_BYTES
    return batch * context * per_token + batch * dims.vocab * 4


def check_positive(name: str, value: int) -> None:
    """Refuse a ``context`` or ``batch`` that is not a positive whole number."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise LowbitError(f"{name} must be a positive whole number, got {value!r}.")


MEMORY_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": GB, "gb": GB, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": GiB, "tib": 2**40,
}  # fmt: skip
MEMORY_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
MEMORY_FORMS = (
    "a number with a unit: 24GB, 80G or 24000MB (decimal: GB = 10^9 bytes), 24GiB (binary: "
    "GiB = 2^30 bytes), or a plain number of bytes"
)
#: No GPU has less; a smaller amount is a mistake, most likely a forgotten unit ("24" meaning 24 GB).
SMALLEST_MEMORY_BYTES = 2**20


def parse_memory(text: str | int) -> int:
    """Bytes in ``"24GB"``, ``"24 GiB"``, ``"80G"``, ``"24000MB"`` or ``"25769803776"``.

    Decimal units (K, M, G, T with or without B) are powers of 1000; KiB, MiB, GiB, TiB are
    powers of 1024. A plain number is bytes. Less than 1 MiB is refused, so that a forgotten
    unit is not read as a few bytes.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        match = MEMORY_PATTERN.match(str(text))
        if not match or match.group(2).lower() not in MEMORY_UNITS:
            raise LowbitError(f"cannot read {text!r} as an amount of memory. Write {MEMORY_FORMS}.")
        size = round(float(match.group(1)) * MEMORY_UNITS[match.group(2).lower()])
    if size < SMALLEST_MEMORY_BYTES:
        raise LowbitError(f"{text!r} reads as {size} bytes, less than any GPU has. Write {MEMORY_FORMS}.")
    return size
