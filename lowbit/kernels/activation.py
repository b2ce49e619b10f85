"""Activation quantizers: callables ``x -> x`` fake-quantized, for ``QuantLinear.input_quantizer``.

With one set, a QuantLinear multiplies the quantized activations, so evaluation measures
what a W8A8 kernel would really compute, while the arithmetic stays in floating point.

Each quantizer has a name (``ACTIVATION_QUANTIZERS``): a plan rule and a checkpoint's
manifest name the quantizer of a layer (``activations: int8-per-token``), and
:func:`activation_quantizer` turns the name back into the callable, so a W8A8 model
evaluates the same after a save and a load.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowbit.errors import UnknownNameError

INT8_MAX = 127
FP8_E4M3_MAX = 448.0


def _straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    if x.requires_grad and torch.is_grad_enabled():
        return quantized + (x - x.detach())
    return quantized


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
    return _straight_through(x, (codes * scale).to(x.dtype))


def fake_quantize_fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic FP8 E4M3 per token: each row of the last dimension gets
    ``scale = max|x| / 448``; ``x / scale`` is cast to ``float8_e4m3fn`` (round to nearest
    even, within the finite range) and comes back as ``fp8 * scale`` in ``x.dtype``. Computed
    in float32; an all-zero token stays zero. Straight-through gradient, as the INT8 one."""
    values = x.detach().float()
    scale = values.abs().amax(-1, keepdim=True) / FP8_E4M3_MAX
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = (values / divisor).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return _straight_through(x, (codes.float() * scale).to(x.dtype))


#: name (what plans and manifests store) -> activation quantizer
ACTIVATION_QUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "int8-per-token": fake_quantize_int8_per_token,
    "fp8-per-token": fake_quantize_fp8_per_token,
}


def activation_quantizer(name: str | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The activation quantizer called ``name`` (None for None); a clear error listing them."""
    if name is None:
        return None
    if name not in ACTIVATION_QUANTIZERS:
        raise UnknownNameError(f"unknown activation quantizer {name!r}; available: {', '.join(ACTIVATION_QUANTIZERS)}")
    return ACTIVATION_QUANTIZERS[name]
