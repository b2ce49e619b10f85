"""llama.cpp's quantization arithmetic, in float32 torch, vectorized across blocks.

The GGUF block formats must write the very bytes ``llama-quantize`` writes, so this module
restates the helpers of ``ggml/src/ggml-quants.c`` (llama.cpp as vendored in
llama-cpp-python 0.3.36) with C's float semantics:

- every sum is accumulated in float32 element by element, in the C loop's order
  (:func:`seq_sum`); torch's reductions add pairwise or in double and round differently;
- products and quotients are taken in the C expression's order (``w*l*x`` is ``(w*l)*x``);
- ``sqrtf`` is taken in float64 and rounded (:func:`sqrtf`), and a quotient is always
  tensor by tensor (torch turns ``15 / t`` into a multiplication by ``1/t``, and CUDA
  ``t / 15`` too: :func:`quotient`);
- ``nearest_int`` is the ``+ 12582912.f`` bit trick (:func:`nearest_int`), ``roundf`` rounds
  half away from zero (:func:`round_away`), casts to ``int8``/``uint8`` truncate and wrap;
- "the first element whose ``|x|`` is largest" is a first-occurrence argmax, and a search
  that starts from ``0`` keeps ``+0.0`` where every element is zero (the sign of a zero
  scale is a stored bit).

The iterative searches (``make_qx_quants``, ``make_qkx2_quants``/``make_qkx3_quants``,
``make_q3_quants``, ``make_qp_quants``) keep one state per block and loop over candidates
and elements with tensor ops across all blocks at once. Their early exits ("break when
nothing changed") become one exit when no block changed in a pass: a pass that changes
nothing leaves a block's state as it was, so further passes change nothing either. Inputs
are ``(blocks, n)`` float32 tensors; results are per block. Written by hand because no
library exposes llama.cpp's quantizers as array code (gguf-py quantizes Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 only, and without importance).
"""

from __future__ import annotations

import torch

#: ``GROUP_MAX_EPS``: a group whose largest magnitude is below it is all zero
GROUP_MAX_EPS = 1e-15


def f32(value: float) -> torch.Tensor:
    """A C ``float`` constant (``0.1f`` is not 0.1)."""
    return torch.tensor(value, dtype=torch.float32)


def quotient(numerator: torch.Tensor, denominator: float) -> torch.Tensor:
    """``numerator / (float)denominator`` as C divides, on every device: CUDA turns a division
    by a CPU scalar (``f32(15)`` included) into a multiplication by its reciprocal, which
    rounds differently, so the divisor is put on the numerator's device."""
    return numerator / torch.tensor(denominator, dtype=torch.float32, device=numerator.device)


def nonzero(d: torch.Tensor) -> torch.Tensor:
    """``d`` with zeros replaced by ones: a divisor for lanes whose result is then discarded."""
    return torch.where(d != 0, d, torch.ones_like(d))


def inverse(d: torch.Tensor) -> torch.Tensor:
    """``d ? 1.0f/d : 0.0f``."""
    return torch.where(d != 0, f32(1) / nonzero(d), torch.zeros_like(d))


def sqrtf(value: torch.Tensor) -> torch.Tensor:
    """C ``sqrtf``, correctly rounded: torch's float32 ``sqrt`` on the CPU is not (about one
    result in six is one ulp off); the square root of a float32 taken in float64 and rounded
    back is."""
    return torch.sqrt(value.double()).float()


def seq_sum(terms: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """``acc = start (or +0.0); for i: acc += terms[..., i]`` in float32, as a C loop adds."""
    columns = terms.movedim(-1, 0).contiguous()
    acc = torch.zeros(terms.shape[:-1], dtype=torch.float32, device=terms.device) if start is None else start
    for column in columns:
        acc = acc + column
    return acc


def nearest_int(value: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``: ``value + 12582912.f`` read as an integer (round half to even
    for ``|value| < 2**22``; the same bits as C beyond it)."""
    bits = (value.float() + 12582912.0).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def round_away(value: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: to the nearest integer, halves away from zero (exact in float32)."""
    whole = torch.trunc(value)
    half_up = (value - whole).abs() >= 0.5
    return whole + torch.where(half_up, torch.sign(value), torch.zeros_like(value))


def to_fp16(value: torch.Tensor) -> torch.Tensor:
    """``GGML_FP32_TO_FP16``: round to nearest even, as stored (a float16 tensor)."""
    return value.to(torch.float16)


def from_fp16(half: torch.Tensor) -> torch.Tensor:
    """``GGML_FP16_TO_FP32``: exact for numbers; a NaN keeps its sign and payload (torch turns
    every float16 NaN into 0x7FFFFFFF, and a payload reaches the codes through ``nearest_int``)."""
    value = half.float()
    bits = half.view(torch.int16).int() & 0xFFFF
    nan = ((bits & 0x8000) << 16) | 0x7F800000 | ((bits & 0x3FF) << 13)
    return torch.where(torch.isnan(value), nan.view(torch.float32), value)


def first_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``amax = 0; if (fabsf(x) > amax) { amax = fabsf(x); max = x; }``: the largest
    magnitude and the signed value first reaching it (``+0.0`` for an all-zero block; a NaN
    never compares greater, so it is passed over)."""
    magnitude = x.abs()
    magnitude = torch.where(torch.isnan(magnitude), torch.zeros_like(magnitude), magnitude)
    index = magnitude.argmax(-1, keepdim=True)
    amax = magnitude.gather(-1, index).squeeze(-1)
    signed = x.gather(-1, index).squeeze(-1)
    return amax, torch.where(amax > 0, signed, torch.zeros_like(signed))


def positive_max(x: torch.Tensor) -> torch.Tensor:
    """``m = 0; if (x > m) m = x``: the largest value if one is positive, else +0.0 (NaN passed over)."""
    return torch.where(x > 0, x, torch.zeros_like(x)).amax(-1)


def first_min_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``min = max = x[0]; if (x < min) min = x; if (x > max) max = x``: first occurrences
    (for finite ``x``: weights are checked finite before they get here)."""
    low = x.gather(-1, x.argmin(-1, keepdim=True)).squeeze(-1)
    high = x.gather(-1, x.argmax(-1, keepdim=True)).squeeze(-1)
    return low, high


def float_to_int(value: torch.Tensor) -> torch.Tensor:
    """A C cast of a float to a (narrow) integer as x86-64 compiles it: ``cvttss2si``
    (truncate; NaN and values beyond int32 give ``INT_MIN``), int64 holding the int32; the
    caller keeps the low bits it needs."""
    fits = value.abs() < 2.0**31
    return torch.where(
        fits,
        torch.trunc(torch.where(fits, value, torch.zeros_like(value))),
        f32(-(2.0**31)),
    ).long()


def as_int8(value: torch.Tensor) -> torch.Tensor:
    """The low byte of an integer, read as signed (an ``int8_t`` store)."""
    return ((value + 128) & 0xFF) - 128


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``(blocks, n)`` -> ``(n, blocks)`` contiguous: the searches below keep element ``i`` of
    every block in one contiguous row, so C's element loop is a loop over rows."""
    return x.t().contiguous()


def _sum_rows(terms: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`seq_sum` over the rows of an ``(n, ...)`` tensor (several sums at once when the
    rows are ``(k, blocks)``)."""
    acc = torch.zeros(terms.shape[1:], dtype=torch.float32, device=terms.device) if start is None else start.clone()
    for row in terms:
        acc.add_(row)
    return acc


def make_qx_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``: a signed scale and codes ``L`` in
    ``0 .. 2*nmax-1`` (offset ``nmax``). ``weights`` None: ``x*x``, as the C code without ``qw``."""
    amax, top = first_absmax(x)
    empty = amax < GROUP_MAX_EPS
    safe_top = torch.where(empty, torch.ones_like(top), top)
    x = _rows(x)
    w = x * x if weights is None else _rows(weights)
    wx = w * x

    terms = torch.empty((2, *x.shape), dtype=torch.float32, device=x.device)
    work, lf = torch.empty_like(x), torch.empty_like(x)  # temporaries written in place
    bits = work.view(torch.int32)

    def levels(iscale: torch.Tensor) -> torch.Tensor:
        """``MAX(-nmax, MIN(nmax-1, nearest_int(iscale*x)))`` (int32, a view of ``work``)."""
        torch.mul(x, iscale, out=work).add_(12582912.0)
        return bits.bitwise_and_(0x007FFFFF).sub_(0x00400000).clamp_(-nmax, nmax - 1)

    def attempt(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lf.copy_(levels(iscale))
        torch.mul(wx, lf, out=terms[0])
        torch.mul(w, lf, out=terms[1])
        terms[1].mul_(lf)
        sums = _sum_rows(terms.transpose(0, 1))
        return sums[0], sums[1]

    chosen = f32(-nmax) / safe_top  # the codes are levels(chosen) of the best candidate
    sumlx, suml2 = attempt(chosen)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(nmax + f32(0.1) * step) / safe_top
        slx, sl2 = attempt(iscale)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        chosen = torch.where(better, iscale, chosen)
        scale = torch.where(better, slx / sl2, scale)
        best = torch.where(better, scale * slx, best)
    codes = torch.where(empty, 0, levels(chosen) + nmax).t()
    return torch.where(empty, torch.zeros_like(scale), scale), codes.to(torch.uint8)


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: weights ``x*x``, then up to five
    passes that move one code at a time when that raises ``sumlx**2 / suml2``."""
    amax, top = first_absmax(x)
    empty = amax < GROUP_MAX_EPS
    safe_top = torch.where(empty, torch.ones_like(top), top)
    x = _rows(x)
    w = x * x
    wx = w * x
    level = nearest_int((f32(-nmax) / safe_top) * x).clamp(-nmax, nmax - 1)
    lf = level.float()
    sumlx, suml2 = _sum_rows(wx * lf), _sum_rows(w * lf * lf)
    # C stops a block after a pass that changed none of its codes: each pass runs on the
    # blocks the previous one changed (about a fifth after the first pass), which is exact
    active = None  # every block in the first pass
    for _ in range(5):
        if active is None:
            xs, ws, wxs, codes, slx_all, sl2_all = x, w, wx, level, sumlx, suml2
        else:
            xs, ws, wxs, codes = (t.index_select(1, active) for t in (x, w, wx, level))
            slx_all, sl2_all = sumlx.index_select(0, active), suml2.index_select(0, active)
        moved = torch.zeros_like(slx_all, dtype=torch.bool)
        for i in range(x.shape[0]):
            li = codes[i].float()
            slx = slx_all - wxs[i] * li
            sl2 = sl2_all - ws[i] * li * li
            new = nearest_int(xs[i] * sl2 / slx).clamp(-nmax, nmax - 1)
            newf = new.float()
            slx2 = slx + wxs[i] * newf
            sl22 = sl2 + ws[i] * newf * newf
            take = (slx > 0) & (new != codes[i]) & (sl22 > 0) & (slx2 * slx2 * sl2_all > slx_all * slx_all * sl22)
            codes[i] = torch.where(take, new, codes[i])
            slx_all = torch.where(take, slx2, slx_all)
            sl2_all = torch.where(take, sl22, sl2_all)
            moved |= take
        if active is None:
            sumlx, suml2 = slx_all, sl2_all
            active = moved.nonzero().flatten()
        else:
            level.index_copy_(1, active, codes)
            sumlx.index_copy_(0, active, slx_all)
            suml2.index_copy_(0, active, sl2_all)
            active = active[moved]
        if active.numel() == 0:
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    codes = torch.where(empty, 0, level + nmax).t()
    return torch.where(empty, torch.zeros_like(scale), scale), codes.to(torch.uint8)


def make_qkx_quants(
    x: torch.Tensor,
    weights: torch.Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_qkx2_quants`` / ``make_qkx3_quants`` with weights (the two are the same code
    then): scale, ``the_min`` (``-min`` >= 0) and codes ``0..nmax`` of an asymmetric grid,
    searching ``nstep + 1`` candidate scales by weighted least squares; candidates are
    scored by the weighted squared error, or the absolute one with ``use_mad``."""
    low, high = first_min_max(x)
    low = torch.where(low > 0, torch.zeros_like(low), low)
    flat = high == low
    span = torch.where(flat, torch.ones_like(high), high - low)
    x, weights = _rows(x), _rows(weights)
    sum_w = _sum_rows(weights[1:], weights[0])
    sum_x = _sum_rows(weights[1:] * x[1:], weights[0] * x[0])

    # the (n, blocks) temporaries are written in place: a fresh megabyte per operation costs
    # more in page faults than the arithmetic does
    work = torch.empty_like(x)
    bits = work.view(torch.int32)

    def levels(iscale: torch.Tensor, minimum: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``MAX(0, MIN(nmax, nearest_int(iscale*(x - min))))`` as floats, into ``out``."""
        torch.sub(x, minimum, out=work).mul_(iscale).add_(12582912.0)
        bits.bitwise_and_(0x007FFFFF).sub_(0x00400000).clamp_(0, nmax)
        return out.copy_(bits)

    def error(scale: torch.Tensor, minimum: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        diff = torch.mul(level, scale, out=work).add_(minimum).sub_(x)
        diff = diff.abs_() if use_mad else diff.mul_(diff)
        return _sum_rows(diff.mul_(weights))

    iscale = f32(nmax) / span
    scale = f32(1) / iscale
    candidate = torch.empty_like(x)
    best = error(scale, low, levels(iscale, low, candidate))
    minimum = low
    # the winner's codes are levels(chosen_iscale, chosen_from) again: kept as two numbers a block
    chosen_iscale, chosen_from = iscale, low
    terms = torch.empty((3, *x.shape), dtype=torch.float32, device=x.device)
    for step in range(nstep + 1):  # a better candidate moves the minimum the next ones start from
        iscale = (f32(rmin) + f32(rdelta) * step + nmax) / torch.where(flat, span, high - minimum)
        levels(iscale, minimum, candidate)
        torch.mul(weights, candidate, out=terms[0])
        torch.mul(terms[0], candidate, out=terms[1])
        torch.mul(terms[0], x, out=terms[2])
        sum_l, sum_l2, sum_xl = _sum_rows(terms.transpose(0, 1))
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        current = error(this_scale, this_min, candidate)
        better = (det > 0) & (current < best)
        chosen_iscale = torch.where(better, iscale, chosen_iscale)
        chosen_from = torch.where(better, minimum, chosen_from)
        best = torch.where(better, current, best)
        scale = torch.where(better, this_scale, scale)
        minimum = torch.where(better, this_min, minimum)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    codes = torch.where(flat, 0.0, levels(chosen_iscale, chosen_from, candidate)).t().to(torch.uint8)
    return scale, torch.where(flat, -low, -minimum), codes


def make_qp_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qp_quants(n, nmax, x, L, quant_weights)``: one positive scale for the non-negative
    values ``x`` (a super-block's sub-block scales or mins) and their codes ``0..nmax``."""
    x, w = _rows(x), _rows(weights)
    top = torch.zeros(x.shape[1:], dtype=torch.float32, device=x.device)
    for row in x:  # MAX(max, x[i]): a signed zero follows C's comparison
        top = torch.where(top > row, top, row)
    empty = top < GROUP_MAX_EPS
    top = torch.where(empty, torch.ones_like(top), top)
    wx = w * x

    def mse(scale: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        diff = x - scale * level
        return _sum_rows(w * diff * diff)

    iscale = f32(nmax) / top
    stored = (nearest_int(iscale * x) & 0xFF).float()
    best = mse(f32(1) / iscale, stored)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (f32(0.1) * step + nmax) / top
        current = mse(f32(1) / iscale_is, nearest_int(iscale_is * x).clamp(max=nmax).float())
        better = current < best
        best = torch.where(better, current, best)
        iscale = torch.where(better, iscale_is, iscale)
    level = nearest_int(iscale * x).clamp(max=nmax)
    lf = level.float()
    sumlx, suml2 = _sum_rows(wx * lf), _sum_rows(w * lf * lf)
    stored = level & 0xFF
    for _ in range(5):
        moved = torch.zeros_like(sumlx, dtype=torch.bool)
        for i in range(x.shape[0]):
            xi, wi, wxi, li = x[i], w[i], wx[i], stored[i].float()
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            new = nearest_int(xi * sl2 / slx).clamp(max=nmax)
            newf = new.float()
            slx2 = slx + wxi * newf
            sl22 = sl2 + wi * newf * newf
            take = (slx > 0) & (sl2 > 0) & (new != stored[i]) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            stored[i] = torch.where(take, new & 0xFF, stored[i])
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
            moved |= take
        if not bool(moved.any()):
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    scale = torch.where(empty, torch.zeros_like(scale), scale)
    return scale, torch.where(empty, 0, stored).t().to(torch.uint8)
