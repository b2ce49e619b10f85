"""Activation quantizers: callables ``x -> x`` fake-quantized, for ``QuantLinear.input_quantizer``.

With one set, a QuantLinear multiplies the quantized activations, so evaluation measures
what a W8A8 kernel would really compute, while the arithmetic stays in floating point.
"""

from __future__ import annotations

import torch

INT8_MAX = 127


def fake_quantize_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic symmetric INT8 per token: each row of the last dimension gets
    ``scale = max|x| / 127``, codes ``clamp(round(x / scale), -128, 127)`` (round half to even),
    and comes back as ``codes * scale`` in ``x.dtype``. Computed in float32; an all-zero token
    stays zero.

    The gradient passes straight through (the straight-through estimator), so the quantizer
    can sit in front of a layer that is being trained.
    """
    values = x.detach().float()
    scale = values.abs().amax(-1, keepdim=True) / INT8_MAX
    codes = torch.round(values / torch.where(scale == 0, torch.ones_like(scale), scale)).clamp(-INT8_MAX - 1, INT8_MAX)
    quantized = (codes * scale).to(x.dtype)
    if x.requires_grad and torch.is_grad_enabled():
        return quantized + (x - x.detach())
    return quantized
