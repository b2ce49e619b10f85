"""lowbit inside transformers: ``import lowbit`` registers a quantization config and a quantizer.

    import lowbit, torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained("out/")             # a lowbit checkpoint
    model = AutoModelForCausalLM.from_pretrained(                    # quantized while it loads
        "path/to/hf-model", quantization_config=lowbit.LowbitConfig(scheme="nf4-dq", compute_dtype=torch.bfloat16))
    model.get_memory_footprint()                                     # the packed bytes
    model.save_pretrained("out2/")                                   # a lowbit checkpoint again

transformers (5.x) drives the load; lowbit supplies its ``HfQuantizer`` hooks:

- a **lowbit checkpoint** (``quant_method: "lowbit"`` in its config): before any weight is
  read, the files are checked against the model and the manifest exactly as ``lowbit.load``
  checks them (``export.native.check_checkpoint``: every part's shape and dtype from the
  file headers, the format stored beside the parts, nothing missing or extra), and every
  quantized linear becomes a :class:`~lowbit.nn.QuantLinear` whose parts are empty meta
  tensors of the stored shapes and dtypes. transformers then reads each stored tensor
  straight into its place (no dense copy of a quantized weight is ever made; parts keep
  their dtypes, kept tensors are upcast to the dtype the model computes in), and after the
  load every tensor is checked against the SHA-256 written with it. The native writer's
  guard against a plain transformers load (``transformers_weights``) is cleared here.
- an **unquantized model with** ``quantization_config=LowbitConfig(scheme=...)``: the linears
  the plan quantizes become QuantLinear skeletons holding a meta ``weight`` slot; transformers
  loads weights one tensor at a time (it loads sequentially when quantizing on the fly), and
  the quantize operation turns each dense weight, as soon as it is read, into the format's
  parts with the plan's (data-free) algorithm, then drops it: peak memory is the quantized
  model plus one dense weight (plus the pages of the memory-mapped source file the kernel
  keeps). Plans whose methods need calibration text (``+clip``, GPTQ) are refused: quantize
  those with ``lowbit.quantize``.

After either load the model carries ``lowbit_manifest`` like a model from ``lowbit.load`` or
``lowbit.quantize``; ``save_pretrained`` writes lowbit's native checkpoint (``lowbit.save``)
and ``is_loaded_in_4bit`` is set for models of at most 4 bits, which is what
``peft.prepare_model_for_kbit_training`` looks for (it then enables gradient checkpointing).

Registration is idempotent: importing this module twice registers once.
"""

from __future__ import annotations

import json
import time
import types
from pathlib import Path

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from lowbit.algorithms import handler_for
from lowbit.kernels.activation import activation_quantizer
from lowbit.api import kept_dtype
from lowbit.errors import LowbitError
from lowbit.export.native import TRANSFORMERS_GUARD, check_checkpoint, save_native, tensor_digest
from lowbit.lazy import StoredTensors
from lowbit.nn import PART_PREFIX, QuantLinear, is_linear, linear_shape, quantized_linears, set_submodule
from lowbit.pipeline import plan_uses_statistics, return_freed_memory, round_kept_tensors
from lowbit.plan import Plan, resolve_scheme
from lowbit.version import __version__

QUANT_METHOD = "lowbit"


class LowbitConfig(QuantizationConfigMixin):
    """What ``from_pretrained(..., quantization_config=LowbitConfig(...))`` quantizes to.

    ``scheme``: a preset, format name or plan file, as ``lowbit.quantize`` takes (default
    ``int4-g128``); ``method``: the algorithm for rules naming none (data-free ones only at
    load time); ``compute_dtype``: the dtype the model computes in (its kept tensors and
    activations; default: ``from_pretrained``'s ``dtype``); ``keep_dtype``: the dtype a saved
    checkpoint stores the kept tensors in (default: 16 bits, as ``lowbit.quantize``).

    Read from a lowbit checkpoint's config, it holds that checkpoint's manifest
    (``manifest``), which is also what it writes back (``to_dict``).
    """

    def __init__(
        self,
        scheme: str | Plan = "int4-g128",
        compute_dtype: torch.dtype | str | None = None,
        method: str | None = None,
        keep_dtype: str | None = None,
        manifest: dict | None = None,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.scheme = scheme
        self.compute_dtype = compute_dtype
        self.method = method
        self.keep_dtype = keep_dtype
        self.manifest = manifest

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        config = cls(manifest=dict(config_dict))
        return (config, kwargs) if return_unused_kwargs else config

    def to_dict(self) -> dict:
        if self.manifest is not None:
            return json.loads(json.dumps(self.manifest))
        dtype = self.compute_dtype
        return {
            "quant_method": QUANT_METHOD,
            "scheme": self.scheme if isinstance(self.scheme, str) else self.scheme.name,
            "method": self.method,
            "compute_dtype": None if dtype is None else str(dtype).removeprefix("torch."),
            "keep_dtype": self.keep_dtype,
        }

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    def plan(self) -> Plan:
        """The plan to quantize with at load time; refuses methods that need calibration."""
        plan = resolve_scheme(self.scheme, self.method)
        if plan_uses_statistics(plan):
            raise LowbitError(
                f"scheme {plan.name!r} uses calibration statistics, which a quantization at load time does not have; "
                "quantize with lowbit.quantize(model, scheme, calibration=...) and lowbit.save, then load the output"
            )
        return plan

    def dtype(self) -> torch.dtype | None:
        dtype = self.compute_dtype
        if isinstance(dtype, str):
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise LowbitError(f"compute_dtype must be a torch dtype such as torch.bfloat16, got {dtype!r}")
            dtype = getattr(torch, dtype)
        return dtype


class _OneWeight:
    """A block of one dense weight, as the algorithms see a block (no calibration inputs)."""

    hidden = None
    index = -1

    def __init__(self, name: str, weight: torch.Tensor) -> None:
        self.name, self._weight = name, weight
        self.device = weight.device

    def weight(self, name: str) -> torch.Tensor:
        return self._weight

    def run(self):
        raise LowbitError("quantizing at load time has no calibration inputs")

    collect = run


class LowbitQuantize(ConversionOps):
    """transformers' quantize operation: one dense weight, just read, to the parts of its format."""

    def __init__(self, quantizer: LowbitHfQuantizer) -> None:
        self.quantizer = quantizer

    def convert(self, input_dict: dict, full_layer_name: str | None = None, model=None, missing_keys=None, **kwargs) -> dict:
        return_freed_memory()  # the dense weight converted before this one: back to the OS, not glibc's heap
        (key, value), = input_dict.items()
        value = value[0] if isinstance(value, list) else value
        name = key.removesuffix(".weight")
        module = model.get_submodule(name)
        rule, transposed = self.quantizer.pending.pop(name)
        bad = int((~torch.isfinite(value)).sum()) if value.is_floating_point() else 0
        if bad:
            raise LowbitError(f"{key} holds {bad} NaN or infinite value(s); fix the source model")
        if transposed:  # transformers' Conv1D (GPT-2) stores the weight as (in, out)
            value = value.t()
        qtensor = handler_for(rule.config)(rule.config, _OneWeight(name, value), {name: rule.format})[name]
        del module.weight  # the dense slot: nothing of it stays
        if missing_keys is not None:
            missing_keys.discard(key)
        self.quantizer.done[name] = {"format": rule.format.name, "spec": rule.format.spec(), "algorithm": rule.algorithm, **rule.options}
        return {f"{name}.{PART_PREFIX}{part}": tensor for part, tensor in qtensor.parts.items()}


def _skeleton(linear: nn.Module, fmt) -> QuantLinear:
    """A QuantLinear for ``linear`` in ``fmt`` whose parts (and bias) are meta tensors of the stored layout."""
    out_features, in_features = linear_shape(linear)
    parts = {part: torch.empty(shape, dtype=dtype, device="meta") for part, (shape, dtype) in fmt.part_layout((out_features, in_features)).items()}
    bias = getattr(linear, "bias", None)
    module = QuantLinear(in_features, out_features, fmt, parts, None if bias is None else torch.empty_like(bias, device="meta"))
    return module


class LowbitHfQuantizer(HfQuantizer):
    """The ``HfQuantizer`` for ``quant_method: "lowbit"`` (see the module docstring)."""

    requires_calibration = False
    quantization_config: LowbitConfig

    def __init__(self, quantization_config: LowbitConfig, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        self.pending: dict = {}  # on the fly: module name -> plan rule, until its weight is read
        self.done: dict[str, dict] = {}
        self.digests: dict[str, str] = {}
        self.stored: StoredTensors | None = None
        self.started = time.perf_counter()

    def update_attn_implementation(self, config):
        # the first hook that sees the model's config before transformers looks for the weights
        if getattr(config, "transformers_weights", None) == TRANSFORMERS_GUARD:
            delattr(config, "transformers_weights")
        return config

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.quantization_config.dtype() or dtype

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return not self.pre_quantized and param_name.endswith(".weight") and param_name.removesuffix(".weight") in self.pending

    def get_quantize_ops(self) -> LowbitQuantize:
        return LowbitQuantize(self)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if self.pre_quantized:
            self._prepare_checkpoint(model, checkpoint_files)
        else:
            self._prepare_quantization(model)
        return model

    def _prepare_checkpoint(self, model, checkpoint_files) -> None:
        manifest = self.quantization_config.manifest or {}
        modules = manifest.get("modules")
        if not isinstance(modules, dict) or not modules:
            raise LowbitError("this lowbit checkpoint's manifest lists no quantized modules; the checkpoint is corrupt")
        if not checkpoint_files:
            raise LowbitError("transformers found no weights files for this lowbit checkpoint")
        path = Path(checkpoint_files[0]).parent
        self.stored = StoredTensors(path)
        model.tie_weights()
        planned, _, self.digests = check_checkpoint(path, model, modules, self.stored)
        for name, (fmt, _, _, _) in planned.items():
            skeleton = _skeleton(model.get_submodule(name), fmt)
            skeleton.input_quantizer = activation_quantizer(modules[name].get("activations"))  # W8A8: as quantized
            set_submodule(model, name, skeleton)

    def _prepare_quantization(self, model) -> None:
        self.plan = self.quantization_config.plan()
        for name, module in list(model.named_modules()):
            rule = self.plan.rule_for(name) if is_linear(module) else None
            if rule is None or rule.format is None:
                continue
            skeleton = _skeleton(module, rule.format)
            skeleton.weight = nn.Parameter(torch.empty_like(module.weight, device="meta"), requires_grad=False)
            set_submodule(model, name, skeleton)
            self.pending[name] = (rule, not isinstance(module, nn.Linear))
        if not self.pending:
            raise LowbitError(f"plan {self.plan.name!r} quantizes no layer of this model: every linear is kept")

    def _process_model_after_weight_loading(self, model, **kwargs):
        return_freed_memory()
        if self.pre_quantized:
            self._check_digests(model)
            manifest = self.quantization_config.manifest
        else:
            if self.pending:
                raise LowbitError(f"the checkpoint holds no weight for {sorted(self.pending)[:5]}; it is incomplete")
            manifest = {
                "quant_method": QUANT_METHOD,
                "lowbit_version": __version__,
                "source": str(getattr(model.config, "name_or_path", "") or "") or None,
                "plan": self.plan.to_dict(),
                "calibration": None,
                "modules": dict(self.done),
                "quantization_seconds": round(time.perf_counter() - self.started, 3),
            }
            keep = self.quantization_config.keep_dtype
            kept = round_kept_tensors(model, kept_dtype(model, None if keep is None else _dtype_named(keep)))
            manifest["kept_dtype"] = str(kept).removeprefix("torch.")
            self.quantization_config.manifest = manifest
        model.lowbit_manifest = manifest
        model.lowbit_source = str(getattr(model.config, "name_or_path", "") or "") or None
        if all(m.format.bits_per_weight((m.out_features, m.in_features)) < 5 for m in quantized_linears(model).values()):
            model.is_loaded_in_4bit = True
        model.save_pretrained = types.MethodType(save_pretrained, model)
        return model

    def _check_digests(self, model) -> None:
        state = model.state_dict()
        for key, digest in self.digests.items():
            stored_dtype, tensor = self.stored.entries[key].dtype, state[key]
            if tensor.dtype != stored_dtype and tensor.dtype.itemsize < 4:
                continue  # a kept tensor loaded in another 16-bit dtype (dtype=...): its bytes are not the stored ones
            if tensor_digest(tensor.to(stored_dtype)) != digest:
                raise LowbitError(f"tensor {key!r} does not match the checksum written with it; the checkpoint was edited or damaged")

    def _dequantize(self, model, dtype=None):
        for name, module in quantized_linears(model).items():
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            dense.weight = nn.Parameter(module.dequantize_weight(dtype or torch.float32), requires_grad=False)
            if module.bias is not None:
                dense.bias = module.bias
            set_submodule(model, name, dense)
        model.__dict__.pop("save_pretrained", None)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def _dtype_named(name: str | torch.dtype) -> torch.dtype:
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = names.get(name, getattr(torch, name, None) if isinstance(name, str) else name)
    if not isinstance(dtype, torch.dtype):
        raise LowbitError(f"keep_dtype must be one of fp32, bf16, fp16, got {name!r}")
    return dtype


def save_pretrained(model, save_directory, *, is_main_process: bool = True, state_dict=None, push_to_hub: bool = False, **kwargs) -> None:
    """``model.save_pretrained`` of a lowbit model: lowbit's native checkpoint (``lowbit.save``),
    which ``lowbit.load`` and ``from_pretrained`` (with lowbit imported) read. An existing
    lowbit checkpoint at ``save_directory`` is replaced; any other existing directory is refused.
    transformers' sharding and safetensors options do not apply; a state dict or a push to
    the Hub are refused rather than ignored."""
    if state_dict is not None or push_to_hub:
        raise LowbitError("save_pretrained of a lowbit model writes the model itself: no state_dict, no push_to_hub (push the directory)")
    if is_main_process:
        save_native(model, save_directory, getattr(model, "lowbit_tokenizer", None), overwrite=True)


def register() -> None:
    """Register ``quant_method: "lowbit"`` with transformers (once)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LowbitConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LowbitHfQuantizer)


register()
