"""Perplexity, KL divergence and top-1 agreement over fixed token windows.

Each window is evaluated on its own (no state carried between windows; a window starts
with BOS only when the caller put it there, see ``lowbit.api.evaluation_windows``), so a
number depends only on the windows and the model. Perplexity is ``exp`` of the mean
next-token negative log-likelihood over every prediction of every window. KL divergence is
``KL(reference || model)`` of the next-token distributions, and top-1 agreement the share
of positions where both models rank the same token first; both are averaged over every
position of every window. All of it is computed in float32 (sums in float64) whatever the
model's dtype.

**Uncertainty.** Every window holds as many positions as the others, so each number is the
mean of the windows' own means, and its standard error across windows
(``std(window means) / sqrt(windows)``, ``None`` for one window) says how much it would move
on other text of the same kind: ``log_perplexity_se`` for the log of the perplexity (the
perplexity's relative error), ``kl_divergence_se`` and ``top1_agreement_se``.

**A compact reference.** Comparing many models against one reference keeps what the KL
needs of the reference instead of its distributions (``windows x length x vocab`` floats:
4 GB for the dev protocol on SmolLM2, vocabulary 49,152). Write the model's log-probability
of token ``v`` as ``log q_v = w_v . h + b_v - LSE`` (``h``: the input of the output layer,
``w_v``, ``b_v``: its row and bias for ``v``, ``LSE``: the log-sum-exp of the logits). Then

    KL(p || q) = sum_v p_v log p_v - e . h - p . b + LSE,    with  e = sum_v p_v w_v

so per position the reference is summed up by its negative entropy ``sum_v p_v log p_v``,
the expected output row ``e`` (hidden-size floats), ``p . b`` and its top-1 token:
``4 x hidden + 16`` bytes per position (24 with a bias), 47 MB for the dev protocol on
SmolLM2 (hidden 576), 336 MB on Llama-3-8B (hidden 4096; its vocabulary of 128,256 would
take 10.5 GB in full).

This is the exact KL (up to rounding), not an estimate: it holds whenever the evaluated model's logits are
its output layer's float32 output with the reference's output weights and bias (lowbit's
presets keep ``lm_head``; the check is by value, per run, plus per batch that the returned
logits are that layer's output). Otherwise (a quantized ``lm_head``, logit soft-capping as
in Gemma 2, half-precision logits) the reference model is run again for that batch. The
reference evaluated against itself is run once and compared with its own distributions
(KL exactly 0).

Measured on SmolLM2-135M, 4 dev windows of 512 (2026-11-25): the KL from the summary and
the KL from the full distributions (in float32, as lowbit computed it before) differ by
8e-8 at int8 (KL 0.00255), 3e-6 at int4-g128 (0.333) and 1.2e-5 at int3-g128 (1.498), about
1e-5 relative at most; top-1 agreement and perplexity are identical. The summary's sums are
float64 (with float32 log-probabilities the reference's p sums to 1 only within 1e-5, which
shifted the KL by 1.6e-4). Keeping the reference's top 256 tokens and one bucket for the
rest instead, a lower bound suggested first, underestimated the KL by 13-15 % there (the
rest held up to 47 % of the probability at some positions), and by 6 % with 1,024 tokens.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class ReferenceBatch:
    """What the KL needs of a reference's distributions on one batch (see the module docstring)."""

    top1: torch.Tensor  # (batch, length): the most likely token
    neg_entropy: torch.Tensor  # (batch, length), float64: sum_v p_v log p_v
    expected_row: torch.Tensor  # (batch, length, hidden), float32: sum_v p_v w_v
    expected_bias: torch.Tensor | None  # (batch, length), float64: sum_v p_v b_v

    @property
    def nbytes(self) -> int:
        tensors = [t for t in (self.top1, self.neg_entropy, self.expected_row, self.expected_bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class ReferenceLogProbs:
    """A reference model's distributions on a set of windows, summed up once for the KL.

    ``model`` is the reference itself, run again for a batch where the summary does not
    apply; ``head_weight`` and ``head_bias`` are its output layer's, which the evaluated
    model must share for the summary to apply.
    """

    windows: torch.Tensor
    batches: list[ReferenceBatch]
    batch_size: int
    model: nn.Module
    head_weight: torch.Tensor
    head_bias: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        return sum(batch.nbytes for batch in self.batches)

    def shares_head(self, model: nn.Module) -> bool:
        """Whether ``model``'s output layer has this reference's float32 weights and bias."""
        head = model.get_output_embeddings()
        weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
        if not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32 or weight.shape != self.head_weight.shape:
            return False
        if (bias is None) != (self.head_bias is None):
            return False
        same = weight is self.head_weight or torch.equal(weight, self.head_weight.to(weight.device))
        return same and (bias is None or torch.equal(bias, self.head_bias.to(bias.device)))


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _head_input(model: nn.Module) -> Iterator[dict]:
    """Record the output layer's input and output during a forward."""
    seen: dict = {}

    def record(_module, inputs, output):
        seen["input"], seen["output"] = inputs[0], output

    handle = model.get_output_embeddings().register_forward_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


@torch.no_grad()
def _forward(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logits, output layer input)``; the input is None unless the logits are exactly the
    output layer's float32 output (no soft-capping or scaling after it)."""
    with _head_input(model) as seen:
        logits = model(input_ids=batch.to(_device_of(model)), use_cache=False).logits
    exact_head = seen.get("output") is logits and logits.dtype == torch.float32
    return logits, seen["input"] if exact_head else None


def _log_probs(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(_forward(model, batch)[0].float(), dim=-1).cpu()


@torch.no_grad()
def reference_log_probs(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> ReferenceLogProbs:
    """Sum up the reference's distributions on ``windows`` for later comparisons."""
    head = model.get_output_embeddings()
    bias = None if getattr(head, "bias", None) is None else head.bias.detach()
    batches = []
    for batch in tqdm(windows.split(batch_size), desc="reference", unit="batch", disable=not progress):
        batches.append(_summarize(_forward(model, batch)[0].cpu(), head.weight.detach(), bias))
    return ReferenceLogProbs(windows, batches, batch_size, model, head.weight, bias)


#: positions, and vocabulary entries, taken at a time: bounds the float64 copies of a
#: batch's distributions to a few tens of MB
POSITION_CHUNK = 64
VOCABULARY_CHUNK = 8192


def _log_partition(logits: torch.Tensor) -> torch.Tensor:
    """The log-sum-exp of the logits in float64 (a few positions at a time)."""
    return torch.cat([chunk.double().logsumexp(-1) for chunk in logits.split(POSITION_CHUNK, dim=-2)], dim=-1)


def _summarize(logits: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> ReferenceBatch:
    """The summary of the distributions ``softmax(logits)``, all sums in float64 (so that p sums
    to 1: with float32 log-probabilities it is off by ~1e-5 at a log-sum-exp of ~40, which
    would shift the KL by ~4e-4), a slice of the vocabulary at a time."""
    top1 = torch.cat([torch.log_softmax(c.float(), dim=-1).argmax(-1) for c in logits.split(POSITION_CHUNK, dim=-2)], dim=-1)
    log_partition = _log_partition(logits).unsqueeze(-1)
    neg_entropy = torch.zeros(logits.shape[:-1], dtype=torch.float64)
    expected_row = torch.zeros(*logits.shape[:-1], weight.shape[1], dtype=torch.float64)
    expected_bias = None if bias is None else torch.zeros(logits.shape[:-1], dtype=torch.float64)
    for start in range(0, logits.shape[-1], VOCABULARY_CHUNK):
        piece = slice(start, start + VOCABULARY_CHUNK)
        log_p = logits[..., piece].double() - log_partition
        p = log_p.exp()
        neg_entropy += (p * log_p).sum(-1)
        expected_row += p @ weight[piece].double().cpu()
        if expected_bias is not None:
            expected_bias += p @ bias[piece].double().cpu()
    return ReferenceBatch(top1, neg_entropy, expected_row.float(), expected_bias)


def _kl_from_summary(reference: ReferenceBatch, hidden: torch.Tensor, log_partition: torch.Tensor) -> torch.Tensor:
    """Per window, the sum over its positions of KL(p || q), for a model whose logits are
    ``w . hidden + b`` with the reference's ``w`` and ``b`` and whose log-sum-exp is ``log_partition``."""
    cross = (reference.expected_row.double() * hidden.double()).sum(-1)  # sum_v p_v (w_v . h + b_v)
    if reference.expected_bias is not None:
        cross = cross + reference.expected_bias
    return (reference.neg_entropy - cross + log_partition).sum(-1)


def mean_and_standard_error(values: list[float]) -> tuple[float, float | None]:
    """The mean of ``values`` and its standard error (sample standard deviation over
    ``sqrt(n)``); the error is None for fewer than two values."""
    data = torch.tensor(values, dtype=torch.float64)
    if data.numel() < 2:
        return data.mean().item(), None
    return data.mean().item(), (data.std(correction=1) / data.numel() ** 0.5).item()


@torch.no_grad()
def evaluate_windows(
    model: nn.Module,
    windows: torch.Tensor,
    reference: nn.Module | ReferenceLogProbs | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """Quality and forward speed of ``model`` on ``windows`` (``(n, length)`` token ids)."""
    summary = isinstance(reference, ReferenceLogProbs)
    if summary and (not torch.equal(reference.windows, windows) or reference.batch_size != batch_size):
        raise ValueError("the cached reference was computed on other windows or batches")
    reference_model = reference.model if summary else reference
    use_summary = summary and model is not reference_model and reference.shares_head(model)
    nll, kl, agree = [], [], []  # per window: means over its positions
    forward_seconds = 0.0
    batches = windows.split(batch_size)
    for index, batch in enumerate(tqdm(batches, desc="evaluating", unit="batch", disable=not progress)):
        start = time.perf_counter()
        logits, hidden = _forward(model, batch)
        logits = logits.float().cpu()
        forward_seconds += time.perf_counter() - start
        # -log softmax(logits)[target] = logsumexp(logits) - logits[target]: no vocabulary-sized
        # copy of the window's distributions is made unless the fallback KL below needs one
        log_partition = _log_partition(logits)
        targets = batch[:, 1:].unsqueeze(-1)
        target_logits = logits[:, :-1].gather(-1, targets).squeeze(-1).double()
        nll += (log_partition[:, :-1] - target_logits).mean(-1).tolist()
        if reference is None:
            continue
        if use_summary and hidden is not None:
            ref = reference.batches[index]
            kl_window = _kl_from_summary(ref, hidden.cpu(), log_partition)
            agree_window = (ref.top1 == logits.argmax(-1)).sum(-1)
        else:
            log_probs = torch.log_softmax(logits, dim=-1)
            ref_log_probs = log_probs if reference_model is model else _log_probs(reference_model, batch)
            kl_window = torch.cat(
                [(r.exp() * (r - q)).sum(-1) for r, q in zip(ref_log_probs.split(POSITION_CHUNK, -2), log_probs.split(POSITION_CHUNK, -2))],
                dim=-1,
            ).double().sum(-1)  # a few positions at a time: no vocabulary-sized temporaries per window
            agree_window = (ref_log_probs.argmax(-1) == log_probs.argmax(-1)).sum(-1)
        kl += (kl_window / batch.shape[1]).tolist()
        agree += (agree_window.double() / batch.shape[1]).tolist()
    log_perplexity, log_perplexity_se = mean_and_standard_error(nll)
    kl_divergence, kl_divergence_se = mean_and_standard_error(kl) if kl else (None, None)
    top1, top1_se = mean_and_standard_error(agree) if agree else (None, None)
    return {
        "perplexity": math.exp(log_perplexity),
        "log_perplexity_se": log_perplexity_se,
        "kl_divergence": kl_divergence,
        "kl_divergence_se": kl_divergence_se,
        "top1_agreement": top1,
        "top1_agreement_se": top1_se,
        "tokens_per_second": windows.numel() / forward_seconds,
        "windows": int(windows.shape[0]),
        "window_length": int(windows.shape[1]),
    }
