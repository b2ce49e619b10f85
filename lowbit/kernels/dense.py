"""A kernel that trades memory for speed: the weight dequantized once, kept dense.

Dequantizing every weight on every forward dominates small-batch generation on a CPU
(a token touches each weight once, so unpacking costs as much as the multiply).
:class:`DenseKernel` dequantizes once in :meth:`~DenseKernel.prepare` into a non-persistent
buffer and then runs a plain ``F.linear``: the speed of the float model, at the memory of
a dense weight. ``lowbit.nn.dense_cache`` installs it on a model's layers within a byte budget.
"""

from __future__ import annotations

import psutil
import torch
import torch.nn.functional as F

from lowbit.kernels.base import Kernel

#: the non-persistent buffer holding the dense weight
DENSE_BUFFER = "kernel_dense_weight"


class DenseKernel(Kernel):
    """``F.linear`` with the weight dequantized once to ``dtype`` when prepared."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def prepare(self, module: torch.nn.Module) -> None:
        module.register_buffer(DENSE_BUFFER, module.dequantize_weight(self.dtype), persistent=False)

    def forward(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, getattr(module, DENSE_BUFFER).to(x.dtype))

    def backward_input(self, module: torch.nn.Module, grad_y: torch.Tensor) -> torch.Tensor:
        return grad_y.matmul(getattr(module, DENSE_BUFFER).to(grad_y.dtype))


def available_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now: CUDA's free memory, the host's available memory for the
    CPU, and 0 for device types whose free memory torch cannot tell (pass a budget there)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        return psutil.virtual_memory().available
    return 0
