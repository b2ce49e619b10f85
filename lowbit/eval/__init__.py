"""Evaluation: what quantization cost (perplexity, KL, top-1) and what it saved (bytes, speed)."""

from lowbit.eval.memory import bits_per_weight, weight_bytes
from lowbit.eval.quality import ReferenceLogProbs, evaluate_windows, reference_log_probs

__all__ = ["bits_per_weight", "weight_bytes", "ReferenceLogProbs", "evaluate_windows", "reference_log_probs"]
