"""GPTQ's column loop for uniform integer grids as one Triton kernel per lazy block (CUDA only).

On a GPU the column loop of :mod:`lowbit.algorithms.gptq` is bound by launches, not arithmetic:
every column costs about twenty small kernels (the format's ``encode`` and ``decode``, the
error, the rank-one update) and the Python between them, so a Llama-3-8B block (26,624
columns) spent seconds in launches. Rows never interact in GPTQ (each row's update uses only
that row and the shared inverse-Hessian factor), so one kernel instance can take a tile of
rows and the whole lazy block of up to 128 columns in registers and run the block's column
steps itself; the block's errors then reach the later columns through one matrix product,
as before.

The kernel computes exactly the operations of the torch loop with the format's
``IntegerFormat.encode`` / ``decode``, in the same order and rounding: ``q = clamp(round(w /
s) + z)`` (IEEE division, round half to even), ``w' = (q − z) · s``, ``e = (w − w') / U_ii``,
and the update as a product then a subtraction (no fused multiply-add:
``enable_fp_fusion=False``). So on a GPU it gives the torch loop's codes bit for bit
(``tests/test_gptq_gpu.py``, run on a CUDA machine). Params come in as they are stored, one
per group (``(rows, groups)``, or ``(1, 1)`` per tensor) with each block column's group index;
the caller chooses them (dynamic groups at each group start, as the loop does).

Importing this module needs Triton (it ships with CUDA builds of torch); ``gptq`` imports it
only for CUDA weights and keeps its torch loop where the import fails.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: widest lazy block the kernel holds in registers
MAX_WIDTH = 128


#: float32 numbers from 2**23 up are whole: adding and taking away 2**23 rounds a smaller one
#: to a whole number, ties to even (the default rounding), as torch.round does
_WHOLE = tl.constexpr(8388608.0)


@triton.jit
def _round_half_even(x):
    """``torch.round`` of float32 ``x`` (the sign of a zero result aside, which no code sees)."""
    size = tl.abs(x)
    whole = tl.where(size < _WHOLE, (size + _WHOLE) - _WHOLE, size)
    return tl.where(x < 0, -whole, whole)


@triton.jit
def _gptq_block(
    w_ptr, w_stride, u_ptr, u_stride, scale_ptr, divisor_ptr, zero_ptr, param_stride, group_ptr,
    codes_ptr, rounded_ptr, errors_ptr, rows,
    width: tl.constexpr, SYMMETRIC: tl.constexpr, HALF: tl.constexpr, LEVELS: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr,
):  # fmt: skip
    """One program: ``ROWS`` rows of the lazy block, all its columns in registers, stepped in order."""
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, WIDTH)
    row_ok = row < rows
    col_ok = col < width
    tile_ok = row_ok[:, None] & col_ok[None, :]
    tile = tl.load(w_ptr + row[:, None].to(tl.int64) * w_stride + col[None, :], mask=tile_ok, other=0.0)
    codes = tl.zeros((ROWS, WIDTH), dtype=tl.float32)
    rounded = tl.zeros((ROWS, WIDTH), dtype=tl.float32)
    errors = tl.zeros((ROWS, WIDTH), dtype=tl.float32)
    param_row = row.to(tl.int64) * param_stride
    for i in range(width):
        here = col[None, :] == i
        x = tl.sum(tl.where(here, tile, 0.0), axis=1)
        group = tl.load(group_ptr + i)
        scale = tl.load(scale_ptr + param_row + group, mask=row_ok, other=1.0)
        divisor = tl.load(divisor_ptr + param_row + group, mask=row_ok, other=1.0)
        steps = _round_half_even(tl.math.div_rn(x, divisor))
        if SYMMETRIC:
            q = tl.minimum(tl.maximum(steps, -HALF), HALF - 1) + HALF
            value = (q - HALF) * scale
        else:
            zero = tl.load(zero_ptr + param_row + group, mask=row_ok, other=0.0)
            q = tl.minimum(tl.maximum(steps + zero, 0.0), LEVELS)
            value = (q - zero) * scale
        u_row = tl.load(u_ptr + i * u_stride + col, mask=col_ok & (col > i), other=0.0)
        diagonal = tl.load(u_ptr + i * u_stride + i)
        error = tl.math.div_rn(x - value, diagonal)
        tile = tl.where(col[None, :] > i, tile - error[:, None] * u_row[None, :], tile)
        codes = tl.where(here, q[:, None], codes)
        rounded = tl.where(here, value[:, None], rounded)
        errors = tl.where(here, error[:, None], errors)
    out = row[:, None].to(tl.int64) * width + col[None, :]
    tl.store(codes_ptr + out, codes.to(tl.int32).to(tl.uint8), mask=tile_ok)  # via int32: codes 128..255 too
    tl.store(rounded_ptr + out, rounded, mask=tile_ok)
    tl.store(errors_ptr + out, errors, mask=tile_ok)


def round_block(
    block: torch.Tensor, upper: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: torch.Tensor,
    symmetric: bool, bits: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """GPTQ's column steps over one lazy block, on the GPU.

    ``block``: the ``(rows, width)`` float32 columns (a view of the weight; left unchanged),
    ``upper``: the block's ``(width, width)`` rows and columns of the inverse-Hessian factor,
    ``scale`` / ``zero``: the integer params per group (``(rows, groups)`` or ``(1, 1)``),
    ``group``: each block column's group index. Returns the block's codes (uint8), rounded
    weights and scaled errors ``(w − w') / U_ii``, each ``(rows, width)``.
    """
    rows, width = block.shape
    if width > MAX_WIDTH or block.stride(1) != 1 or upper.stride(1) != 1:
        raise ValueError(f"round_block takes up to {MAX_WIDTH} unit-stride columns, got {tuple(block.shape)}")
    scale = scale.float().contiguous()
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = scale if zero is None else zero.float().contiguous()
    param_stride = scale.shape[1] if scale.shape[0] > 1 else 0
    codes = torch.empty((rows, width), dtype=torch.uint8, device=block.device)
    rounded = torch.empty((rows, width), dtype=torch.float32, device=block.device)
    errors = torch.empty((rows, width), dtype=torch.float32, device=block.device)
    tile_rows = 16
    _gptq_block[(triton.cdiv(rows, tile_rows),)](
        block, block.stride(0), upper, upper.stride(0), scale, divisor, zero, param_stride, group.to(torch.int32).contiguous(),
        codes, rounded, errors, rows, width,
        SYMMETRIC=symmetric, HALF=2 ** (bits - 1), LEVELS=2**bits - 1, ROWS=tile_rows,
        WIDTH=max(16, triton.next_power_of_2(width)), num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return codes, rounded, errors
