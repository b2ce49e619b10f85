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
A handler may install a group's quantized linears at once (``LayerBlock.install``), so the
statistics of the groups after it see them (true sequential within a block), and may fold a
per-channel scale into the module before a group (``LayerBlock.fold``, ``lowbit.folding``).
A rule's activation quantizer (``activations: int8-per-token``) is set on each QuantLinear
as it is installed and named in the manifest.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms import AlgorithmConfig, InputStatistics, handler_for
from lowbit.arch import KNOWN_ARCHITECTURES, InputGroup, base_model, decoder_layers, input_groups_of
from lowbit.device import resolve_device
from lowbit.errors import LowbitError
from lowbit.folding import fold_input_scale, fold_problem, foldable_families, norm_offset_of
from lowbit.formats import Format
from lowbit.kernels.activation import activation_quantizer
from lowbit.nn import QuantLinear, dense_cache, dense_weight, is_linear, set_submodule
from lowbit.plan import Plan, Rule
from lowbit.qtensor import QTensor
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


class _Collected(Exception):
    """Raised by the last statistics hook of a batch: the rest of the layer is not needed."""


def _install(owner: nn.Module, name: str, qtensor: QTensor, activations: str | None) -> None:
    """Put a QuantLinear of ``qtensor`` (with the linear's bias and ``activations``' quantizer) in
    place of linear ``name`` of ``owner``."""
    module = QuantLinear.from_qtensor(qtensor, owner.get_submodule(name).bias)
    module.input_quantizer = activation_quantizer(activations)
    set_submodule(owner, name, module)


class LayerBlock:
    """One decoder layer on the work device, as the algorithms see it (``algorithms.Block``).

    ``activations``: the activation quantizer name of each local linear that has one."""

    def __init__(
        self,
        index: int,
        layer: nn.Module,
        device: torch.device,
        groups: tuple[InputGroup, ...],
        state: Calibration | None,
        norm_offset: float = 0.0,
        activations: dict[str, str] | None = None,
        importance: Callable[[str], torch.Tensor | None] | None = None,
    ) -> None:
        self._importance = importance
        self.index = index
        self.layer = layer
        self.device = device
        self.groups = groups
        self.norm_offset = norm_offset
        self.activations = activations or {}
        self._state = state
        self.hidden = state.hidden if state is not None else None

    def weight(self, name: str) -> torch.Tensor:
        return dense_weight(self.layer.get_submodule(name))

    def _forward(self, stop: Callable[[], bool] | None = None) -> list[torch.Tensor | None]:
        """Run the layer on every calibration batch, the linears installed so far dequantized
        once for the whole run (``nn.dense_cache``), not once per batch. ``stop``: called at
        the start of each batch; a hook may then raise :class:`_Collected` to end the batch
        early (no output for it)."""
        if self._state is None:
            raise LowbitError("this block has no calibration inputs to run")
        calls = self._state.calls[self.index]
        outputs: list[torch.Tensor | None] = []
        with dense_cache(self.layer):
            for h, c in zip(self._state.hidden, calls):
                if stop is not None:
                    stop()
                try:
                    output = self.layer(h.to(self.device), *_to(c.args, self.device), **_to(c.kwargs, self.device))
                except _Collected:
                    outputs.append(None)
                    continue
                outputs.append(_layer_output(output).to(h.device))
        return outputs

    def importance(self, name: str) -> torch.Tensor | None:
        return None if self._importance is None else self._importance(name)

    def run(self) -> list[torch.Tensor]:
        return self._forward()

    def collect(self, kinds: frozenset[str], names: list[str]) -> dict[str, InputStatistics]:
        """Run the layer with one hook per shared input of ``names``; every linear of a group
        gets the same :class:`InputStatistics`. Each batch stops as soon as every hooked input
        has been seen: collecting o_proj's input runs the attention, not the MLP after it."""
        wanted = set(names)
        collectors: dict[str, InputStatistics] = {}
        handles = []
        waiting: set[int] = set()
        hooked: set[int] = set()

        def seen(module: nn.Module, inputs: tuple, statistics: InputStatistics) -> None:
            statistics.add(inputs[0])
            waiting.discard(id(module))
            if not waiting:
                raise _Collected

        for group in self.groups:
            members = [name for name in group.linears if name in wanted]
            if not members:
                continue
            first = self.layer.get_submodule(group.linears[0])
            statistics = InputStatistics(kinds, first.in_features if hasattr(first, "in_features") else dense_weight(first).shape[1])
            collectors.update(dict.fromkeys(members, statistics))
            hooked.add(id(first))
            handles.append(first.register_forward_pre_hook(lambda module, inputs, s=statistics: seen(module, inputs, s)))
        try:
            self._forward(stop=lambda: waiting.update(hooked))
        finally:
            for handle in handles:
                handle.remove()
        return collectors

    def install(self, name: str, qtensor: QTensor) -> None:
        _install(self.layer, name, qtensor, self.activations.get(name))

    def fold_problem(self, group: InputGroup) -> str | None:
        return fold_problem(self.layer, group)

    def fold(self, group: InputGroup, scale: torch.Tensor) -> None:
        fold_input_scale(self.layer, group, scale, self.norm_offset)


class _OutsideBlock:
    """Linears outside the decoder layers (``lm_head`` …): their weights, no calibration inputs."""

    index = -1
    hidden = None
    groups: tuple[InputGroup, ...] = ()

    def __init__(
        self, model: nn.Module, device: torch.device, activations: dict[str, str] | None = None,
        importance: Callable[[str], torch.Tensor | None] | None = None,
    ) -> None:  # fmt: skip
        self.model = model
        self.device = device
        self.activations = activations or {}
        self._importance = importance

    def importance(self, name: str) -> torch.Tensor | None:
        return None if self._importance is None else self._importance(name)

    def weight(self, name: str) -> torch.Tensor:
        return dense_weight(self.model.get_submodule(name)).to(self.device)

    def run(self) -> list[torch.Tensor]:
        raise LowbitError("linears outside the decoder layers have no calibration inputs")

    def collect(self, kinds, names):
        raise LowbitError("linears outside the decoder layers have no calibration inputs")

    def install(self, name: str, qtensor: QTensor) -> None:
        _install(self.model, name, qtensor, self.activations.get(name))

    def fold_problem(self, group: InputGroup) -> str | None:
        return "linears outside the decoder layers have no module before them to fold a scale into"

    def fold(self, group: InputGroup, scale: torch.Tensor) -> None:
        raise ValueError(self.fold_problem(group))


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


def activations_of(targets: dict[str, Rule], prefix: str) -> dict[str, str]:
    """Local name -> activation quantizer name, for the targets whose rule has one."""
    return {name[len(prefix) :]: rule.activations for name, rule in targets.items() if rule.activations}


def _check_folds(model: nn.Module, assigned: dict[str, Rule]) -> None:
    """Refuse, before any work, a method that folds scales on a family whose table entry has no fold."""
    methods = sorted({rule.algorithm for rule in assigned.values() if rule.config.folds_scales})
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    architecture = KNOWN_ARCHITECTURES.get(model_type)
    if methods and (architecture is None or not any(group.previous for group in architecture.input_groups)):
        raise LowbitError(
            f"{' and '.join(methods)}: its scales fold into the norm or linear before each group of linears, which "
            f"lowbit's architecture table gives for {', '.join(foldable_families())}; this {model_type} model has "
            "none: use --method gptq, or rtn with +clip"
        )


def _quantize(model: nn.Module, block, prefix: str, targets: dict[str, Rule]) -> dict[str, dict]:
    """Run each algorithm's handler on its targets in ``block``, then install the QuantLinears
    the handler has not installed itself."""
    by_config: dict[AlgorithmConfig, dict[str, Format]] = defaultdict(dict)
    for name, rule in targets.items():
        by_config[rule.config][name[len(prefix) :]] = rule.format
    qtensors = {}
    for config, formats in by_config.items():
        qtensors.update(handler_for(config)(config, block, formats))
    done = {}
    for local, qtensor in qtensors.items():
        name = prefix + local
        if not isinstance(model.get_submodule(name), QuantLinear):  # not installed by its handler
            block.install(local, qtensor)
        rule = targets[name]
        done[name] = {"format": rule.format.name, "spec": rule.format.spec(), "algorithm": rule.algorithm, **rule.options}
        if rule.activations:
            done[name]["activations"] = rule.activations
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
    round_kept: bool = True,
    importance: Callable[[str], torch.Tensor | None] | None = None,
) -> nn.Module:
    """Quantize ``model``'s linears in place, layer by layer, as ``plan`` says; return the model.

    ``calibration`` is a ``(samples, length)`` tensor of token ids, used only by algorithms
    that take statistics. ``device`` is where each layer is worked on (default: CUDA when
    available, else CPU); the model stays where it is. A model loaded lazily
    (``model.lowbit_weights``) has each layer's weights read from disk just before its turn.
    ``importance``: the per-input-column importance of a linear, by its full name (an
    importance matrix read from a file, ``lowbit imatrix``), or None; algorithms that weight
    columns (RTN's clip search) use it instead of collecting statistics.
    Every weight is checked before it is quantized: NaN or inf is an error naming the tensor,
    unless ``allow_nonfinite``, which replaces them with zeros (and warns).
    ``keep_dtype``: when given, the dtype the tensors that stay unquantized (embeddings, norms,
    kept linears, biases) are *stored* in: their values are rounded to it at the end
    (:func:`round_kept_tensors`) while they keep the dtype the model computes in, and the
    manifest records it (``kept_dtype``) for the writer and for sizes. None leaves them as they
    are. ``round_kept=False`` records ``keep_dtype`` without rounding (``compare`` measures the
    quantized linears against a reference whose kept tensors are the very same).
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
    _check_folds(model, assigned)
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
        groups = input_groups_of(model, layer)
        given = None if importance is None else (lambda local, prefix=prefix: importance(prefix + local))
        block = LayerBlock(index, layer, device, groups, state, norm_offset_of(model), activations_of(targets, prefix), given)
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
        done.update(_quantize(model, _OutsideBlock(model, device, activations_of(outside, ""), importance), "", outside))
        home = model.get_input_embeddings().weight.device
        for name in outside:
            model.get_submodule(name).to(home)
    if "lm_head" in done and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the embedding keeps its dense weight
    kept = keep_dtype if keep_dtype is None or not round_kept else round_kept_tensors(model, keep_dtype)

    model.lowbit_manifest = {
        "quant_method": "lowbit",
        "lowbit_version": __version__,
        "source": source,
        "plan": plan.to_dict(),
        "calibration": None if not calibrate else {"samples": int(calibration.shape[0]), "length": int(calibration.shape[1])},
        "modules": done,
        "quantization_seconds": round(time.perf_counter() - start, 3),
    }
    if kept is not None:
        model.lowbit_manifest["kept_dtype"] = str(kept).removeprefix("torch.")
    return model


def kept_tensors(model: nn.Module) -> list[tuple[dict, str]]:
    """``(store, name)`` of every floating parameter and persistent buffer that is not a
    quantized part (a QuantLinear's bias is kept), each shared (tied) Parameter once.
    Non-persistent buffers (rotary tables) are not weights and are left out."""
    found, seen = [], set()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            tensors = [(module._parameters, "bias")] if module.bias is not None else []
        else:
            tensors = [(module._parameters, name) for name in module._parameters]
            tensors += [(module._buffers, name) for name in module._buffers if name not in module._non_persistent_buffers_set]
        for store, name in tensors:
            value = store[name]
            if value is not None and value.is_floating_point() and id(value) not in seen:
                seen.add(id(value))
                found.append((store, name))
    return found


def round_kept_tensors(model: nn.Module, dtype: torch.dtype) -> torch.dtype:
    """Round every kept tensor (:func:`kept_tensors`) to the values ``dtype`` holds, keeping
    its own dtype: the model computes as before, and a checkpoint that stores these tensors in
    ``dtype`` loads back to exactly these values. Returns the dtype they can be stored in:
    ``dtype``, or bfloat16 when ``dtype`` is float16 and a value lies beyond its range (with a
    warning). Tensors are rounded in place (ties hold, no second copy stays): a model sharing
    its tensors with another (``compare``'s candidates) must not be rounded."""
    tensors = kept_tensors(model)
    if dtype == torch.float16:
        limit = torch.finfo(torch.float16).max
        too_large = [name for store, name in tensors if store[name].detach().abs().max() > limit]
        if too_large:
            warnings.warn(f"{too_large[0]} holds values beyond float16's range: kept tensors are stored in bfloat16", stacklevel=3)
            dtype = torch.bfloat16
    for store, name in tensors:
        value = store[name]
        if value.dtype == dtype or (dtype == torch.float32 and value.dtype.itemsize < 4):
            continue  # already exactly representable in dtype
        with torch.no_grad():
            value.copy_(value.to(dtype))
    return dtype
