"""LoRA on lowbit's QuantLinear with peft: QLoRA on every lowbit format.

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from lowbit.integrations.peft import register

    model = prepare_model_for_kbit_training(model)            # a lowbit model (from_pretrained or lowbit.load)
    model = get_peft_model(model, register(LoraConfig(r=8, target_modules=["q_proj", "v_proj"])))

peft picks a LoRA layer for each target module through its dispatchers, which know
``nn.Linear`` and the quantized linears of the libraries peft ships support for. QuantLinear is
deliberately not an ``nn.Linear`` (it has no dense weight to merge into), so it takes peft's
own door for other layer types, ``LoraConfig._register_custom_module`` (peft's documented,
still experimental API for custom layers): :func:`register` maps QuantLinear to
:class:`LoraQuantLinear` on the config given, and nothing of peft is changed. A config read
back from an adapter directory needs the same call (``PeftModel.from_pretrained(model, path,
config=register(LoraConfig.from_pretrained(path)))``).

The base stays quantized and frozen: its forward runs through QuantLinear's kernel, and under
autograd through QuantLinear's autograd function, which saves no dense weight (backward
dequantizes again), so a training step keeps no float copy of the base. Merging an adapter
into the quantized base is refused (it would need re-quantizing); keep the adapter separate,
or merge into an unquantized copy of the model.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import LoraConfig, LoraLayer
from torch import nn

from lowbit.errors import LowbitError
from lowbit.nn import PART_PREFIX, QuantLinear

_DEVICE_ANCHOR = "qweight"


class LoraQuantLinear(nn.Module, LoraLayer):
    """``y = base(x) + lora_B(lora_A(dropout(x))) * scaling`` over a frozen :class:`QuantLinear`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha: int = 1, **kwargs) -> None:
        if config.lora_bias:
            raise LowbitError("LoRA on a lowbit QuantLinear does not support lora_bias; set it to False")
        if config.use_dora:
            raise LowbitError("LoRA on a lowbit QuantLinear does not support DoRA (it needs the dense weight's norms); set use_dora=False")
        super().__init__()
        # peft then reads the wrapped layer's device from its `qweight` (GPTQ's name for the packed
        # weight) or its first parameter, and QuantLinear holds only buffers: lend it the first part
        # until this module first moves or runs (a reference kept longer would pin the old copy)
        base_layer.__dict__.setdefault(_DEVICE_ANCHOR, getattr(base_layer, PART_PREFIX + base_layer.part_names[0]))
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs) -> None:
        return None

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise LowbitError(
            "a LoRA adapter cannot be merged into a lowbit-quantized base (it would have to be quantized again); "
            "save the adapter, or merge it into the unquantized model and quantize that"
        )

    def unmerge(self) -> None:
        raise LowbitError("nothing is merged into a lowbit-quantized base")

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def _drop_device_anchor(self) -> None:
        self.get_base_layer().__dict__.pop(_DEVICE_ANCHOR, None)

    def _apply(self, fn, recurse: bool = True):
        self._drop_device_anchor()
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._drop_device_anchor()
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:
            raise LowbitError("LoRA on a lowbit QuantLinear does not mix adapters in one batch (adapter_names)")
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        expected = result.dtype
        for active in self.active_adapters:
            if active not in self.lora_A.keys():
                continue
            lora_A, lora_B = self.lora_A[active], self.lora_B[active]
            inputs = self._cast_input_dtype(x, lora_A.weight.dtype) if not torch.is_autocast_enabled() else x
            result = result + (lora_B(lora_A(self.lora_dropout[active](inputs))) * self.scaling[active]).to(expected)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register(config: LoraConfig) -> LoraConfig:
    """``config`` with lowbit's QuantLinear mapped to :class:`LoraQuantLinear`; returns it."""
    config._register_custom_module({QuantLinear: LoraQuantLinear})
    return config
