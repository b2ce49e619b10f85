"""SmoothQuant: move the activations' outliers into the weights, so both quantize to 8 bits.

Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models" (ICML 2023); written from the paper and read against
its reference code (``smoothquant/smooth.py``) and llm-compressor's ``SmoothQuantModifier``.

A few input channels of an LLM's linears carry activations tens of times larger than the
rest, and a per-token INT8 activation scale is set by them: the other channels of the token
lose their resolution. Dividing input channel ``j`` by

    s_j = max|x_j| ^ α / max|W_:,j| ^ (1 − α)

(``max|W_:,j|`` over every linear that reads the input) and multiplying the weights' column
``j`` by it balances the two ranges; ``α`` (default 0.5) says how much of the difficulty moves
to the weights. The division is folded into the norm before the group (``lowbit.folding``),
so the float model computes the same function. The paper (and llm-compressor's default
mappings) smooth the groups after a norm (q/k/v, gate/up); ``smooth_linears`` (default on)
also smooths the groups after a linear where the fold exists (``down_proj``'s input, the
product of gate and up, divided through ``up_proj``'s rows; ``o_proj``'s through ``v_proj``'s
without grouped-query attention): in Llama-style models that input carries the largest
outliers of all. On SmolLM2-135M (8 dev windows, 16 x 512 calibration) it takes W8A8's KL
from 0.0139 (norms only) to 0.0100, perplexity +1.6% -> +1.3% (plain W8A8: KL 0.028, +3.5%).

Then every weight is rounded to nearest in its format (INT8 per channel for ``w8a8``, FP8
E4M3 per channel for ``w8a8-fp8``), and the rule's activation quantizer (dynamic per token)
runs in front of each linear in evaluation too (``QuantLinear.input_quantizer``).

Numerics: a channel whose activations or weights are all zero keeps ``s = 1``; ``s`` is
clamped to at least ``1e-5``; statistics are float32, so float16 activations cannot overflow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.algorithms.base import AlgorithmConfig, Block, register
from lowbit.algorithms.statistics import INPUT_ABSMAX
from lowbit.errors import LowbitError
from lowbit.formats import Format
from lowbit.qtensor import QTensor

#: the smallest smoothing scale (a fold divides a norm by it)
MIN_SCALE = 1e-5


@dataclass(frozen=True)
class SmoothQuantConfig(AlgorithmConfig):
    """SmoothQuant's migration strength ``alpha`` in (0, 1]: the share of the activations'
    range moved into the weights; ``smooth_linears``: smooth the inputs that come from a linear too."""

    method = "smoothquant"
    folds_scales = True
    weight_only = False
    alpha: float = 0.5
    smooth_linears: bool = True

    def __post_init__(self) -> None:
        self.require_fraction("alpha", " (how much of the activations' range moves to the weights)")
        self.require_flag("smooth_linears")

    def statistics(self) -> frozenset[str]:
        return frozenset({INPUT_ABSMAX})


def smoothing_scale(activation_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``max|x| ^ alpha / max|W| ^ (1 - alpha)`` per input channel (``max|W|`` over ``weights``'
    rows); 1 where either is zero, at least ``MIN_SCALE``."""
    x = activation_absmax.float()
    w = torch.stack([weight.float().abs().amax(0) for weight in weights]).amax(0).to(x.device)
    live = (x > 0) & (w > 0)
    s = x.clamp(min=MIN_SCALE).pow(alpha) / w.clamp(min=MIN_SCALE).pow(1 - alpha)
    return torch.where(live, s, torch.ones_like(s)).clamp(min=MIN_SCALE)


@register(SmoothQuantConfig)
def quantize_block(config: SmoothQuantConfig, block: Block, targets: dict[str, Format]) -> dict[str, QTensor]:
    """Smooth every group of the block whose input comes from a norm (or from a linear, with
    ``smooth_linears``), from statistics of the float layer, then round every target."""
    if block.hidden is None and block.index >= 0:
        raise LowbitError("smoothquant needs calibration text: pass --calibration FILE")
    if block.hidden is not None:
        smoothed = [
            group
            for group in block.groups
            if (group.previous_kind == "norm" or config.smooth_linears)
            and any(n in targets for n in group.linears)
            and block.fold_problem(group) is None
        ]
        names = [name for group in smoothed for name in group.linears]
        statistics = block.collect(config.statistics(), names) if names else {}
        for group in smoothed:
            weights = [block.weight(name) for name in group.linears]
            block.fold(group, smoothing_scale(statistics[group.linears[0]].absmax, weights, config.alpha))
    return {name: fmt.quantize(block.weight(name).float()) for name, fmt in targets.items()}
