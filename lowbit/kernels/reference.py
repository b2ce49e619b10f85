"""The torch reference kernel: dequantize with the format, then multiply.

It runs on any device torch runs on and handles every format, which makes it both the
fallback when no faster kernel is registered and the oracle faster kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.kernels.base import Kernel


class ReferenceKernel(Kernel):
    """``F.linear`` with the weight dequantized by ``fmt.dequantize(qtensor, x.dtype)`` on every call."""

    def forward(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, module.dequantize_weight(x.dtype))
