"""Perplexity, KL divergence and top-1 agreement over fixed token windows.

Each window is evaluated on its own (no state carried between windows, no BOS added), so a
number depends only on the windows and the model. Perplexity is ``exp`` of the mean
next-token negative log-likelihood over every prediction of every window. KL divergence is
``KL(reference || model)`` of the next-token distributions, and top-1 agreement the share
of positions where both models rank the same token first; both are averaged over every
position of every window. All of it is computed in float32 whatever the model's dtype.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

#: keep the reference's log-probabilities in memory up to this size, else recompute them
REFERENCE_CACHE_BYTES = 6 * 2**30


@dataclass
class ReferenceLogProbs:
    """A reference model's next-token log-probabilities on a set of windows, computed once."""

    windows: torch.Tensor
    log_probs: list[torch.Tensor]  # one (batch, length, vocab) float32 tensor per batch
    batch_size: int


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _log_probs(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch.to(_device_of(model)), use_cache=False).logits
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def reference_log_probs(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> ReferenceLogProbs:
    batches = windows.split(batch_size)
    log_probs = [_log_probs(model, b) for b in tqdm(batches, desc="reference", unit="batch", disable=not progress)]
    return ReferenceLogProbs(windows, log_probs, batch_size)


def fits_cache(windows: torch.Tensor, vocab_size: int) -> bool:
    return windows.numel() * vocab_size * 4 <= REFERENCE_CACHE_BYTES


@torch.no_grad()
def evaluate_windows(
    model: nn.Module,
    windows: torch.Tensor,
    reference: nn.Module | ReferenceLogProbs | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """Quality and forward speed of ``model`` on ``windows`` (``(n, length)`` token ids)."""
    if isinstance(reference, ReferenceLogProbs):
        if not torch.equal(reference.windows, windows) or reference.batch_size != batch_size:
            raise ValueError("the cached reference was computed on other windows or batches")
    nll_sum = kl_sum = agree = 0.0
    predictions = positions = 0
    forward_seconds = 0.0
    batches = windows.split(batch_size)
    for index, batch in enumerate(tqdm(batches, desc="evaluating", unit="batch", disable=not progress)):
        start = time.perf_counter()
        log_probs = _log_probs(model, batch)
        forward_seconds += time.perf_counter() - start
        targets = batch[:, 1:].unsqueeze(-1)
        nll_sum -= log_probs[:, :-1].gather(-1, targets).sum().item()
        predictions += targets.numel()
        if reference is not None:
            ref = reference.log_probs[index] if isinstance(reference, ReferenceLogProbs) else _log_probs(reference, batch)
            kl_sum += (ref.exp() * (ref - log_probs)).sum().item()
            agree += (ref.argmax(-1) == log_probs.argmax(-1)).sum().item()
            positions += batch.numel()
    result = {
        "perplexity": float(torch.tensor(nll_sum / predictions).exp()),
        "kl_divergence": kl_sum / positions if positions else None,
        "top1_agreement": agree / positions if positions else None,
        "tokens_per_second": windows.numel() / forward_seconds,
        "windows": int(windows.shape[0]),
        "window_length": int(windows.shape[1]),
    }
    return result
