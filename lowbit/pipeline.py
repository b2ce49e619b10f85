"""The pipeline: walk the decoder layers in order and quantize each layer's linears.

For each layer: move it to the work device; if an algorithm of the plan uses calibration
statistics and calibration tokens were given, run the layer's calibration inputs through it
while forward hooks on its linears collect those statistics (in float32); quantize the
linears; run the inputs again through the *quantized* layer to produce the next layer's
inputs, so each layer is calibrated on what it will really receive; move it back. Only one
layer and the calibration activations are on the device at a time.

Layer inputs are captured by running the model's base module once per batch with every
decoder layer replaced by a recorder that stores its arguments (hidden states, attention
mask, rotary embeddings …) and passes the hidden states through. Recording every layer, not
just the first, keeps per-layer arguments right for models that alternate attention kinds
(Gemma 2's sliding-window layers get their own mask). No fx tracing: the real modules run.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

import lowbit
from lowbit.algorithms import get_algorithm
from lowbit.arch import base_model, decoder_layers
from lowbit.errors import LowbitError
from lowbit.formats import get_format
from lowbit.nn import QuantLinear, dense_weight, is_linear, set_submodule
from lowbit.plan import Plan, Rule


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
    first_call = calls[0]

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
    assert len(hidden) == len(first_call)
    return Calibration(hidden, calls)


def _input_statistics(layer: nn.Module, names: dict[str, str], run) -> dict[str, dict[str, torch.Tensor]]:
    """Run ``run()`` with hooks that accumulate each named linear's input mean square."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def hook(full_name):
        def accumulate(_module, inputs, _output):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            sums[full_name] = sums.get(full_name, 0) + x.square().sum(0)
            counts[full_name] = counts.get(full_name, 0) + x.shape[0]

        return accumulate

    for local, full in names.items():
        handles.append(layer.get_submodule(local).register_forward_hook(hook(full)))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return {name: {"input_mean_square": sums[name] / counts[name]} for name in sums}


def _quantize_linear(model: nn.Module, name: str, rule: Rule, statistics: dict) -> dict:
    linear = model.get_submodule(name)
    fmt = get_format(rule.format)
    qtensor = get_algorithm(rule.algorithm)(dense_weight(linear), fmt, statistics, **rule.options)
    set_submodule(model, name, QuantLinear.from_qtensor(qtensor, linear.bias))
    return {"format": rule.format, "algorithm": rule.algorithm, **rule.options}


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


def _statistics_wanted(rules) -> set[str]:
    wanted: set[str] = set()
    for rule in rules:
        if rule.format is not None:
            algorithm = get_algorithm(rule.algorithm)
            wanted.update(algorithm.statistics(algorithm.check_options(rule.options)))
    return wanted


def plan_uses_statistics(plan: Plan) -> bool:
    """Whether any rule's algorithm would use calibration statistics."""
    return bool(_statistics_wanted(plan.rules))


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
) -> nn.Module:
    """Quantize ``model``'s linears in place, layer by layer, as ``plan`` says; return the model.

    ``calibration`` is a ``(samples, length)`` tensor of token ids, used only by algorithms
    that take statistics. ``device`` is where each layer is worked on (default: CUDA when
    available, else CPU); the model stays where it is.
    """
    start = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    layers_path, layers = decoder_layers(model)
    assigned = _assign(model, plan)
    calibrate = calibration is not None and bool(_statistics_wanted(assigned.values()))
    if calibration is not None and not calibrate:
        warnings.warn(f"plan {plan.name!r} uses no calibration statistics; the calibration text is ignored", stacklevel=2)
    state = capture_layer_inputs(model, layers_path, calibration, batch_size) if calibrate else None

    done: dict[str, dict] = {}
    for index, layer in enumerate(tqdm(layers, desc=f"quantizing ({plan.name})", unit="layer", disable=not progress)):
        prefix = f"{layers_path}.{index}."
        targets = {name: rule for name, rule in assigned.items() if name.startswith(prefix)}
        home = next(layer.parameters()).device
        layer.to(device)
        statistics: dict = {}
        if state is not None:
            calls = state.calls[index]

            def run_layer() -> list[torch.Tensor]:
                return [
                    _layer_output(layer(h.to(device), *_to(c.args, device), **_to(c.kwargs, device))).to(h.device)
                    for h, c in zip(state.hidden, calls)
                ]

            statistics = _input_statistics(layer, {n[len(prefix) :]: n for n in targets}, run_layer)
        for name, rule in targets.items():
            done[name] = _quantize_linear(model, name, rule, statistics.get(name, {}))
        if state is not None and index + 1 < len(layers):
            state.hidden = run_layer()
        layer.to(home)

    for name, rule in assigned.items():  # linears outside the decoder layers (lm_head …)
        if name not in done:
            if calibrate and _statistics_wanted([rule]):
                warnings.warn(f"{name} is outside the decoder layers: it is quantized without calibration statistics", stacklevel=2)
            done[name] = _quantize_linear(model, name, rule, {})
    if "lm_head" in done and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the embedding keeps its dense weight

    model.lowbit_manifest = {
        "quant_method": "lowbit",
        "lowbit_version": lowbit.__version__,
        "source": source,
        "plan": plan.to_dict(),
        "calibration": None if not calibrate else {"samples": int(calibration.shape[0]), "length": int(calibration.shape[1])},
        "modules": done,
        "quantization_seconds": round(time.perf_counter() - start, 3),
    }
    return model
