"""Kernels: how a quantized linear layer multiplies, chosen per format family and device.

The registry maps ``(fmt.family, device.type)`` to a :class:`Kernel` class; ``kernel_for``
returns an instance of the registered one when it supports the format, and otherwise the
torch :class:`ReferenceKernel`, which handles every format on every device and is the
oracle every faster kernel is tested against. A kernel plugs in by registering itself;
nothing else changes. How a Triton W4A16 kernel would (it need not touch ``backward_input``:
the default recomputes the dense weight for the gradient)::

    @register_kernel("int", "cuda")
    class TritonW4A16(Kernel):
        @classmethod
        def supports(cls, fmt): return fmt.bits == 4 and fmt.group_size in (32, 64, 128)
        def prepare(self, module): module.register_buffer("kernel_qweight", repack_int32(module.weight_packed), persistent=False)
        def forward(self, module, x): return w4a16_gemm(x, module.kernel_qweight, module.weight_scale, module.weight_zero)

``QuantLinear`` asks for its kernel lazily, at its first forward on a device, and again
after it moves to another device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from lowbit.kernels.activation import fake_quantize_int8_per_token
from lowbit.kernels.base import Kernel
from lowbit.kernels.dense import DenseKernel, available_memory
from lowbit.kernels.reference import ReferenceKernel

if TYPE_CHECKING:
    from lowbit.formats import Format

#: (format family, device type) -> kernel class
KERNELS: dict[tuple[str, str], type[Kernel]] = {}


def register_kernel(family: str, device_type: str) -> Callable[[type[Kernel]], type[Kernel]]:
    """Class decorator: the kernel for formats of ``family`` ("int", "nf4", "fp8", "mxfp4",
    "float") on devices of ``device_type`` ("cuda", "cpu", …)."""

    def register(kernel: type[Kernel]) -> type[Kernel]:
        key = (family, device_type)
        if key in KERNELS:
            raise ValueError(f"a kernel for {family} on {device_type} is already registered: {KERNELS[key].__name__}")
        KERNELS[key] = kernel
        return kernel

    return register


def kernel_for(fmt: Format, device: torch.device | str) -> Kernel:
    """The kernel for ``fmt`` on ``device``: the registered one if it supports ``fmt``, else the reference."""
    kernel = KERNELS.get((fmt.family, torch.device(device).type))
    return kernel() if kernel is not None and kernel.supports(fmt) else ReferenceKernel()


__all__ = [
    "KERNELS",
    "DenseKernel",
    "Kernel",
    "ReferenceKernel",
    "available_memory",
    "fake_quantize_int8_per_token",
    "kernel_for",
    "register_kernel",
]
