"""RTN: round to nearest, with an optional clipping search.

Plain RTN quantizes each group over its full range. Outliers stretch that range and cost
every other weight of the group resolution; the clipping search shrinks each group's range
by a factor from a small grid (1.0 down to ``clip_min``) and keeps, per group, the factor
whose dequantized weights are closest to the originals. This is the same search AWQ applies
after scaling and llama.cpp's K-quants apply to their block scales.

The search is all here; a format only offers the parts it is built from:
``choose_params(weight, clip=...)`` for a candidate range, ``fake_quantize`` to score it, and
``groups(shape)`` for which weights share a scale. A format whose scales are coupled across
groups (NF4's double quantization) is scored through its ``search_format`` (the same format
with independent scales), and the chosen factors are then applied to the real format.

The error is a squared error per weight. When calibration text was given, each input
column's error is weighted by the mean square of the activations that multiply it
(``input_mean_square``): a weight that meets large inputs matters more to the layer's output
``y = W x``. Without calibration every column counts the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.algorithms.base import AlgorithmConfig, Block, register
from lowbit.algorithms.statistics import INPUT_MEAN_SQUARE
from lowbit.formats import Format
from lowbit.qtensor import QTensor


@dataclass(frozen=True)
class RTNConfig(AlgorithmConfig):
    """Round to nearest; ``clip_search`` adds the per-group range search over ``clip_grid``
    factors from 1.0 down to ``clip_min``."""

    method = "rtn"
    clip_search: bool = False
    clip_grid: int = 20
    clip_min: float = 0.5

    def __post_init__(self) -> None:
        self.require_flag("clip_search")
        self.require_whole("clip_grid")
        self.require_fraction("clip_min")

    def statistics(self) -> frozenset[str]:
        return frozenset({INPUT_MEAN_SQUARE}) if self.clip_search else frozenset()


def search_clip_ratio(
    weight: torch.Tensor,
    fmt: Format,
    importance: torch.Tensor | None = None,
    grid: int = 20,
    clip_min: float = 0.5,
) -> torch.Tensor:
    """Per-group clip ratio (shaped ``fmt.groups(shape).shape``) that minimises the weighted error.

    ``importance`` weights each input column's squared error (``(in_features,)``).
    """
    w = weight.float()
    fmt = fmt.search_format
    groups = fmt.groups((w.shape[0], w.shape[1]))
    column_weight = None if importance is None else importance.float().to(w.device).reshape(1, -1)
    best_error = torch.full(groups.shape, float("inf"), device=w.device)
    best_ratio = torch.ones_like(best_error)
    for ratio in torch.linspace(1.0, clip_min, grid).tolist():
        candidate = torch.full_like(best_ratio, ratio)
        error = (fmt.fake_quantize(w, fmt.choose_params(w, clip=candidate)) - w).square()
        if column_weight is not None:
            error = error * column_weight
        error = groups.sum(error)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better, candidate, best_ratio)
    return best_ratio


def quantize_rtn(
    weight: torch.Tensor, fmt: Format, config: RTNConfig = RTNConfig(), importance: torch.Tensor | None = None
) -> QTensor:
    """One weight, rounded to nearest in ``fmt`` (with the clipping search if ``config`` says so)."""
    if not config.clip_search:
        return fmt.quantize(weight)
    if not fmt.supports_clip:
        raise ValueError(f"{fmt.name} has no clipping search (its scales are fixed by the format)")
    ratio = search_clip_ratio(weight, fmt, importance, config.clip_grid, config.clip_min)
    return fmt.quantize(weight, clip=ratio)


@register(RTNConfig)
def quantize_block(config: RTNConfig, block: Block, targets: dict[str, Format]) -> dict[str, QTensor]:
    """RTN on every target linear of a block; the clip search weights columns by the importance
    given with the model (an imatrix) where there is one, else by calibration statistics."""
    given_by = getattr(block, "importance", None)  # optional: a Block may offer none
    given = {name: given_by(name) for name in targets} if config.statistics() and given_by else {}
    wanted = [name for name in targets if given.get(name) is None]
    statistics = block.collect(config.statistics(), wanted) if config.statistics() and block.hidden and wanted else {}
    importance = {name: statistics[name].mean_square for name in statistics} | {n: v for n, v in given.items() if v is not None}
    return {name: quantize_rtn(block.weight(name), fmt, config, importance.get(name)) for name, fmt in targets.items()}
