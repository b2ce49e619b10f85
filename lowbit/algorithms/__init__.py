"""Algorithms: how to *choose* the quantized values of a weight for a given format.

An algorithm is a function ``(weight, format, statistics, **options) -> QTensor`` registered
under a short name, with the calibration statistics it can use. The pipeline collects those
statistics (with forward hooks, in float32) only when an algorithm in the plan asks for them
and calibration text was given. GPTQ, AWQ and SmoothQuant register here the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from lowbit.errors import LowbitError, UnknownNameError
from lowbit.formats import Format
from lowbit.qtensor import QTensor

#: Statistics the pipeline knows how to collect for a linear layer's input.
STATISTICS = ("input_mean_square",)


@dataclass(frozen=True)
class Algorithm:
    name: str
    run: Callable[..., QTensor]
    #: option name -> default; anything else given in a plan is refused
    options: dict = field(default_factory=dict)
    #: the statistics it uses with these options when calibration text is given; an
    #: algorithm that can run without them must (RTN does), one that cannot says so
    statistics: Callable[[dict], tuple[str, ...]] = lambda options: ()
    #: checks option values, returning a sentence about the first bad one (None when all are fine)
    validate: Callable[[dict], str | None] = lambda options: None

    def check_options(self, given: dict) -> dict:
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            raise LowbitError(
                f"algorithm {self.name!r} has no option {', '.join(map(repr, unknown))}; "
                f"its options are: {', '.join(self.options) or 'none'}"
            )
        options = {**self.options, **given}
        problem = self.validate(options)
        if problem:
            raise LowbitError(f"algorithm {self.name!r}: {problem}")
        return options

    def __call__(self, weight: torch.Tensor, fmt: Format, statistics: dict | None = None, **options) -> QTensor:
        return self.run(weight, fmt, statistics or {}, **self.check_options(options))


_REGISTRY: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    _REGISTRY[algorithm.name] = algorithm
    return algorithm


def get_algorithm(name: str) -> Algorithm:
    if name not in _REGISTRY:
        raise UnknownNameError(f"unknown algorithm {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def algorithm_names() -> list[str]:
    return sorted(_REGISTRY)


from lowbit.algorithms import rtn  # noqa: E402,F401  (registers itself)
