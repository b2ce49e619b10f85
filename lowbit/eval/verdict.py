"""From measured rows to an answer: which scheme to use, and what to try next.

A quality budget is a bound on the KL divergence from the unquantized model (the mean over
every position, in nats). The defaults name two levels:

- ``near-lossless``: KL < 0.02 (on SmolLM2-135M, int8 gives 0.003 and fp8 0.018: perplexity
  within 2 %, top-1 agreement above 92 %);
- ``good``: KL < 0.1 (a visible but small loss; plain 4-bit RTN on SmolLM2 gives 0.23-0.34).

A scheme *meets* a budget when its KL plus twice its standard error across windows is below
the budget, so the answer does not flip on other text of the same kind; one whose KL alone is
below but whose margin is not is reported as ``borderline``.

The ladder is the no-fuss recipe: INT8 first (if even INT8 misses the budget, no lower width
will meet it), then INT4 with plain round-to-nearest, then INT4 with each calibrated method
lowbit has (the clipping search, then every other registered method such as GPTQ), and past
the last rung: a bigger model at lower bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lowbit.algorithms import method_names

#: the default quality budgets: name -> largest KL divergence (nats per position)
QUALITY_BUDGETS: dict[str, float] = {"near-lossless": 0.02, "good": 0.1}
#: standard errors of margin a scheme needs below a budget to meet it
MARGIN_STANDARD_ERRORS = 2.0
#: the 8-bit rung and the 4-bit format the later rungs use
EIGHT_BIT_SCHEME = "int8"
FOUR_BIT_FORMAT = "int4-g128"
#: what to do when no rung meets the budget
BIGGER_MODEL_ADVICE = (
    "a bigger model at lower bits: a model with twice the parameters at 4 bits takes about the memory "
    "of this one at 8 bits, and usually writes better text"
)


@dataclass(frozen=True)
class Rung:
    """One step of the ladder: a scheme, optionally with a method (``None``: the scheme's own)."""

    scheme: str
    method: str | None = None

    @property
    def label(self) -> str:
        return self.scheme if self.method is None else f"{self.scheme} ({self.method})"

    @property
    def calibrated(self) -> bool:
        return self.method is not None or self.scheme.endswith("+clip")

    def options(self) -> str:
        """The ``lowbit quantize`` options that make this rung."""
        return f"--scheme {self.scheme}" + ("" if self.method is None else f" --method {self.method}")


def ladder(methods: Sequence[str] | None = None) -> list[Rung]:
    """The recipe's rungs in order: int8, int4-g128, then int4-g128 with each calibrated
    method that exists (``+clip``, then every registered weight-only method other than RTN)."""
    methods = method_names(weight_only=True) if methods is None else list(methods)
    rungs = [Rung(EIGHT_BIT_SCHEME), Rung(FOUR_BIT_FORMAT), Rung(f"{FOUR_BIT_FORMAT}+clip")]
    rungs += [Rung(FOUR_BIT_FORMAT, name) for name in methods if name != "rtn"]
    return rungs


def upper_kl(row: dict) -> float | None:
    """The row's KL plus its margin (``MARGIN_STANDARD_ERRORS`` standard errors)."""
    kl = row.get("kl_divergence")
    if kl is None:
        return None
    return kl + MARGIN_STANDARD_ERRORS * (row.get("kl_divergence_se") or 0.0)


def meets(row: dict, max_kl: float) -> bool:
    """Whether the row's KL is below ``max_kl`` with its margin."""
    upper = upper_kl(row)
    return upper is not None and upper < max_kl


def smallest_within(rows: Sequence[dict], max_kl: float) -> tuple[dict | None, list[dict]]:
    """``(the smallest row meeting max_kl, smaller rows that are borderline)``; sizes are the
    rows' ``weight_bytes``."""
    by_size = sorted(rows, key=lambda row: row["weight_bytes"])
    best = next((row for row in by_size if meets(row, max_kl)), None)
    limit = best["weight_bytes"] if best is not None else float("inf")
    borderline = [
        row for row in by_size
        if row["weight_bytes"] < limit and row.get("kl_divergence") is not None and row["kl_divergence"] < max_kl
    ]  # fmt: skip
    return best, borderline


def verdict(rows: Sequence[dict], budgets: dict[str, float] | None = None, methods: Sequence[str] | None = None) -> dict:
    """The answer to a comparison: per budget the smallest scheme meeting it, and next steps.

    ``rows`` are measured schemes (not the reference) with ``scheme``, ``weight_bytes``,
    ``bits_per_weight``, ``kl_divergence`` and ``kl_divergence_se``. Returns ``budgets``
    (name -> ``{max_kl, scheme, borderline}``) and ``next`` (sentences, in the recipe's order).
    """
    budgets = QUALITY_BUDGETS if budgets is None else budgets
    answer = {}
    for name, max_kl in budgets.items():
        best, borderline = smallest_within(rows, max_kl)
        answer[name] = {
            "max_kl": max_kl,
            "scheme": None if best is None else best["scheme"],
            "borderline": [row["scheme"] for row in borderline],
        }
    return {"budgets": answer, "next": next_steps(rows, max(budgets.values()), methods)}


def next_steps(rows: Sequence[dict], max_kl: float, methods: Sequence[str] | None = None) -> list[str]:
    """What to try next for the loosest budget ``max_kl``, following the ladder."""
    measured = {row["scheme"]: row for row in rows}
    four_bit = [row for row in rows if row["bits_per_weight"] < 6]
    if EIGHT_BIT_SCHEME not in measured and not any(6 <= row["bits_per_weight"] < 9 for row in rows):
        return [f"measure {EIGHT_BIT_SCHEME} first: it is the safe first step of the recipe"]
    eight = [row for row in rows if 6 <= row["bits_per_weight"] < 9]
    if eight and not any(meets(row, max_kl) for row in eight):
        return [f"even 8 bits misses KL {max_kl:g} here: keep 16-bit weights (bf16), or {BIGGER_MODEL_ADVICE}"]
    if any(meets(row, max_kl) for row in four_bit):
        return [f"a 4-bit scheme meets KL {max_kl:g}: check it on your own text with `lowbit recipe MODEL --max-kl {max_kl:g} --data FILE`"]
    untried = [rung for rung in ladder(methods)[1:] if rung.label not in measured]
    if untried:
        names = ", ".join(f"`{rung.options()}`" for rung in untried)
        return [f"no 4-bit scheme meets KL {max_kl:g} yet: try {names} (calibrated methods cut the 4-bit error)"]
    return [f"no 4-bit scheme meets KL {max_kl:g} even calibrated: stay at 8 bits, or {BIGGER_MODEL_ADVICE}"]
