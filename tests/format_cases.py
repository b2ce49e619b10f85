"""Seeded weights, clip factors and a digest of stored bytes, shared by the format tests.

Kept free of lowbit imports so the same cases can be replayed against any version of the
formats (tests/data/format_digests.json was recorded with them from commit 3ed763e).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import torch

#: every format family and variant the part tests cover
FORMAT_NAMES = tuple(
    f"int{bits}-{kind}-{grouping}"
    for bits in range(2, 9)
    for kind in ("sym", "asym")
    for grouping in ("g1", "g7", "g32", "g64", "g128", "ch", "tensor")
) + (
    "nf4", "nf4-dq", "nf4-g128", "nf4-dq-g16", "fp8", "fp8-e5m2", "fp8-tensor", "fp8-e5m2-tensor",
    "mxfp4", "bf16", "fp16", "fp32",
)  # fmt: skip

#: awkward shapes: 576-wide rows, partial groups, a single column, one column past 4096
SHAPES = ((7, 576), (33, 100), (5, 1), (3, 4097), (16, 256))


def awkward_weight(shape: tuple[int, int], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian rows of very different magnitudes, with an all-zero row and an all-zero run
    of columns (zero groups and zero scales), and a few outliers."""
    generator = torch.Generator().manual_seed(seed)
    rows, columns = shape
    weight = torch.randn(shape, generator=generator) * torch.logspace(-3, 1, rows).unsqueeze(1)
    if rows > 1:
        weight[1] = 0
    weight[0, : min(columns, 40)] = 0
    spikes = torch.randint(0, rows * columns, (max(1, rows * columns // 500),), generator=generator)
    weight.view(-1)[spikes] *= 25
    return weight.to(dtype)


def clip_factors(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Per-group shrink factors in [0.5, 1]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator) * 0.5 + 0.5


def digest_cases() -> Iterator[tuple[str, torch.Tensor]]:
    """(label, weight) for every digest case: each shape in float32, and one in bfloat16."""
    for index, shape in enumerate(SHAPES):
        yield f"{shape[0]}x{shape[1]}", awkward_weight(shape, seed=100 + index)
    yield "8x200-bf16", awkward_weight((8, 200), seed=99, dtype=torch.bfloat16)


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def digest_format(
    quantize: Callable[[torch.Tensor, torch.Tensor | None], dict[str, torch.Tensor]],
    dequantize: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    clip_shape: Callable[[tuple[int, int]], tuple[int, ...]] | None,
) -> dict[str, str]:
    """SHA-256 over every case's stored parts (name, dtype, shape, bytes) — without and, where
    the format clips, with seeded clip factors — and over its float32 dequantization.

    ``quantize(weight, clip)`` returns the parts, ``dequantize(weight, clip)`` the float32
    weight the stored parts stand for; ``clip_shape`` is None for formats without clipping.
    """
    hashes = {"quantize": hashlib.sha256(), "quantize_clip": hashlib.sha256(), "dequantize": hashlib.sha256()}
    for seed, (label, weight) in enumerate(digest_cases()):
        clips = {"quantize": None}
        if clip_shape is not None:
            clips["quantize_clip"] = clip_factors(clip_shape(tuple(weight.shape)), seed)
        for key, clip in clips.items():
            for name, part in sorted(quantize(weight, clip).items()):
                hashes[key].update(f"{label}/{name}/{part.dtype}/{tuple(part.shape)}".encode())
                hashes[key].update(tensor_bytes(part))
            hashes["dequantize"].update(tensor_bytes(dequantize(weight, clip).float()))
    if clip_shape is None:
        del hashes["quantize_clip"]
    return {key: value.hexdigest() for key, value in hashes.items()}
