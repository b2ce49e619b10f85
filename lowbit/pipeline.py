"""The pipeline: walk the decoder layers in order and let the plan's algorithms quantize them.

For each layer: bring its weights in (from disk, when the model was loaded lazily) and move
it to the work device; hand it, as a :class:`LayerBlock`, to the handler of each algorithm
the plan assigns to its linears; put a :class:`~lowbit.nn.QuantLinear` in place of every
linear that got a QTensor (the dense weight goes with the module it belonged to); run the
calibration inputs through the *quantized* layer to produce the next layer's inputs, so
each layer is calibrated on what it will really receive; move it back. Only one layer's
float weights and the calibration activations are held at a time.

Layer inputs are captured by running the model's base module once per batch with every
decoder layer replaced by a recorder that stores its arguments (hidden states, attention
mask, rotary embeddings …) and passes the hidden states through. Recording every layer, not
just the first, keeps per-layer arguments right for models that alternate attention kinds
(Gemma 2's sliding-window layers get their own mask). No fx tracing: the real modules run.

Statistics an algorithm asks for are collected by forward hooks, one collector per input
that linears share (the architecture table's input groups), in float32 on the work device.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms import AlgorithmConfig, InputStatistics, handler_for
from lowbit.arch import base_model, decoder_layers, input_groups_of
from lowbit.device import resolve_device
from lowbit.errors import LowbitError
from lowbit.formats import Format
from lowbit.nn import QuantLinear, dense_weight, is_linear, set_submodule
from lowbit.plan import Plan, Rule
from lowbit.version import __version__


@dataclass
class LayerCall:
    """The arguments one decoder layer received for one calibration batch."""

    args: tuple
    kwargs: dict


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records its call and returns the hidden states unchanged."""

    def __init__(self, layer: nn.Module, calls: list[LayerCall]) -> None:
        super().__init__()
        self.layer = layer
        self.calls = calls

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # models may read attributes of their layers (attention type …)
            return getattr(self._modules["layer"], name)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.calls.append(LayerCall(args, kwargs))
        return hidden_states


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@dataclass
class Calibration:
    """Hidden states entering the current layer, per batch, and every layer's call arguments."""

    hidden: list[torch.Tensor]
    calls: list[list[LayerCall]]  # calls[layer][batch]


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers_path: str, tokens: torch.Tensor, batch_size: int) -> Calibration:
    """Run the base model with recorders in place of its layers; keep each layer's inputs."""
    layers = model.get_submodule(layers_path)
    originals = list(layers)
    calls: list[list[LayerCall]] = [[] for _ in originals]
    hidden: list[torch.Tensor] = []

    def keep_hidden(_module, args, kwargs):
        hidden.append(args[0] if args else kwargs["hidden_states"])

    try:
        for index, layer in enumerate(originals):
            layers[index] = _Recorder(layer, calls[index])
        handle = layers[0].register_forward_pre_hook(keep_hidden, with_kwargs=True)
        owner = base_model(model, layers_path)
        embed_device = model.get_input_embeddings().weight.device
        for start in range(0, tokens.shape[0], batch_size):
            owner(input_ids=tokens[start : start + batch_size].to(embed_device), use_cache=False)
        handle.remove()
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
    assert len(hidden) == len(calls[0])
    return Calibration(hidden, calls)


class LayerBlock:
    """One decoder layer on the work device, as the algorithms see it (``algorithms.Block``)."""

    def __init__(
        self, index: int, layer: nn.Module, device: torch.device, groups: list[tuple[str, ...]], state: Calibration | None
    ) -> None:
        self.index = index
        self.layer = layer
        self.device = device
        self.groups = groups
        self._state = state
        self.hidden = state.hidden if state is not None else None

    def weight(self, name: str) -> torch.Tensor:
        return dense_weight(self.layer.get_submodule(name))

    def run(self) -> list[torch.Tensor]:
        if self._state is None:
            raise LowbitError("this block has no calibration inputs to run")
        calls = self._state.calls[self.index]
        return [
            _layer_output(self.layer(h.to(self.device), *_to(c.args, self.device), **_to(c.kwargs, self.device))).to(h.device)
            for h, c in zip(self._state.hidden, calls)
        ]

    def collect(self, kinds: frozenset[str], names: list[str]) -> dict[str, InputStatistics]:
        """Run the layer with one hook per shared input of ``names``; every linear of a group
        gets the same :class:`InputStatistics`."""
        wanted = set(names)
        collectors: dict[str, InputStatistics] = {}
        handles = []
        for group in self.groups:
            members = [name for name in group if name in wanted]
            if not members:
                continue
            first = self.layer.get_submodule(group[0])
            statistics = InputStatistics(kinds, first.in_features if hasattr(first, "in_features") else dense_weight(first).shape[1])
            collectors.update(dict.fromkeys(members, statistics))
            handles.append(first.register_forward_hook(lambda _m, inputs, _o, s=statistics: s.add(inputs[0])))
        try:
            self.run()
        finally:
            for handle in handles:
                handle.remove()
        return collectors


class _OutsideBlock:
    """Linears outside the decoder layers (``lm_head`` …): their weights, no calibration inputs."""

    index = -1
    hidden = None

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device

    def weight(self, name: str) -> torch.Tensor:
        return dense_weight(self.model.get_submodule(name)).to(self.device)

    def run(self) -> list[torch.Tensor]:
        raise LowbitError("linears outside the decoder layers have no calibration inputs")

    def collect(self, kinds, names):
        raise LowbitError("linears outside the decoder layers have no calibration inputs")


def _assign(model: nn.Module, plan: Plan) -> dict[str, Rule]:
    if getattr(model, "lowbit_manifest", None) is not None:
        raise LowbitError("this model is already quantized by lowbit; start again from the unquantized model")
    linears = [name for name, module in model.named_modules() if is_linear(module)]
    if not linears:
        raise LowbitError("this model has no linear layers to quantize")
    for rule in plan.unused_rules(linears):
        warnings.warn(f"plan rule {rule.pattern!r} matches no linear layer of this model", stacklevel=3)
    assigned = {}
    for name in linears:
        rule = plan.rule_for(name)
        if rule is not None and rule.format is not None:
            assigned[name] = rule
    if not assigned:
        raise LowbitError(f"plan {plan.name!r} quantizes no layer of this model: every linear is kept")
    return assigned


def _check_finite(name: str, tensor: torch.Tensor, allow: bool) -> None:
    """NaN or inf in a source weight is an error naming it (one NaN would spoil its whole scale
    group, or the whole tensor); with ``allow`` they are replaced by zeros, with a warning."""
    if tensor.is_meta or not tensor.is_floating_point():
        return
    bad = ~torch.isfinite(tensor)
    count = int(bad.sum())
    if not count:
        return
    if not allow:
        raise LowbitError(
            f"{name} holds {count} NaN or infinite value(s) of {tensor.numel()}; fix the source model, or pass "
            "--allow-nonfinite (allow_nonfinite=True) to replace them with zeros"
        )
    tensor.masked_fill_(bad, 0)
    warnings.warn(f"{name}: replaced {count} NaN or infinite value(s) with zeros (--allow-nonfinite)", stacklevel=3)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl …): nothing to do
        return None


_MALLOC_TRIM = _malloc_trim()


def return_freed_memory() -> None:
    """Hand the memory of the float layer just released back to the operating system.

    Each weight read from disk is a large allocation freed once its layer is quantized;
    glibc raises its mmap threshold after the first such free and keeps later ones in its
    heap, so without this the process's resident memory would grow to the whole float model
    (measured: 2.9 GB peak for a 2.2 GB checkpoint, 1.5 GB with it)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def plan_uses_statistics(plan: Plan) -> bool:
    """Whether any rule's algorithm would use calibration statistics."""
    return any(rule.config.statistics() for rule in plan.rules if rule.format is not None)


def _quantize(model: nn.Module, block, prefix: str, targets: dict[str, Rule]) -> dict[str, dict]:
    """Run each algorithm's handler on its targets in ``block``, then install the QuantLinears."""
    by_config: dict[AlgorithmConfig, dict[str, Format]] = defaultdict(dict)
    for name, rule in targets.items():
        by_config[rule.config][name[len(prefix) :]] = rule.format
    qtensors = {}
    for config, formats in by_config.items():
        qtensors.update(handler_for(config)(config, block, formats))
    done = {}
    for local, qtensor in qtensors.items():
        name = prefix + local
        linear = model.get_submodule(name)
        set_submodule(model, name, QuantLinear.from_qtensor(qtensor, linear.bias))
        rule = targets[name]
        done[name] = {"format": rule.format.name, "spec": rule.format.spec(), "algorithm": rule.algorithm, **rule.options}
    return done


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    plan: Plan,
    *,
    calibration: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    progress: bool = True,
    source: str | None = None,
    allow_nonfinite: bool = False,
    keep_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Quantize ``model``'s linears in place, layer by layer, as ``plan`` says; return the model.

    ``calibration`` is a ``(samples, length)`` tensor of token ids, used only by algorithms
    that take statistics. ``device`` is where each layer is worked on (default: CUDA when
    available, else CPU); the model stays where it is. A model loaded lazily
    (``model.lowbit_weights``) has each layer's weights read from disk just before its turn.
    Every weight is checked before it is quantized: NaN or inf is an error naming the tensor,
    unless ``allow_nonfinite``, which replaces them with zeros (and warns).
    ``keep_dtype``: when given, the tensors that stay unquantized (embeddings, norms, kept
    linears, biases) are cast to it at the end (``cast_kept_tensors``); None leaves them as they are.
    """
    start = time.perf_counter()
    device = resolve_device(device)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise LowbitError(f"batch size must be a whole number of at least 1, got {batch_size!r}")
    layers_path, layers = decoder_layers(model)
    lazy = getattr(model, "lowbit_weights", None)
    if lazy is not None:
        lazy.materialize_outside(f"{layers_path}.")
    for name, tensor in model.named_parameters():
        if not name.startswith(f"{layers_path}."):
            _check_finite(name, tensor, allow_nonfinite)
    assigned = _assign(model, plan)
    calibrate = calibration is not None and any(rule.config.statistics() for rule in assigned.values())
    if calibration is not None and not calibrate:
        warnings.warn(f"plan {plan.name!r} uses no calibration statistics; the calibration text is ignored", stacklevel=2)
    state = capture_layer_inputs(model, layers_path, calibration, batch_size) if calibrate else None

    done: dict[str, dict] = {}
    for index, layer in enumerate(tqdm(layers, desc=f"quantizing ({plan.name})", unit="layer", disable=not progress)):
        prefix = f"{layers_path}.{index}."
        if lazy is not None:
            lazy.materialize(prefix)
        for name, tensor in layer.named_parameters(prefix=prefix.rstrip(".")):
            _check_finite(name, tensor, allow_nonfinite)
        targets = {name: rule for name, rule in assigned.items() if name.startswith(prefix)}
        home = next(layer.parameters()).device
        layer.to(device)
        groups = [group.linears for group in input_groups_of(model, layer)]
        block = LayerBlock(index, layer, device, groups, state)
        done.update(_quantize(model, block, prefix, targets))
        if state is not None and index + 1 < len(layers):
            state.hidden = block.run()
        layer.to(home)
        if lazy is not None:
            return_freed_memory()
    if lazy is not None:
        del model.lowbit_weights

    outside = {name: rule for name, rule in assigned.items() if name not in done}
    for name, rule in outside.items():  # linears outside the decoder layers (lm_head …)
        if calibrate and rule.config.statistics():
            warnings.warn(f"{name} is outside the decoder layers: it is quantized without calibration statistics", stacklevel=2)
    if outside:
        done.update(_quantize(model, _OutsideBlock(model, device), "", outside))
        home = model.get_input_embeddings().weight.device
        for name in outside:
            model.get_submodule(name).to(home)
    if "lm_head" in done and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the embedding keeps its dense weight
    if keep_dtype is not None:
        cast_kept_tensors(model, keep_dtype)

    model.lowbit_manifest = {
        "quant_method": "lowbit",
        "lowbit_version": __version__,
        "source": source,
        "plan": plan.to_dict(),
        "calibration": None if not calibrate else {"samples": int(calibration.shape[0]), "length": int(calibration.shape[1])},
        "modules": done,
        "quantization_seconds": round(time.perf_counter() - start, 3),
    }
    return model


def cast_kept_tensors(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating parameter and persistent buffer that is not a quantized part to
    ``dtype``, in place (ties kept: a shared Parameter is cast once), and record it as the
    config's dtype. Non-persistent buffers (rotary tables) keep theirs, as a fresh load makes them."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            tensors = [(module._parameters, "bias")] if module.bias is not None else []
        else:
            tensors = [(module._parameters, name) for name in module._parameters]
            tensors += [(module._buffers, name) for name in module._buffers if name not in module._non_persistent_buffers_set]
        for store, name in tensors:
            value = store[name]
            if value is None or not value.is_floating_point() or value.dtype == dtype:
                continue
            if isinstance(value, nn.Parameter):
                value.data = value.data.to(dtype)
            else:
                store[name] = value.to(dtype)
    model.config.dtype = dtype
