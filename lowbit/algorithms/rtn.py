"""RTN: round to nearest, with an optional clipping search.

Plain RTN quantizes each group over its full range. Outliers stretch that range and cost
every other weight of the group resolution; the clipping search shrinks each group's range
by a factor from a small grid (1.0 down to ``clip_min``) and keeps, per group, the factor
whose dequantized weights are closest to the originals. This is the same search AWQ applies
after scaling and llama.cpp's K-quants apply to their block scales.

The error is a squared error per weight. When calibration text was given, each input
column's error is weighted by the mean square of the activations that multiply it
(``input_mean_square``): a weight that meets large inputs matters more to the layer's output
``y = W x``. Without calibration every column counts the same.
"""

from __future__ import annotations

import torch

from lowbit.algorithms import Algorithm, register
from lowbit.formats import Format
from lowbit.qtensor import QTensor


def search_clip_ratio(
    weight: torch.Tensor,
    fmt: Format,
    importance: torch.Tensor | None = None,
    grid: int = 20,
    clip_min: float = 0.5,
) -> torch.Tensor:
    """Per-group clip ratio (shaped ``fmt.clip_shape``) that minimises the weighted error."""
    w = weight.float()
    shape = (w.shape[0], w.shape[1])
    fmt = fmt.search_format
    column_weight = None if importance is None else importance.float().to(w.device).reshape(1, -1)
    best_error = torch.full(fmt.clip_shape(shape), float("inf"), device=w.device)
    best_ratio = torch.ones_like(best_error)
    for ratio in torch.linspace(1.0, clip_min, grid).tolist():
        candidate = torch.full_like(best_ratio, ratio)
        error = (fmt.quantize(w, clip_ratio=candidate).dequantize() - w).square()
        if column_weight is not None:
            error = error * column_weight
        error = fmt.group_error(error)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better, candidate, best_ratio)
    return best_ratio


def quantize_rtn(
    weight: torch.Tensor,
    fmt: Format,
    statistics: dict,
    clip_search: bool = False,
    clip_grid: int = 20,
    clip_min: float = 0.5,
) -> QTensor:
    if not clip_search:
        return fmt.quantize(weight)
    if not fmt.supports_clip:
        raise ValueError(f"{fmt.name} has no clipping search (its scales are fixed by the format)")
    ratio = search_clip_ratio(weight, fmt, statistics.get("input_mean_square"), clip_grid, clip_min)
    return fmt.quantize(weight, clip_ratio=ratio)


def check_options(options: dict) -> str | None:
    if not isinstance(options["clip_search"], bool):
        return f"clip_search must be true or false, got {options['clip_search']!r}"
    grid = options["clip_grid"]
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        return f"clip_grid must be a whole number of at least 1, got {grid!r}"
    low = options["clip_min"]
    if isinstance(low, bool) or not isinstance(low, (int, float)) or not 0 < low <= 1:
        return f"clip_min must be a number in (0, 1], got {low!r}"
    return None


RTN = register(
    Algorithm(
        "rtn",
        quantize_rtn,
        options={"clip_search": False, "clip_grid": 20, "clip_min": 0.5},
        statistics=lambda options: ("input_mean_square",) if options["clip_search"] else (),
        validate=check_options,
    )
)
