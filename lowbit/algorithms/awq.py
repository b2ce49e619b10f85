"""AWQ: scale each input channel by its activation magnitude before rounding, and fold the
scale into the module before.

Lin, Tang, Tang, Yang, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration" (MLSys 2024); written from the paper and read against AutoAWQ
(``awq/quantize/quantizer.py``) and llm-compressor's ``AWQModifier``.

The few input channels that carry large activations matter most to a linear's output, and
plain rounding gives their weights the same relative error as every other weight of the
group. Multiplying input channel ``j`` of the weights by ``s_j > 1`` (and its input by
``1 / s_j``, which is folded into the module producing the input: a norm, or ``v_proj``
before ``o_proj``, ``up_proj`` before ``down_proj``; ``lowbit.folding``) rounds those weights
relatively finer, at the cost of the group's other channels. The float layer computes the
same function; only the rounding changes.

The scale is ``s = mean|x| ^ α``, normalised so that ``sqrt(max(s) · min(s)) = 1``, and
``α`` is chosen on a grid of ``alpha_grid`` points ``0, 1/n, …, (n-1)/n`` (``α = 0`` is plain
rounding, so the search never does worse than it on its own measure). Each candidate is
scored by the output error of every linear of the input group on the calibration inputs,
``Σ ‖(W − Q(W·s)/s) X‖²``, computed exactly from the shared Hessian ``H = XᵀX / n`` as
``Σ tr(ΔW H ΔWᵀ)`` (no activations are stored). AutoAWQ scores the output of the whole
attention or MLP module for q/k/v and gate/up; this measures the linears themselves (the
quantity GPTQ minimises), which needs no second run of the layer per candidate.

Then the clip search: RTN's per-group range search (``rtn.search_clip_ratio``) on the scaled
weights, its error weighted by the mean square of the scaled inputs, ``diag(H) / s²``.

Order within a block (``sequential``, the default): one input group at a time, in the order
the layer runs them; each group's statistics are collected after the groups before it were
quantized. A linear that is the fold target of a later group (``v_proj``, ``up_proj``) is
quantized only after that group's scale has been folded into its rows, so the later group
(``o_proj``, ``down_proj``) is calibrated on its float output. A group whose fold does not
exist (grouped-query attention's ``v_proj`` → ``o_proj``, Phi-3's fused projections, a
previous module already quantized by another rule) keeps ``s = 1`` and gets the clip search
alone.

Numerics: a channel that was zero on every calibration token gets ``s = 1`` before
normalisation (``0^α`` would divide its norm weight by zero); statistics are float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.algorithms.base import AlgorithmConfig, Block, register, sequential_stages
from lowbit.algorithms.rtn import search_clip_ratio
from lowbit.algorithms.statistics import HESSIAN, INPUT_ABSMEAN
from lowbit.errors import LowbitError
from lowbit.formats import Format
from lowbit.qtensor import QTensor


@dataclass(frozen=True)
class AWQConfig(AlgorithmConfig):
    """AWQ's options: ``alpha_grid`` exponents searched for the scale, then RTN's
    ``clip_search`` over ``clip_grid`` factors from 1.0 down to ``clip_min``; ``sequential``:
    each input group calibrated on the quantized groups before it."""

    method = "awq"
    folds_scales = True
    alpha_grid: int = 20
    clip_search: bool = True
    clip_grid: int = 20
    clip_min: float = 0.5
    sequential: bool = True

    def __post_init__(self) -> None:
        self.require_whole("alpha_grid")
        self.require_flag("clip_search", "sequential")
        self.require_whole("clip_grid")
        self.require_fraction("clip_min")

    def statistics(self) -> frozenset[str]:
        return frozenset({HESSIAN, INPUT_ABSMEAN})


def scale_from_magnitude(absmean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``mean|x| ^ alpha`` per channel, dead channels 1, normalised to ``sqrt(max · min) = 1``."""
    magnitude = absmean.float()
    s = torch.where(magnitude > 0, magnitude, torch.ones_like(magnitude)).pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``tr(ΔW H ΔWᵀ)``: the mean squared output error over the inputs whose ``XᵀX / n`` is ``H``."""
    delta = weight - quantized
    return ((delta @ hessian) * delta).sum()


def search_scale(
    weights: list[torch.Tensor], formats: list[Format], hessian: torch.Tensor, absmean: torch.Tensor, grid: int = 20
) -> tuple[torch.Tensor, float]:
    """The input-channel scale (and its exponent) that minimises the summed output error of
    ``weights`` (the linears reading one input, each rounded in its format) over the grid."""
    h = hessian.float()
    ws = [w.float() for w in weights]
    best, best_error, best_alpha = torch.ones_like(absmean, dtype=torch.float32), float("inf"), 0.0
    for step in range(grid):
        alpha = step / grid
        s = scale_from_magnitude(absmean, alpha)
        error = sum(float(output_error(w, fmt.fake_quantize(w * s, fmt.choose_params(w * s)) / s, h)) for w, fmt in zip(ws, formats))
        if error < best_error:
            best, best_error, best_alpha = s, error, alpha
    return best, best_alpha


def quantize_scaled(weight: torch.Tensor, fmt: Format, config: AWQConfig, importance: torch.Tensor) -> QTensor:
    """RTN of an already scaled weight, with the clip search weighted by ``importance`` when asked."""
    if not (config.clip_search and fmt.supports_clip):
        return fmt.quantize(weight)
    ratio = search_clip_ratio(weight, fmt, importance, config.clip_grid, config.clip_min)
    return fmt.quantize(weight, clip=ratio)


@register(AWQConfig)
def quantize_block(config: AWQConfig, block: Block, targets: dict[str, Format]) -> dict[str, QTensor]:
    """AWQ on every target linear of a block (see the module docstring for the order)."""
    if block.hidden is None:
        if block.index >= 0:
            raise LowbitError("awq needs calibration text: pass --calibration FILE")
        # linears outside the decoder layers (lm_head) have no inputs and nothing to fold into
        return {name: quantize_scaled(block.weight(name), fmt, config, None) for name, fmt in targets.items()}
    folds_into = {group.previous: group for group in block.groups if group.previous_kind == "linear"}
    out: dict[str, QTensor] = {}
    waiting: dict[str, tuple[Format, torch.Tensor]] = {}  # fold targets of a later group: name -> (format, importance)

    def finish(name: str, fmt: Format, importance: torch.Tensor) -> None:
        out[name] = quantize_scaled(block.weight(name).float(), fmt, config, importance)
        block.install(name, out[name])

    for stage in sequential_stages(block, targets, config.sequential):
        statistics = block.collect(config.statistics(), list(stage))
        for group in block.groups:
            members = [name for name in group.linears if name in stage]
            if not members:
                continue
            stats = statistics[members[0]]
            scale = torch.ones_like(stats.absmean)
            if block.fold_problem(group) is None:
                weights = [block.weight(name) for name in group.linears]
                formats = [targets.get(name) for name in group.linears]
                chosen = [(w, f) for w, f in zip(weights, formats) if f is not None]
                scale, _ = search_scale([w for w, _ in chosen], [f for _, f in chosen], stats.hessian, stats.absmean, config.alpha_grid)
                block.fold(group, scale)
            for previous, later in folds_into.items():
                if later is group and previous in waiting:
                    finish(previous, *waiting.pop(previous))
            importance = stats.hessian.diagonal() / scale.square()
            for name in members:
                later = folds_into.get(name)
                if later is not None and any(n in targets for n in later.linears) and block.fold_problem(later) is None:
                    waiting[name] = (targets[name], importance)
                else:
                    finish(name, targets[name], importance)
    for name, (fmt, importance) in waiting.items():  # a later group that was not in the targets
        finish(name, fmt, importance)
    return out
