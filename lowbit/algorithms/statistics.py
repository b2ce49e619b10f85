"""Statistics of a linear layer's input, accumulated over calibration batches.

One :class:`InputStatistics` serves every linear that reads the same input (q, k and v read
the normalised hidden states; gate and up read the MLP's), so a Hessian is built once per
input rather than once per linear. Everything accumulates in float32 on the device the
inputs arrive on, whatever their dtype, so fp16 activations cannot overflow a sum.

Kinds (what an algorithm asks for, see ``AlgorithmConfig.statistics``):

- ``hessian``: ``H = XᵀX / n`` over the ``n`` input rows (GPTQ's proxy Hessian, up to its 2);
- ``input_mean_square``: ``mean(x²)`` per input channel (the diagonal of ``H``), which weights a
  clip search's error by how strongly each column is driven;
- ``input_absmax``: ``max|x|`` per input channel (SmoothQuant scales from it);
- ``input_absmean``: ``mean|x|`` per input channel (AWQ's activation magnitude).
"""

from __future__ import annotations

import torch

HESSIAN = "hessian"
INPUT_MEAN_SQUARE = "input_mean_square"
INPUT_ABSMAX = "input_absmax"
INPUT_ABSMEAN = "input_absmean"
KINDS = frozenset({HESSIAN, INPUT_MEAN_SQUARE, INPUT_ABSMAX, INPUT_ABSMEAN})


class InputStatistics:
    """Running statistics of one input of ``features`` channels."""

    def __init__(self, kinds: frozenset[str], features: int) -> None:
        unknown = set(kinds) - KINDS
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; known: {sorted(KINDS)}")
        self.kinds = frozenset(kinds)
        self.features = features
        self.rows = 0
        self._square_sum: torch.Tensor | None = None
        self._gram: torch.Tensor | None = None
        self._absmax: torch.Tensor | None = None
        self._abs_sum: torch.Tensor | None = None

    def add(self, inputs: torch.Tensor) -> None:
        """Accumulate a batch of inputs ``(..., features)``."""
        raw = inputs.detach().reshape(-1, inputs.shape[-1])
        x = raw.float()
        if x.shape[1] != self.features:
            raise ValueError(f"inputs have {x.shape[1]} channels, these statistics {self.features}")
        self.rows += x.shape[0]
        if INPUT_MEAN_SQUARE in self.kinds:
            square = x.square().sum(0)
            self._square_sum = square if self._square_sum is None else self._square_sum + square
        if HESSIAN in self.kinds:
            gram = _gram(raw, x)
            self._gram = gram if self._gram is None else self._gram + gram
        if INPUT_ABSMAX in self.kinds:
            absmax = x.abs().amax(0)
            self._absmax = absmax if self._absmax is None else torch.maximum(self._absmax, absmax)
        if INPUT_ABSMEAN in self.kinds:
            abs_sum = x.abs().sum(0)
            self._abs_sum = abs_sum if self._abs_sum is None else self._abs_sum + abs_sum

    def _need(self, kind: str, value: torch.Tensor | None) -> torch.Tensor:
        if kind not in self.kinds:
            raise KeyError(f"{kind} was not collected (collected: {sorted(self.kinds)})")
        if value is None:
            raise ValueError(f"no inputs were seen, so there is no {kind}")
        return value

    @property
    def mean_square(self) -> torch.Tensor:
        return self._need(INPUT_MEAN_SQUARE, self._square_sum) / self.rows

    @property
    def hessian(self) -> torch.Tensor:
        return self._need(HESSIAN, self._gram) / self.rows

    @property
    def absmax(self) -> torch.Tensor:
        return self._need(INPUT_ABSMAX, self._absmax)

    @property
    def absmean(self) -> torch.Tensor:
        return self._need(INPUT_ABSMEAN, self._abs_sum) / self.rows


def _gram(raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``XᵀX`` in float32. 16-bit inputs on a CUDA GPU multiply as they are, accumulating and
    returning float32 (the product of two 16-bit values is exact in float32, so nothing
    overflows): on an H100 a 16384 x 14336 Gram matrix takes 8.9 ms this way against 125 ms
    after an upcast, at a relative error of 4e-5 instead of 4e-6 against float64. Elsewhere
    (the CPU has no such kernel) the float32 copy ``x`` is multiplied."""
    if raw.is_cuda and raw.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(raw.T, raw, out_dtype=torch.float32)
    return x.T @ x
