"""QuantLinear: the module that replaces ``nn.Linear`` in a quantized model.

It is a plain ``nn.Module``, deliberately not an ``nn.Linear`` subclass: peft and other
tools treat ``nn.Linear`` as a dense weight they may merge into, and this module has none.
The packed parts of its QTensor are *buffers* named ``weight_<part>`` (``weight_packed``,
``weight_scale`` …), never Parameters, so ``get_memory_footprint()`` counts their real packed
size and ``prepare_model_for_kbit_training`` does not cast them to float32.

``forward`` runs through a kernel from ``lowbit.kernels``, chosen per format family and
device the first time the module runs on a device (the torch reference when no faster one is
registered). Kernels may keep repacked copies as non-persistent buffers, so checkpoints hold
only the canonical parts. Under autograd the multiply is one ``autograd.Function`` that saves
nothing of the weight's size: the backward pass dequantizes again, so a frozen quantized base
with trainable adapters (QLoRA) never keeps a dense copy of its weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from lowbit.formats import Format
from lowbit.kernels import DenseKernel, Kernel, available_memory, kernel_for
from lowbit.qtensor import QTensor

PART_PREFIX = "weight_"


class _QuantLinearFunction(torch.autograd.Function):
    """``y = x W^T`` whose backward asks the kernel for ``grad_x`` instead of saving ``W``.
    The quantized weight is frozen: it gets no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantLinear, kernel: Kernel) -> torch.Tensor:
        ctx.module, ctx.kernel = module, kernel
        return kernel.forward(module, x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        grad_x = ctx.kernel.backward_input(ctx.module, grad_y) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored in ``fmt`` (a :class:`~lowbit.formats.Format`).

    ``input_quantizer``: None, or a callable ``x -> x`` fake-quantized (for example
    ``lowbit.kernels.fake_quantize_int8_per_token``) applied to the input first, so that a
    W8A8 layer is evaluated as it would run.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: Format,
        parts: dict[str, torch.Tensor],
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.format = fmt
        self.part_names = tuple(parts)
        for name, tensor in parts.items():
            self.register_buffer(PART_PREFIX + name, tensor)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.input_quantizer: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._chosen_kernel: Kernel | None = None  # set by use_kernel; None: the registry's
        self._kernel: Kernel | None = None  # the prepared kernel, for _kernel_device
        self._kernel_device: torch.device | None = None

    @classmethod
    def from_qtensor(cls, qtensor: QTensor, bias: torch.Tensor | None = None) -> QuantLinear:
        out_features, in_features = qtensor.shape
        return cls(in_features, out_features, qtensor.format, qtensor.parts, bias)

    @property
    def format_name(self) -> str:
        return self.format.name

    @property
    def qtensor(self) -> QTensor:
        parts = {name: getattr(self, PART_PREFIX + name) for name in self.part_names}
        return QTensor(self.format, (self.out_features, self.in_features), parts)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight, in ``dtype`` (the bias's by default)."""
        if dtype is None:
            dtype = self.bias.dtype if self.bias is not None else torch.float32
        return self.format.dequantize(self.qtensor, dtype)

    # -- kernels ------------------------------------------------------------------------
    @property
    def kernel(self) -> Kernel:
        """The kernel this module runs with on its parts' device, prepared on first use there."""
        device = self._parts_device()
        if self._kernel is None or self._kernel_device != device:
            self._install(self._chosen_kernel or kernel_for(self.format, device))
        return self._kernel

    def use_kernel(self, kernel: Kernel | None) -> None:
        """Run with ``kernel`` from now on, prepared at once; None goes back to the registry's
        choice (made at the next forward). What the previous kernel prepared is freed."""
        self._chosen_kernel = kernel
        if kernel is None:
            self._release_kernel()
        else:
            self._install(kernel)

    def _parts_device(self) -> torch.device:
        return getattr(self, PART_PREFIX + self.part_names[0]).device

    def _install(self, kernel: Kernel) -> None:
        self._release_kernel()
        kernel.prepare(self)
        self._kernel, self._kernel_device = kernel, self._parts_device()

    def _release_kernel(self) -> None:
        """Drop the prepared kernel and every buffer it made (all buffers but the parts)."""
        parts = {PART_PREFIX + name for name in self.part_names}
        for name in [name for name, _ in self.named_buffers(recurse=False) if name not in parts]:
            delattr(self, name)
        self._kernel = self._kernel_device = None

    def _apply(self, fn, recurse: bool = True):
        """``.to(device)`` moves the parts; ``.to(dtype)``, ``.half()`` … leave their dtypes alone
        (a float16 scale cast to bfloat16 would change the weights). The bias is cast as usual."""
        parts = {PART_PREFIX + name for name in self.part_names}
        for name in parts:
            buffer = self._buffers[name]
            target = fn(torch.empty(0, dtype=buffer.dtype, device=buffer.device)).device
            self._buffers[name] = buffer.to(target)
        kept = {name: self._buffers.pop(name) for name in parts}
        try:
            return super()._apply(fn, recurse)
        finally:
            self._buffers.update(kept)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        # new part values make anything prepared from the old ones stale
        super()._load_from_state_dict(*args, **kwargs)
        self._release_kernel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        kernel = self.kernel
        if torch.is_grad_enabled() and x.requires_grad:
            y = _QuantLinearFunction.apply(x, self, kernel)
        else:
            y = kernel.forward(self, x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, format={self.format_name}, "
            f"bits_per_weight={self.qtensor.bits_per_weight:.3f}, bias={self.bias is not None}"
        )
        if self.input_quantizer is not None:
            text += f", input_quantizer={getattr(self.input_quantizer, '__name__', self.input_quantizer)}"
        return text


@contextmanager
def dense_cache(model: nn.Module, max_bytes: int | None = None, dtype: torch.dtype | None = None) -> Iterator[int]:
    """For its duration, run the model's QuantLinears from dense copies of their weights.

    Each layer is dequantized once on entry (to ``dtype``; default: the dtype of the model's
    first floating-point parameter, its compute dtype) instead of on every forward, which makes
    small-batch generation about as fast as the float model, at the memory of the dense weights.
    Layers are cached in module order while they fit in ``max_bytes`` per device (default: half
    of the memory available on that device on entry); the rest keep dequantizing per call.
    Yields the bytes the cache holds; everything is freed on exit.
    """
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    budgets: dict[torch.device, int] = {}
    previous: dict[QuantLinear, Kernel | None] = {}  # what each cached layer ran with before
    try:
        for module in quantized_linears(model).values():
            device = module._parts_device()
            if device not in budgets:
                budgets[device] = available_memory(device) // 2 if max_bytes is None else max_bytes
            size = module.out_features * module.in_features * dtype.itemsize
            if size <= budgets[device]:
                budgets[device] -= size
                previous[module] = module._chosen_kernel
                module.use_kernel(DenseKernel(dtype))
        yield sum(m.out_features * m.in_features for m in previous) * dtype.itemsize
    finally:
        for module, kernel in previous.items():
            module.use_kernel(kernel)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2 style: the same map, weight stored transposed)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out_features, in_features)`` weight of a dense linear layer."""
    return module.weight.data if isinstance(module, nn.Linear) else module.weight.data.t()


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a linear layer, dense or quantized."""
    if isinstance(module, (nn.Linear, QuantLinear)):
        return (module.out_features, module.in_features)
    if is_linear(module):
        return (module.weight.shape[1], module.weight.shape[0])
    raise AttributeError(f"{type(module).__name__} is not a linear layer")


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every shared (tied) tensor kept once, under its first name:
    what a checkpoint stores and what the model's weights take."""
    seen: set[tuple] = set()
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_meta:  # not loaded yet (a lazy model): no storage to compare, the same object is tied
            key: tuple = ("meta", id(tensor))
        else:
            key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            state[name] = tensor.detach()
    return state


def quantized_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
