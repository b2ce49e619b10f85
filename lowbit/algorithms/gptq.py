"""GPTQ: round a weight one input column at a time, and let the columns not yet rounded
absorb each rounding error, weighted by the inverse Hessian of the layer's inputs.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (ICLR 2023); written from the paper and read against
its reference implementation (IST-DASLab/gptq, ``gptq.py``).

For a linear layer ``y = W x`` and calibration inputs ``X``, the output error of a rounded
weight ``Q`` is ``‖(W − Q) X‖²``; each row of ``W`` sees the same Hessian ``H = 2 XᵀX`` (the
``hessian`` statistic is ``XᵀX / n``: a constant factor changes no choice). When column ``j``
is rounded with error ``e = w_j − q_j``, the columns after it move by
``−e / [H⁻¹]_jj · [H⁻¹]_{j, >j}`` (Optimal Brain Surgeon), where ``H⁻¹`` is the inverse of
the Hessian of the columns not yet rounded. Those inverses, for every step of a fixed order,
are the rows of the upper Cholesky factor ``U`` of ``H⁻¹`` (scaled by ``U_jj``), so one
factorisation serves the whole weight. Lazy batches: within a block of ``block_size``
columns the updates are applied column by column; the block's errors reach the columns
after it once, as one matrix product.

Numerics, as the reference does them:

- a dead input channel (``H_jj = 0``: it was zero on every calibration token) gets
  ``H_jj = 1`` and its weights set to zero; they only ever multiply zero;
- ``damp · mean(diag H)`` is added to the diagonal (relative damping); if the Cholesky
  factorisation still fails, the damping is raised tenfold at a time (with a warning), so the
  result is never NaN; a Hessian that no damping repairs is refused.

Scale groups. Formats with groups along a row (``int4-g128``, ``nf4``, ``mxfp4``) need each
group's params before its first column is rounded:

- dynamic groups (the default, as in the paper): group ``g``'s params are chosen, with the
  format's own ``choose_params``, when the loop reaches its first column, from the weights as
  the earlier columns' errors have *updated* them. Lazy blocks never let a group start in
  the middle of pending updates (see :func:`column_blocks`), so those weights are exact;
- static groups (``static_groups``, always with ``act_order``): every group's params chosen up
  front from the original weights. So are the params of per-channel and per-tensor formats,
  and those of formats whose scales are coupled across groups (NF4's double quantization,
  where no group's stored scale is known before all of them are);
- ``clip_search``: RTN's per-group clipping search (``rtn.search_clip_ratio``), its error
  weighted by ``diag(H)``, picks each group's range just before the params are chosen.

Every column is rounded by the format's ``encode`` / ``decode`` with those fixed params, on
whatever grid the format has (uniform integers, NF4's code book, FP8, E2M1): GPTQ on a
non-uniform grid is the same loop. The QTensor is ``pack(codes, params)`` of exactly the
codes and params the loop used, so it dequantizes bit for bit to the weight GPTQ chose.

act_order: columns are rounded in order of decreasing ``diag(H)`` (the most strongly driven
inputs first, while the most columns are left to absorb their errors), then put back. Groups
are then static, so the stored layout stays canonical: contiguous groups, no ``g_idx``.

Speed: the Hessian of an input is prepared (dead channels, order, factor) once for every
weight that reads it, and weights sharing an input and a format (q/k/v, gate/up) go through
one column loop as one matrix of stacked rows (:func:`gptq_quantize_stacked`): every row is
rounded on its own, so each weight comes out exactly as alone, with about two thirds as many Python
steps per layer. On a GPU, integer grids run each lazy block's column steps as
one Triton kernel (:mod:`lowbit.algorithms.gptq_cuda`; the torch loop's codes bit for bit).
On an H100 (2026-11-25, ``bench/gptq_gpu.py``, Llama-3-8B-shaped, 128x2048 tokens, int4-g128)
the column loops of a block take 0.27 s (8.2 s with the torch loop), a whole block 4.3 s, of
which 2.9 s collect the Hessians (float32 ``XᵀX``).

True sequential (``sequential``, the default, as llm-compressor and GPTQModel do): within a
block, the Hessian of each input group is collected after the groups before it were
quantized, so ``o_proj`` sees the outputs of the quantized q/k/v and ``down_proj`` those of
the quantized gate/up (the layer runs once per group). ``sequential=False`` collects every
Hessian once from the float layer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from lowbit.algorithms.base import AlgorithmConfig, Block, register, sequential_stages
from lowbit.algorithms.rtn import RTNConfig, quantize_rtn, search_clip_ratio
from lowbit.algorithms.statistics import HESSIAN
from lowbit.errors import LowbitError
from lowbit.formats import FloatFormat, Format
from lowbit.formats.integer import IntegerFormat
from lowbit.qtensor import QTensor

#: damping is raised tenfold at a time up to this multiple of mean(diag H)
MAX_DAMP = 1e4


@dataclass(frozen=True)
class GPTQConfig(AlgorithmConfig):
    """GPTQ's options: relative ``damp``ing of the Hessian, the lazy-batch ``block_size``,
    ``act_order`` (round columns by decreasing activation energy; implies static groups),
    ``static_groups`` (choose every group's params up front from the original weights), and
    RTN's ``clip_search`` over ``clip_grid`` factors from 1.0 down to ``clip_min``, per group;
    ``sequential``: each input group's Hessian collected after the groups before it were quantized.

    Defaults: act-order with static groups (llm-compressor's default too) and the clip search
    wherever the format has one (``clip_search=None``; True requires it, False turns it off).
    On SmolLM2 int4-g64 (dev protocol, ``bench/results/gptq-settings-cuda-h100-2026-11-25.json``)
    dynamic groups gave KL 0.193, act-order 0.115 (llm-compressor's GPTQ: 0.115), act-order with
    the clip search 0.084; the clip search costs about 1.4x the time."""

    method = "gptq"
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = False
    clip_search: bool | None = None
    clip_grid: int = 20
    clip_min: float = 0.5
    sequential: bool = True

    def __post_init__(self) -> None:
        self.require_fraction("damp", " (a fraction of the mean Hessian diagonal)")
        self.require_whole("block_size")
        self.require_flag("act_order", "static_groups", "sequential")
        if self.clip_search is not None:
            self.require_flag("clip_search")
        self.require_whole("clip_grid")
        self.require_fraction("clip_min")

    def searches_clip(self, fmt: Format) -> bool:
        """Whether the clip search runs for ``fmt``: as asked, else wherever the format has one."""
        return fmt.supports_clip if self.clip_search is None else self.clip_search

    @property
    def fixed_groups(self) -> bool:
        """Whether group params are chosen up front (``static_groups``, forced on by ``act_order``)."""
        return self.static_groups or self.act_order

    def statistics(self) -> frozenset[str]:
        return frozenset({HESSIAN})


def column_blocks(columns: int, block_size: int, group_size: int | None = None) -> list[tuple[int, int]]:
    """The ``(start, stop)`` lazy-batch blocks of ``columns`` columns.

    With ``group_size`` (dynamic groups), no group starts while updates to its columns are
    pending: blocks hold whole groups (``block_size`` rounded down to a multiple of the
    group, at least one group), or, for groups wider than a block, every group starts a block.
    """
    span = columns
    if group_size is not None:
        span = max(block_size // group_size, 1) * group_size
    blocks = []
    for outer in range(0, columns, span):
        end = min(outer + span, columns)
        blocks += [(start, min(start + block_size, end)) for start in range(outer, end, block_size)]
    return blocks


def inverse_hessian_factor(hessian: torch.Tensor, damp: float, name: str = "weight") -> torch.Tensor:
    """The upper Cholesky factor of ``(H + λ I)⁻¹``, ``λ = damp · mean(diag H)``.

    The inverse is ``L⁻ᵀ L⁻¹`` from the Cholesky factor ``L``: one triangular solve and one
    matrix product, two to three times faster on a CPU than LAPACK's ``potri``
    (``torch.cholesky_inverse``), which ran at a fraction of the matrix product's speed.
    When a factorisation fails (``H`` not positive definite, or too ill-conditioned for
    float32), the relative damping is raised tenfold, up to ``MAX_DAMP``, with a warning.
    """
    diagonal = hessian.diagonal()
    if not torch.isfinite(hessian).all() or (diagonal < 0).any():
        raise LowbitError(
            f"the input statistics of {name} are not a Hessian (non-finite values or a negative "
            "diagonal); the calibration activations overflowed or are corrupt"
        )
    scale = diagonal.mean()
    relative = damp
    identity = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    while True:
        damped = hessian.clone()
        damped.diagonal().add_(relative * scale)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            lower_inverse = torch.linalg.solve_triangular(lower, identity, upper=False)
            upper, info = torch.linalg.cholesky_ex(lower_inverse.T @ lower_inverse, upper=True)
            if info == 0 and torch.isfinite(upper).all():
                if relative != damp:
                    warnings.warn(
                        f"gptq: the Hessian of {name} is not positive definite with damping {damp:g}; "
                        f"damping raised to {relative:g}",
                        stacklevel=3,
                    )
                return upper
        if relative >= MAX_DAMP:
            raise LowbitError(
                f"the Hessian of {name} is not positive definite even with damping {relative:g}; "
                "its calibration statistics are corrupt"
            )
        relative *= 10


@dataclass
class PreparedHessian:
    """What every weight reading one input needs from its Hessian, computed once per input (q, k
    and v share it): the dead channels, ``diag(H)`` (act-order's key and the clip search's
    weights), the column order, and the upper Cholesky factor of the damped inverse in that order."""

    dead: torch.Tensor
    importance: torch.Tensor
    perm: torch.Tensor | None
    upper: torch.Tensor


def prepare_hessian(hessian: torch.Tensor, config: GPTQConfig = GPTQConfig(), name: str = "weight", device=None) -> PreparedHessian:
    """Dead channels get ``H_jj = 1``; columns ordered by decreasing ``diag(H)`` with ``act_order``;
    then the factor of :func:`inverse_hessian_factor`. Float32, on ``device`` (default: the Hessian's)."""
    h = hessian.detach().to(device or hessian.device, torch.float32, copy=True)
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1
    importance = h.diagonal().clone()
    perm = None
    if config.act_order:
        perm = torch.argsort(importance, descending=True, stable=True)
        h = h[perm][:, perm]
    return PreparedHessian(dead, importance, perm, inverse_hessian_factor(h, config.damp, name))


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    fmt: Format,
    config: GPTQConfig = GPTQConfig(),
    name: str = "weight",
    prepared: PreparedHessian | None = None,
) -> tuple[QTensor, torch.Tensor]:
    """GPTQ on one ``(out_features, in_features)`` weight with its input Hessian ``(in, in)``
    (or the Hessian ``prepared`` once for every weight that shares it, :func:`prepare_hessian`).

    Returns the QTensor and the float32 weight the loop rounded to (what its error feedback
    assumed; the QTensor dequantizes to exactly this). ``name`` appears in warnings and errors.
    Works on the weight's device, in float32.
    """
    if prepared is None and not isinstance(fmt, FloatFormat):
        columns = weight.shape[1]
        if tuple(hessian.shape) != (columns, columns):
            raise ValueError(f"{name}: a weight with {columns} input columns needs a {columns}x{columns} Hessian, got {tuple(hessian.shape)}")
        prepared = prepare_hessian(hessian, config, name, weight.device)
    return gptq_quantize_stacked([weight], prepared, fmt, config, name)[0]


def stackable(fmt: Format) -> bool:
    """Whether weights sharing an input can go through one GPTQ pass as one matrix of stacked
    rows: the format chooses each row's params from that row alone (not per tensor, no scales
    coupled across rows like NF4's double quantization), and encodes each row on its own."""
    return not isinstance(fmt, FloatFormat) and fmt.search_format == fmt and fmt.groups((2, 1)).shape[0] == 2


def gptq_quantize_stacked(
    weights: list[torch.Tensor], prepared: PreparedHessian | None, fmt: Format, config: GPTQConfig = GPTQConfig(), name: str = "weight"
) -> list[tuple[QTensor, torch.Tensor]]:
    """GPTQ on weights that read the same input (q, k, v), as one matrix of stacked rows: one
    column loop instead of one per weight. Every row is rounded on its own (the updates of a
    row use only that row and the shared factor), so each weight comes out as
    :func:`gptq_quantize` makes it alone. Needs a :func:`stackable` format for more than one
    weight; returns ``(QTensor, rounded)`` per weight, in order."""
    if isinstance(fmt, FloatFormat):  # stored as they are: nothing to round, nothing to feed forward
        return [(q, fmt.dequantize(q)) for q in map(fmt.quantize, weights)]
    if len(weights) > 1 and not stackable(fmt):
        raise ValueError(f"{fmt.name} chooses params across rows; its weights cannot share one GPTQ pass")
    if config.clip_search is True and not fmt.supports_clip:
        raise LowbitError(f"{fmt.name} has no clipping search (its scales are fixed by the format); drop clip_search")
    w = torch.cat([weight.detach().float() for weight in weights]) if len(weights) > 1 else weights[0].detach().float().clone()
    rows, columns = w.shape
    if tuple(prepared.upper.shape) != (columns, columns):
        raise ValueError(f"{name}: a weight with {columns} input columns needs a {columns}x{columns} Hessian, got {tuple(prepared.upper.shape)}")
    w[:, prepared.dead] = 0

    groups = fmt.groups((rows, columns))
    dynamic = groups.count > 1 and not config.fixed_groups and fmt.search_format == fmt
    chooser = _GroupParams(w, fmt, config, prepared.importance)
    order = list(range(columns)) if prepared.perm is None else prepared.perm.tolist()
    if prepared.perm is not None:
        w = w[:, prepared.perm]
    upper = prepared.upper
    params = None if dynamic else chooser.all_groups()

    codes = torch.empty((rows, columns), dtype=torch.uint8, device=w.device)
    rounded = torch.empty((rows, columns), dtype=torch.float32, device=w.device)
    kernel = on_kernel(fmt, w, config)
    block_size = config.block_size
    if kernel:
        from lowbit.algorithms import gptq_cuda

        # row-major for the kernel (the factorisation may hand back column-major storage); the
        # feed-forward product keeps the factor as it is, so it rounds as the torch loop's does
        kernel_upper = upper.contiguous()
    if kernel and dynamic:  # one group per kernel call: a group's params are chosen at its start
        block_size = min(block_size, groups.group_size)
    column_index = torch.arange(columns, device=w.device) if prepared.perm is None else prepared.perm
    for start, stop in column_blocks(columns, block_size, groups.group_size if dynamic else None):
        width = stop - start
        block = w[:, start:stop]  # a view: updates land in w
        rows_of_u = upper[start:stop, start:]
        if kernel:
            if dynamic:
                if start % groups.group_size == 0:
                    params = chooser.group_starting_at(start, w)
                group = torch.zeros(width, dtype=torch.int32, device=w.device)
            else:
                group = column_index[start:stop] // groups.group_size
            block_codes, block_rounded, errors = gptq_cuda.round_block(
                block, kernel_upper[start:stop, start:stop], params.scale, params.zero, group, fmt.symmetric, fmt.bits
            )
            _feed_forward(w, errors, rows_of_u, start, stop, codes, rounded, block_codes, block_rounded, prepared.perm)
            continue
        diagonal = upper.diagonal()[start:stop]  # a tensor: true division on every device (CUDA multiplies by 1/x for a Python float)
        errors = torch.empty_like(block)
        block_codes = torch.empty((rows, width), dtype=torch.uint8, device=w.device)
        block_rounded = torch.empty_like(block)
        for i in range(width):
            column = order[start + i]
            if dynamic:  # the current group's own params, and the column's place in its group
                if column % groups.group_size == 0:
                    params = chooser.group_starting_at(column, w)
                local = column % groups.group_size
                span = slice(local, local + 1)
            else:
                span = slice(column, column + 1)
            current = block[:, i : i + 1]
            code = fmt.encode(current, params, span)
            value = fmt.decode(code, params, span)
            block_codes[:, i : i + 1] = code
            block_rounded[:, i : i + 1] = value
            error = (current - value) / diagonal[i]  # moves the columns after it by e / U_ii · U_i,>i
            block[:, i + 1 :] -= error * rows_of_u[i, i + 1 : width]
            errors[:, i : i + 1] = error
        _feed_forward(w, errors, rows_of_u, start, stop, codes, rounded, block_codes, block_rounded, prepared.perm)
    if len(weights) == 1:
        final = chooser.all_chosen() if dynamic else params
        return [(QTensor(fmt, (rows, columns), fmt.pack(codes, final)), rounded)]
    out, first = [], 0
    for weight in weights:  # each weight's params from its own rows, as it would have had them alone
        last = first + weight.shape[0]
        part = chooser.rows(first, last)
        out.append((QTensor(fmt, tuple(weight.shape), fmt.pack(codes[first:last], part)), rounded[first:last]))
        first = last
    return out


def on_kernel(fmt: Format, weight: torch.Tensor, config: GPTQConfig) -> bool:
    """Whether the column loop runs as :mod:`gptq_cuda`'s kernel: a uniform integer grid, a CUDA
    weight, Triton importable, lazy blocks the kernel holds (``block_size`` up to its ``MAX_WIDTH``)."""
    if not (isinstance(fmt, IntegerFormat) and weight.is_cuda):
        return False
    try:
        from lowbit.algorithms import gptq_cuda
    except ImportError:
        return False
    return config.block_size <= gptq_cuda.MAX_WIDTH


def _feed_forward(w, errors, rows_of_u, start, stop, codes, rounded, block_codes, block_rounded, perm) -> None:
    """End of a lazy block: its errors reach the later columns as one matrix product, and its
    codes and rounded weights go to their columns (back in the original order under act_order)."""
    w[:, stop:] -= errors @ rows_of_u[:, stop - start :]
    columns_done = slice(start, stop) if perm is None else perm[start:stop]
    codes[:, columns_done] = block_codes
    rounded[:, columns_done] = block_rounded


class _GroupParams:
    """Chooses the params GPTQ rounds with: all at once, or group by group as the loop arrives.

    Group by group, each group's params are chosen from its columns alone as the loop reaches
    them (every format here chooses a group's params from that group's weights only, so these
    are exactly its params within the whole matrix; choosing over the whole matrix at every
    group start cost a full pass per group). The columns are kept, as they were then, in
    ``source``: the params of the whole matrix are chosen from it once at the end, for storage.
    """

    def __init__(self, weight: torch.Tensor, fmt: Format, config: GPTQConfig, importance: torch.Tensor) -> None:
        self.fmt = fmt
        self.config = config
        self.importance = importance
        self.source = weight.clone()
        groups = fmt.groups(tuple(weight.shape))
        self.group_size = groups.group_size
        self.clip = torch.ones(groups.shape, device=weight.device) if config.searches_clip(fmt) else None

    def _clip_ratio(self, weight: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
        return search_clip_ratio(weight, self.fmt, importance, self.config.clip_grid, self.config.clip_min)

    def all_groups(self):
        """Every group's params from the weights as they are now (the originals)."""
        if self.clip is not None:
            self.clip = self._clip_ratio(self.source, self.importance)
        return self.fmt.choose_params(self.source, clip=self.clip)

    def group_starting_at(self, column: int, weight: torch.Tensor):
        """The params of the group starting at ``column``, chosen from ``weight``'s current
        columns: params of a ``(rows, group_size)`` matrix (its columns count from 0)."""
        span = slice(column, column + self.group_size)
        self.source[:, span] = weight[:, span]
        clip = None
        if self.clip is not None:
            group = column // self.group_size
            clip = self.clip[:, group : group + 1] = self._clip_ratio(self.source[:, span], self.importance[span])
        return self.fmt.choose_params(self.source[:, span], clip=clip)

    def all_chosen(self):
        """Every group's params, each from the columns it had when the loop reached it."""
        return self.fmt.choose_params(self.source, clip=self.clip)

    def rows(self, first: int, last: int):
        """The params of rows ``first:last`` alone (a weight of a stacked pass), chosen from the
        columns as the loop reached them (static groups: the originals, with their clip ratios)."""
        return self.fmt.choose_params(self.source[first:last], clip=None if self.clip is None else self.clip[first:last])


@register(GPTQConfig)
def quantize_block(config: GPTQConfig, block: Block, targets: dict[str, Format]) -> dict[str, QTensor]:
    """GPTQ on every target linear of a block: one Hessian per shared input, group by group
    when ``sequential`` (each group installed before the next is collected), else all at once."""
    if block.hidden is None:
        if block.index >= 0:
            raise LowbitError("gptq needs calibration text: pass --calibration FILE")
        # linears outside the decoder layers (lm_head) receive no calibration inputs, as the
        # pipeline warns: they are rounded to nearest, with the same clipping search
        # (the clip search only when asked: with no inputs it could weigh no channel)
        rtn = RTNConfig(bool(config.clip_search), config.clip_grid, config.clip_min)
        return {name: quantize_rtn(block.weight(name), fmt, rtn) for name, fmt in targets.items()}
    out = {}
    for stage in sequential_stages(block, targets, config.sequential):
        statistics = block.collect(config.statistics(), list(stage))
        prepared: dict[int, PreparedHessian] = {}  # one factorisation per shared input
        passes: dict[tuple, list[str]] = {}  # one column loop per shared input and format
        for name, fmt in stage.items():
            shared = statistics[name]
            key = (id(shared), fmt) if stackable(fmt) else (id(shared), fmt, name)
            passes.setdefault(key, []).append(name)
            if id(shared) not in prepared and not isinstance(fmt, FloatFormat):
                label = f"layer {block.index} {name}"
                prepared[id(shared)] = prepare_hessian(shared.hessian, config, label, block.weight(name).device)
        for (shared_id, fmt, *_), names in passes.items():
            label = f"layer {block.index} {'+'.join(names)}"
            results = gptq_quantize_stacked([block.weight(n) for n in names], prepared.get(shared_id), fmt, config, label)
            out.update((n, qtensor) for n, (qtensor, _) in zip(names, results))
        if config.sequential:
            for name in stage:
                block.install(name, out[name])
    return out
