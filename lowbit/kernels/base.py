"""The kernel interface: how a QuantLinear multiplies by the weight it stores packed.

A kernel is stateless; whatever it needs besides the module's canonical parts (a repacked
copy of the codes, a dense copy of the weight …) it builds in :meth:`Kernel.prepare` as
*non-persistent* buffers of the module, so ``state_dict()`` and checkpoints keep only the
canonical layout, and ``module.to(device)`` moves the prepared copy with the parts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lowbit.formats import Format


class Kernel(ABC):
    """``y = x W^T`` (no bias) and ``grad_x = grad_y W`` for one quantized linear module.

    ``module`` is a :class:`lowbit.nn.QuantLinear`: ``format``, ``in_features``,
    ``out_features``, the parts as buffers ``weight_<part>``, and ``dequantize_weight(dtype)``.
    """

    @classmethod
    def supports(cls, fmt: Format) -> bool:
        """Whether this kernel handles ``fmt`` (a family's kernel may cover only some of its
        formats, e.g. 4-bit integers at certain group sizes); others get the reference."""
        return True

    def prepare(self, module: torch.nn.Module) -> None:
        """Build what :meth:`forward` needs beyond the parts, as non-persistent buffers of
        ``module``. Called once per device, before the first forward there."""

    @abstractmethod
    def forward(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` in ``x.dtype``, for ``x`` of shape ``(..., in_features)``."""

    def backward_input(self, module: torch.nn.Module, grad_y: torch.Tensor) -> torch.Tensor:
        """``grad_y @ W`` for ``grad_y`` of shape ``(..., out_features)``: the weight is
        dequantized again rather than kept from the forward pass, so training on a frozen
        quantized base never holds a dense copy of it."""
        return grad_y.matmul(module.dequantize_weight(grad_y.dtype))
