"""Which device work runs on: the user's choice, checked, or CUDA when there is one.

A device the machine does not have (``cuda`` without a GPU, ``cuda:3`` on a one-GPU host, a
typo) is a clear error before any work starts, rather than a traceback from deep in torch.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a checked ``torch.device``; ``None`` means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise LowbitError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise LowbitError(f"device {device!r} was asked for, but torch sees no CUDA GPU on this machine; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise LowbitError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif resolved.type not in ("cpu", "mps", "xpu"):
        raise LowbitError(f"device {device!r} is not supported; use cpu or cuda")
    return resolved
