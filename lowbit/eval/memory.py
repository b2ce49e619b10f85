"""What a model's weights take: bytes of every stored tensor, and bits per weight of its linears."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.arch import decoder_layers
from lowbit.nn import PART_PREFIX, QuantLinear, is_linear, unique_state_dict


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and persistent buffers, each shared (tied) tensor counted once.

    This is what a checkpoint of the model holds. (transformers' ``get_memory_footprint``
    also counts non-persistent buffers such as rotary tables, which are not weights.) The
    tensors a quantized model keeps unquantized count at the size its manifest stores them in
    (``kept_dtype``), not the dtype it computes in.
    """
    kept = (getattr(model, "lowbit_manifest", None) or {}).get("kept_dtype")
    kept_size = getattr(torch, kept).itemsize if isinstance(kept, str) else None
    parts = {f"{name}.{PART_PREFIX}{part}" for name, m in model.named_modules() if isinstance(m, QuantLinear) for part in m.part_names}
    return sum(
        t.numel() * (kept_size if kept_size and t.is_floating_point() and key not in parts else t.element_size())
        for key, t in unique_state_dict(model).items()
    )


def linear_weight_stats(model: nn.Module) -> tuple[int, int]:
    """``(bytes, weights)`` of the decoder layers' linear weights, quantized or not.

    Quantized: the bytes of the QTensor parts (codes, scales, zeros). Dense: the weight
    tensor. Biases are not weights here. These are the layers every preset quantizes, so
    bits per weight computed from them compare like for like across schemes.
    """
    _, layers = decoder_layers(model)
    total_bytes = total_weights = 0
    for module in layers.modules():
        if isinstance(module, QuantLinear):
            q = module.qtensor
            total_bytes += q.nbytes
            total_weights += q.numel
        elif is_linear(module):
            total_bytes += module.weight.numel() * module.weight.element_size()
            total_weights += module.weight.numel()
    return total_bytes, total_weights


def bits_per_weight(model: nn.Module) -> float:
    """Exact bits per weight of the decoder layers' linears, scales and zero points included."""
    total_bytes, total_weights = linear_weight_stats(model)
    return 8 * total_bytes / total_weights
