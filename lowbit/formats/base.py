"""What every weight format provides, in parts, and the scale-group geometry they share.

A *format* is a pure description of how a float weight matrix becomes bytes and back. It
works in four steps, each usable on its own (RTN's clip search, GPTQ and QAT compose them
differently):

- ``choose_params(weight, clip=, importance=)``: the scales (and zero points) of the
  family's typed params, exactly as they will be stored;
- ``encode(weight, params, columns=)``: the codes of every weight under those params;
- ``decode(codes, params, columns=)``: the float weight the codes stand for;
- ``pack(codes, params)`` / ``unpack(parts, shape)``: between codes + params and the stored
  parts of a :class:`~lowbit.qtensor.QTensor` (the names, dtypes and layouts a checkpoint holds).

``quantize`` and ``dequantize`` are their composition, ``fake_quantize`` the round trip
without packing. ``storage_bytes`` says, from the shape alone, exactly how many bytes the
parts hold, and ``bits_per_weight`` is derived from that, so a size printed anywhere in
lowbit is the size of the bytes that are really stored.

Weights are 2-D: rows are output features, columns are input features, and groups of
columns share a scale (:class:`ScaleGroups`). When a row is not a multiple of the group
size, its last group is partial and has a scale of its own (as GPTQ does). ``encode`` and
``decode`` are elementwise once each column has its group's params, so a block of columns
(``columns=slice(a, b)``, the weight then being ``full[:, a:b]``) is rounded with the params
chosen for the whole matrix, as GPTQ needs.

A format is a frozen dataclass: it is its own typed spec (``spec()`` writes it as a dict,
``lowbit.formats.format_from_spec`` reads it back); ``name`` is for display and files.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lowbit.errors import LowbitError
from lowbit.qtensor import QTensor


@dataclass(frozen=True)
class ScaleGroups:
    """How a ``rows x columns`` weight is cut into groups that share a scale.

    ``group_size`` columns of a row form a group (the whole row for per-channel formats;
    the last group may be partial). ``per_tensor``: the whole matrix is one group.
    ``shape`` is the shape of one-value-per-group tensors (scales, clip factors):
    ``(rows, groups)``, ``(rows, 1)`` per channel, ``(1, 1)`` per tensor.
    """

    rows: int
    columns: int
    group_size: int
    per_tensor: bool = False

    @property
    def count(self) -> int:
        """Groups in a row (1 per tensor)."""
        return 1 if self.per_tensor else math.ceil(self.columns / self.group_size)

    @property
    def shape(self) -> tuple[int, int]:
        return (1, 1) if self.per_tensor else (self.rows, self.count)

    def split(self, matrix: torch.Tensor) -> torch.Tensor:
        """``(rows, columns)`` -> ``(shape[0], shape[1], members)``, a partial group padded with zeros.

        Zero padding never changes a group's scale: every format here keeps zero
        representable and takes its range from ``max(|w|)`` or ``[min(w, 0), max(w, 0)]``.
        """
        if self.per_tensor:
            return matrix.reshape(1, 1, -1)
        padding = self.count * self.group_size - matrix.shape[1]
        if padding:
            matrix = torch.nn.functional.pad(matrix, (0, padding))
        return matrix.reshape(matrix.shape[0], self.count, self.group_size)

    def sum(self, error: torch.Tensor) -> torch.Tensor:
        """Sum a ``(rows, columns)`` error over each group, shaped :attr:`shape` (what a clip search scores)."""
        if tuple(error.shape) != (self.rows, self.columns):
            raise ValueError(f"expected an error of shape {(self.rows, self.columns)}, got {tuple(error.shape)}")
        return self.split(error).sum(-1)

    def per_column(self, values: torch.Tensor, columns: range) -> torch.Tensor:
        """One-value-per-group ``values`` -> one per weight of ``columns``, broadcastable to
        ``(rows, len(columns))``: column ``c`` takes the value of group ``c // group_size``."""
        if values.shape[1] == 1:
            return values
        index = torch.arange(columns.start, columns.stop, device=values.device) // self.group_size
        return values.index_select(1, index)


def column_range(columns: slice | None, width: int) -> range:
    """The columns of the full matrix that a ``width``-column block passed with ``columns`` holds."""
    if columns is None:
        return range(width)
    start = 0 if columns.start is None else columns.start
    stop = start + width if columns.stop is None else columns.stop
    if columns.step not in (None, 1) or start < 0 or stop - start != width:
        raise ValueError(f"columns must be a step-1 slice of the {width} columns passed, got {columns}")
    return range(start, stop)


def check_matrix(weight: torch.Tensor, format_name: str) -> None:
    if weight.dim() != 2:
        raise ValueError(f"{format_name} quantizes 2-D weights, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"{format_name} quantizes float weights, got {weight.dtype}")


def check_finite(weight: torch.Tensor, format_name: str) -> None:
    """Refuse NaN and infinite weights: they would make their group's scale (or the whole
    tensor's) non-finite, and a non-finite scale is never stored."""
    if weight.is_meta:  # shapes only (part layouts, sizes): no values to check
        return
    bad = int((~torch.isfinite(weight)).sum())
    if bad:
        raise LowbitError(
            f"{format_name} cannot quantize a weight holding {bad} NaN or infinite value(s) of {weight.numel()}: "
            "a scale chosen from them would not be finite; fix the weights (or zero them first)"
        )


def refuse_importance(importance: torch.Tensor | None, format_name: str) -> None:
    """Formats that choose scales from the weight alone refuse per-column importance."""
    if importance is not None:
        raise ValueError(f"{format_name} chooses its scales from the weight alone; it does not take importance")


def check_choice(weight: torch.Tensor, format_name: str, importance: torch.Tensor | None) -> None:
    """What every ``choose_params`` checks first: a finite 2-D float weight, and no importance
    for a format that chooses its scales from the weight alone."""
    check_matrix(weight, format_name)
    check_finite(weight, format_name)
    refuse_importance(importance, format_name)


def clipped_absmax(weight: torch.Tensor, groups: ScaleGroups, clip: torch.Tensor | None) -> torch.Tensor:
    """``max|w|`` of each scale group (shaped ``groups.shape``), times its clip factor when given."""
    absmax = groups.split(weight.float()).abs().amax(-1)
    ratio = clip_factors(clip, groups, absmax.device)
    return absmax if ratio is None else absmax * ratio


def clip_factors(clip: torch.Tensor | None, groups: ScaleGroups, device: torch.device) -> torch.Tensor | None:
    """``clip`` as float32 on ``device``, after checking it has one factor per scale group."""
    if clip is None:
        return None
    if tuple(clip.shape) != groups.shape:
        raise ValueError(f"clip needs one factor per scale group, shape {groups.shape}; got {tuple(clip.shape)}")
    return clip.to(device).float()


def round_to_float16(values: torch.Tensor) -> torch.Tensor:
    """Round scales to what float16 storage keeps, saturating instead of overflowing."""
    finfo = torch.finfo(torch.float16)
    return values.clamp(-finfo.max, finfo.max).to(torch.float16).float()


def safe_divisor(scale: torch.Tensor) -> torch.Tensor:
    """A scale of zero only occurs for an all-zero group; dividing by one keeps its codes at zero."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


class Format(ABC):
    """A weight format, in parts: choose params, encode, decode, pack, unpack; exact sizes."""

    #: the family key of :meth:`spec` ("int", "nf4", "fp8", "mxfp4", "float")
    family: ClassVar[str]
    name: str
    #: formats whose range can be shrunk by a clipping search accept ``clip`` in ``choose_params``
    supports_clip: ClassVar[bool] = False

    @abstractmethod
    def groups(self, shape: tuple[int, int]) -> ScaleGroups:
        """The scale groups of a weight of ``shape``."""

    @abstractmethod
    def choose_params(
        self, weight: torch.Tensor, *, clip: torch.Tensor | None = None, importance: torch.Tensor | None = None
    ) -> Any:
        """The family's params for a ``(out_features, in_features)`` float weight, exactly as stored.

        ``clip``: per-group shrink factors in (0, 1], shaped ``groups(shape).shape``; formats
        whose scales the spec fixes raise ValueError. ``importance``: per-input-column
        weights ``(in_features,)`` for formats whose scale choice uses them; those that choose
        from the weight alone raise ValueError.
        """

    @abstractmethod
    def encode(self, weight: torch.Tensor, params: Any, columns: slice | None = None) -> torch.Tensor:
        """The codes of ``weight`` under ``params``; with ``columns``, ``weight`` is those
        columns of the matrix the params were chosen for."""

    @abstractmethod
    def decode(
        self, codes: torch.Tensor, params: Any, columns: slice | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The weight that ``codes`` (of ``columns``, if given) stand for under ``params``."""

    @abstractmethod
    def pack(self, codes: torch.Tensor, params: Any) -> dict[str, torch.Tensor]:
        """The stored parts for the codes of a whole matrix and its params."""

    @abstractmethod
    def unpack(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> tuple[torch.Tensor, Any]:
        """Inverse of :meth:`pack`: codes and params from the stored parts of a weight of ``shape``."""

    @abstractmethod
    def storage_bytes(self, shape: tuple[int, int]) -> int:
        """Exact bytes of every stored part (codes, scales, zeros) for a weight of ``shape``."""

    def fake_quantize(self, weight: torch.Tensor, params: Any, columns: slice | None = None) -> torch.Tensor:
        """``weight`` rounded to what the format stores under ``params``, in ``weight``'s dtype."""
        return self.decode(self.encode(weight, params, columns), params, columns, dtype=weight.dtype)

    def quantize(
        self, weight: torch.Tensor, *, clip: torch.Tensor | None = None, importance: torch.Tensor | None = None
    ) -> QTensor:
        """Quantize a ``(out_features, in_features)`` float weight: choose params, encode, pack."""
        params = self.choose_params(weight, clip=clip, importance=importance)
        shape = (weight.shape[0], weight.shape[1])
        return QTensor(self, shape, self.pack(self.encode(weight, params), params))

    def dequantize(self, qtensor: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight that ``qtensor`` stands for."""
        codes, params = self.unpack(qtensor.parts, qtensor.shape)
        return self.decode(codes, params, dtype=dtype)

    def part_layout(self, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every stored part, found by quantizing on the meta device."""
        parts = self.quantize(torch.zeros(shape, device="meta")).parts
        return {name: (tuple(t.shape), t.dtype) for name, t in parts.items()}

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        return 8 * self.storage_bytes(shape) / (shape[0] * shape[1])

    def spec(self) -> dict[str, Any]:
        """The format as a JSON-able dict: ``family``, ``name`` and every field (read back by
        ``lowbit.formats.format_from_spec``)."""
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {"family": self.family, "name": self.name, **fields}

    @property
    def search_format(self) -> Format:
        """The format a clipping search scores candidates with: itself, unless its scales are
        coupled across groups (NF4's double quantization), where groups could not be chosen
        one by one."""
        return self

    def __repr__(self) -> str:
        return f"<format {self.name}>"
