"""Plain-text tables for the terminal: the comparison table, what each column means, and the verdict."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

Column = tuple[str, str, Callable[[dict], str]]  # header, key, row -> cell


def _fmt(key: str, spec: str) -> Callable[[dict], str]:
    return lambda row: "-" if row.get(key) is None else format(row[key], spec)


def _perplexity(row: dict) -> str:
    value, se = row.get("perplexity"), row.get("log_perplexity_se")
    if value is None:
        return "-"
    # the standard error of log(perplexity) is the perplexity's relative standard error
    return f"{value:.3f}" + ("" if se is None else f" ±{value * (math.exp(se) - 1):.3f}")


def _kl(row: dict) -> str:
    value, se = row.get("kl_divergence"), row.get("kl_divergence_se")
    if value is None:
        return "-"
    return f"{value:.5f}" + ("" if se is None or value == 0 else f" ±{se:.5f}")


def _top1(row: dict) -> str:
    value, se = row.get("top1_agreement"), row.get("top1_agreement_se")
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" + ("" if se is None or value == 1 else f" ±{100 * se:.2f}")


COMPARISON_COLUMNS: list[Column] = [
    ("scheme", "scheme", lambda row: str(row.get("scheme"))),
    ("bits/weight", "bits_per_weight", _fmt("bits_per_weight", ".3f")),
    ("size MB", "weight_bytes", lambda row: "-" if row.get("weight_bytes") is None else f"{row['weight_bytes'] / 1e6:.1f}"),
    ("perplexity", "perplexity", _perplexity),
    ("KL", "kl_divergence", _kl),
    ("top-1", "top1_agreement", _top1),
    ("quant s", "quantization_seconds", _fmt("quantization_seconds", ".2f")),
    ("tok/s", "tokens_per_second", _fmt("tokens_per_second", ".0f")),
]

#: one line per column, printed under the table (``{windows}``: how many windows were measured)
COLUMN_NOTES: dict[str, str] = {
    "bits_per_weight": "bits/weight: bits per weight of the decoder's linear layers (what a scheme quantizes), scales and zeros included; the same figure in compare, eval and quantize",
    "weight_bytes": "size MB: every weight of the model as stored (embeddings, norms and lm_head kept unquantized); 1 MB = 10^6 bytes",
    "perplexity": "perplexity: exp of the mean next-token loss on the text; lower is better; read it against the reference row",
    "kl_divergence": "KL: how far the next-token distribution drifts from the reference's, in nats, averaged over every position; 0 = identical, < 0.02 near-lossless, < 0.1 good",
    "top1_agreement": "top-1: share of positions where the most likely next token is the reference's",
    "quantization_seconds": "quant s: seconds to quantize",
    "tokens_per_second": "tok/s: tokens per second of the evaluation forward passes",
}
UNCERTAINTY_NOTE = "±: one standard error across the {windows} windows: how much the number would move on other text like it"


def format_table(rows: Sequence[dict], columns: Sequence[Column] = COMPARISON_COLUMNS) -> str:
    cells = [[header for header, _, _ in columns]]
    cells += [[cell(row) for _, _, cell in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = []
    for number, line in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if number == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_notes(columns: Sequence[Column], windows: int) -> str:
    """What each column of the table means, one line each, and what ± is."""
    lines = [COLUMN_NOTES[key] for _, key, _ in columns if key in COLUMN_NOTES]
    return "\n".join([*lines, UNCERTAINTY_NOTE.format(windows=windows)])


def format_verdict(result: dict) -> str:
    """The answer under a comparison: per budget the smallest scheme meeting it, then what next."""
    rows = {row["scheme"]: row for row in result["rows"]}
    lines = ["verdict (a scheme meets a budget when its KL plus 2 standard errors is below it):"]
    for name, budget in result["verdict"]["budgets"].items():
        scheme = budget["scheme"]
        if scheme is None:
            text = "no scheme measured"
        else:
            row = rows[scheme]
            text = f"{scheme} ({row['bits_per_weight']:.3f} bits/weight, {row['weight_bytes'] / 1e6:.1f} MB)"
        if budget["borderline"]:
            text += f"; borderline, smaller: {', '.join(budget['borderline'])}"
        lines.append(f"  {name} (KL < {budget['max_kl']:g}): {text}")
    lines += [f"next: {step}" for step in result["verdict"]["next"]]
    return "\n".join(lines)


def format_measurement(result: dict) -> str:
    """The line saying what was measured against what."""
    bos = "with BOS" if result.get("bos") else "no BOS"
    keep = f"; kept tensors in {result['keep_dtype']}" if result.get("keep_dtype") else ""
    return (
        f"{result['model']}: {result['windows']} windows of {result['window_length']} tokens from {result['data']} ({bos})"
        f"\nreference: {result['reference']}{keep}"
    )
