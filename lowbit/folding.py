"""Fold a per-input-channel scale into a decoder layer, so the float layer computes the same function.

AWQ and SmoothQuant multiply the input columns of the linears that share an input (an input
group of the architecture table, ``lowbit.arch.InputGroup``) by a scale ``s``, which makes
those columns easier to quantize, and undo it where the input is produced: the module the
table names as the group's ``previous`` has its output channels divided by ``s``. Then
``(W · diag(s)) (x / s) = W x`` for every input, not only the calibration ones.

- a norm (RMSNorm or LayerNorm) multiplies by ``offset + weight`` (Gemma stores
  ``weight - 1``: offset 1); the new weight is ``(offset + weight) / s - offset``, a bias
  is divided by ``s``;
- a linear (``v_proj`` before ``o_proj``, ``up_proj`` before ``down_proj``) has its weight
  rows and bias divided by ``s``; only when its outputs are the group's inputs one to one
  (grouped-query attention gives ``v_proj`` fewer outputs than ``o_proj`` has inputs: no fold).

Every changed tensor is a *new* Parameter, never an in-place edit: ``lowbit.compare``
quantizes copies of a model that share the base model's tensors, and an in-place fold would
change the base model under them. The arithmetic is float32, cast back to each tensor's dtype.

This is layer 2 (it walks modules); the algorithms, which are tensor code, compute ``s`` and
ask for the fold through their block (``Block.fold``).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.arch import GENERIC, KNOWN_ARCHITECTURES, LINEAR, NORM, InputGroup

#: the smallest scale a fold accepts: a smaller one would blow the folded norm up past float16
MIN_SCALE = 1e-5


def norm_offset_of(model: nn.Module) -> float:
    """What the model's norms add to their stored weight (1 for Gemma, else 0)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return KNOWN_ARCHITECTURES.get(model_type, GENERIC).norm_offset


def foldable_families() -> list[str]:
    """The tested families whose table entry has at least one group with a fold."""
    return [
        name
        for name, architecture in KNOWN_ARCHITECTURES.items()
        if architecture.pipeline_tested and any(group.previous for group in architecture.input_groups)
    ]


def fold_problem(layer: nn.Module, group: InputGroup) -> str | None:
    """Why a scale cannot be folded into ``group``'s previous module in ``layer``; None when it can."""
    if group.previous is None:
        return f"no module before {', '.join(group.linears)} takes a scale exactly (lowbit's architecture table)"
    previous = layer.get_submodule(group.previous)
    width = _input_width(layer, group)
    if group.previous_kind == LINEAR:
        if not isinstance(previous, nn.Linear):
            return f"{group.previous} is already quantized"
        if previous.out_features != width:
            return (
                f"{group.previous} has {previous.out_features} outputs and {', '.join(group.linears)} "
                f"{width} inputs (grouped-query attention)"
            )
    elif getattr(previous, "weight", None) is None or previous.weight.shape != (width,):
        return f"{group.previous} has no per-channel weight of {width} values"
    for name in group.linears:
        if not isinstance(layer.get_submodule(name), nn.Linear):
            return f"{name} is already quantized"
    return None


def fold_input_scale(layer: nn.Module, group: InputGroup, scale: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Multiply the input columns of ``group``'s linears by ``scale`` and divide ``previous``'s
    outputs by it, in ``layer`` (new Parameters). ``ValueError`` when :func:`fold_problem`
    has a reason, or ``scale`` is not finite and at least ``MIN_SCALE``."""
    problem = fold_problem(layer, group)
    if problem is not None:
        raise ValueError(f"cannot fold a scale into {group.previous}: {problem}")
    s = scale.detach().float().reshape(-1)
    if s.numel() != _input_width(layer, group) or not torch.isfinite(s).all() or bool((s < MIN_SCALE).any()):
        raise ValueError(f"a fold needs {_input_width(layer, group)} finite scales of at least {MIN_SCALE}")
    for name in group.linears:
        linear = layer.get_submodule(name)
        _replace(linear, "weight", linear.weight.float() * s.to(linear.weight.device))
    previous = layer.get_submodule(group.previous)
    s = s.to(previous.weight.device)
    if group.previous_kind == NORM:
        _replace(previous, "weight", (previous.weight.float() + norm_offset) / s - norm_offset)
    else:
        _replace(previous, "weight", previous.weight.float() / s[:, None])
    if getattr(previous, "bias", None) is not None:
        _replace(previous, "bias", previous.bias.float() / s)


def _input_width(layer: nn.Module, group: InputGroup) -> int:
    return layer.get_submodule(group.linears[0]).in_features


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad))
