"""QuantLinear: the module that replaces ``nn.Linear`` in a quantized model.

It is a plain ``nn.Module``, deliberately not an ``nn.Linear`` subclass: peft and other
tools treat ``nn.Linear`` as a dense weight they may merge into, and this module has none.
The packed parts of its QTensor are *buffers* named ``weight_<part>`` (``weight_packed``,
``weight_scale`` …), never Parameters, so ``get_memory_footprint()`` counts their real packed
size and ``prepare_model_for_kbit_training`` does not cast them to float32.

``forward`` dequantizes with the format's torch reference and multiplies. Faster kernels
(Triton on CUDA) plug in here per format and device; the reference stays their oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats import get_format
from lowbit.qtensor import QTensor

PART_PREFIX = "weight_"


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        format_name: str,
        parts: dict[str, torch.Tensor],
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.format_name = format_name
        self.part_names = tuple(parts)
        for name, tensor in parts.items():
            self.register_buffer(PART_PREFIX + name, tensor)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_qtensor(cls, qtensor: QTensor, bias: torch.Tensor | None = None) -> QuantLinear:
        out_features, in_features = qtensor.shape
        return cls(in_features, out_features, qtensor.format_name, qtensor.parts, bias)

    @property
    def qtensor(self) -> QTensor:
        parts = {name: getattr(self, PART_PREFIX + name) for name in self.part_names}
        return QTensor(self.format_name, (self.out_features, self.in_features), parts)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight, in ``dtype`` (the bias's by default)."""
        if dtype is None:
            dtype = self.bias.dtype if self.bias is not None else torch.float32
        return get_format(self.format_name).dequantize(self.qtensor, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        q = self.qtensor
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"format={self.format_name}, bits_per_weight={q.bits_per_weight:.3f}, bias={self.bias is not None}"
        )


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
    for name, tensor in model.state_dict().items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            state[name] = tensor
    return state


def quantized_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
