"""What every algorithm is: a typed config, and a handler that quantizes the linears of a block.

An algorithm (RTN today; GPTQ, AWQ and SmoothQuant plug in the same way) is

- one frozen config dataclass, subclass of :class:`AlgorithmConfig`, whose fields are its
  options with their defaults (``RTNConfig(clip_search=True)``). Plans and manifests name it
  by ``method`` and store the options that differ from the defaults;
- one handler, registered for that config type with :func:`register`, called once per
  decoder block with the block (:class:`Block`), the linears of the block it should quantize
  and their formats. It returns a QTensor per linear.

A handler works on tensors. It reaches the model only through the :class:`Block` the
pipeline hands it: the layer's linears and their dense weights, the hidden states and
arguments the layer received during calibration, the work device, the architecture's input
groups (which linears share an input, which norm or linear produces it), ``run()`` to run
the layer, and ``collect()`` for input statistics keyed by shared input (so q, k and v get one
Hessian). AWQ and SmoothQuant fold their scales into the module ``previous`` names
(``fold()``).

True sequential (``sequential_stages``): a handler may quantize a block one input group at a
time, in the order the layer runs them, and ``install()`` each group's QTensors before the
next group's statistics are collected, so ``o_proj`` is calibrated on the outputs of the
quantized q/k/v and ``down_proj`` on those of the quantized gate/up, as they will run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from lowbit.errors import LowbitError, UnknownNameError

if TYPE_CHECKING:
    from lowbit.algorithms.statistics import InputStatistics
    from lowbit.formats import Format
    from lowbit.qtensor import QTensor


class Block(Protocol):
    """One decoder layer as an algorithm sees it (the pipeline implements this)."""

    #: the decoder layer's index; -1 for linears outside the decoder layers (``lm_head`` …)
    index: int
    device: torch.device
    #: hidden states entering the layer for each calibration batch, or None without calibration
    hidden: list[torch.Tensor] | None
    #: the layer's input groups in the order it runs them (``lowbit.arch.InputGroup``: ``linears``,
    #: ``previous``, ``previous_kind``); every linear of the layer is in one
    groups: Sequence[Any]

    def weight(self, name: str) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight of linear ``name`` (local to the layer)."""

    def importance(self, name: str) -> torch.Tensor | None:
        """Per-input-column importance of linear ``name`` given with the model (an importance
        matrix file, ``lowbit imatrix``), or None. Optional: handlers ask with ``getattr``."""

    def run(self) -> list[torch.Tensor]:
        """Run the layer on every calibration batch; the hidden states it outputs."""

    def collect(self, kinds: frozenset[str], names: list[str]) -> dict[str, InputStatistics]:
        """Input statistics of ``kinds`` for the linears ``names``, one collector per shared input."""

    def install(self, name: str, qtensor: QTensor) -> None:
        """Put ``qtensor`` in place of linear ``name`` now: later runs and statistics see it quantized."""

    def fold_problem(self, group: Any) -> str | None:
        """Why a scale cannot be folded into ``group``'s previous module; None when it can."""

    def fold(self, group: Any, scale: torch.Tensor) -> None:
        """Multiply ``group``'s input columns by ``scale`` and divide its previous module's outputs by it."""


@dataclass(frozen=True)
class AlgorithmConfig:
    """Options of an algorithm; subclasses add fields with defaults and set ``method``."""

    method: ClassVar[str] = ""
    #: whether the algorithm folds scales into the modules before its linears (AWQ, SmoothQuant):
    #: the pipeline refuses it up front for a family whose table entry has no fold
    folds_scales: ClassVar[bool] = False
    #: whether the method serves weight-only schemes (False: SmoothQuant, which prepares linears
    #: for 8-bit activations; the recipe's 4-bit ladder leaves it out)
    weight_only: ClassVar[bool] = True

    def statistics(self) -> frozenset[str]:
        """The input statistics this configuration uses when calibration text is given."""
        return frozenset()

    def options(self) -> dict:
        """The options that differ from the defaults (what plans and manifests store)."""
        defaults = type(self)()
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(defaults, f.name)
        }

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def from_options(cls, options: dict) -> AlgorithmConfig:
        """The config for ``options`` (a plan entry's keys), with a clear error for an unknown one."""
        unknown = sorted(set(options) - set(cls.defaults()))
        if unknown:
            raise LowbitError(
                f"algorithm {cls.method!r} has no option {', '.join(map(repr, unknown))}; "
                f"its options are: {', '.join(cls.defaults()) or 'none'}"
            )
        return cls(**options)

    def fail(self, problem: str) -> None:
        raise LowbitError(f"algorithm {self.method!r}: {problem}")

    # checks for __post_init__, with the same wording for every algorithm
    def require_flag(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, bool):
                self.fail(f"{name} must be true or false, got {value!r}")

    def require_whole(self, name: str, minimum: int = 1) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(f"{name} must be a whole number of at least {minimum}, got {value!r}")

    def require_fraction(self, name: str, meaning: str = "") -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            self.fail(f"{name} must be a number in (0, 1]{meaning}, got {value!r}")


Handler = Callable[[AlgorithmConfig, Block, "dict[str, Format]"], "dict[str, QTensor]"]

_METHODS: dict[str, type[AlgorithmConfig]] = {}
_HANDLERS: dict[type[AlgorithmConfig], Handler] = {}


def register(config_type: type[AlgorithmConfig]) -> Callable[[Handler], Handler]:
    """Register the block handler of ``config_type`` (and its method name for plans)."""

    def decorate(handler: Handler) -> Handler:
        _METHODS[config_type.method] = config_type
        _HANDLERS[config_type] = handler
        return handler

    return decorate


def config_class(method: str) -> type[AlgorithmConfig]:
    """The config type of the algorithm called ``method``; a clear error listing them otherwise."""
    if method not in _METHODS:
        raise UnknownNameError(f"unknown algorithm {method!r}; available: {', '.join(method_names())}")
    return _METHODS[method]


def method_names(weight_only: bool = False) -> list[str]:
    """The registered methods (only those that serve weight-only schemes, with ``weight_only``)."""
    return sorted(name for name, config in _METHODS.items() if config.weight_only or not weight_only)


def handler_for(config: AlgorithmConfig) -> Handler:
    return _HANDLERS[type(config)]


def sequential_stages(block: Block, targets: dict[str, Format], sequential: bool = True) -> Iterator[dict[str, Format]]:
    """The targets of a block in the stages a handler quantizes them: with ``sequential``, one
    input group at a time in the order the layer runs them (targets no group names come
    last, together); otherwise all at once."""
    if not sequential:
        yield dict(targets)
        return
    left = dict(targets)
    for group in block.groups:
        stage = {name: left.pop(name) for name in group.linears if name in left}
        if stage:
            yield stage
    if left:
        yield left
