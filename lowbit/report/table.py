"""A small fixed-width table printer for comparison results."""

from __future__ import annotations

from typing import Callable, Sequence

Column = tuple[str, str, Callable[[object], str]]  # header, key, formatter


def _fmt(spec: str) -> Callable[[object], str]:
    return lambda value: "-" if value is None else format(value, spec)


COMPARISON_COLUMNS: list[Column] = [
    ("scheme", "scheme", str),
    ("bits/weight", "bits_per_weight", _fmt(".3f")),
    ("size MB", "weight_bytes", lambda v: "-" if v is None else f"{v / 1e6:.1f}"),
    ("perplexity", "perplexity", _fmt(".3f")),
    ("KL", "kl_divergence", _fmt(".5f")),
    ("top-1", "top1_agreement", lambda v: "-" if v is None else f"{100 * v:.2f}%"),
    ("quant s", "quantization_seconds", _fmt(".2f")),
    ("tok/s", "tokens_per_second", _fmt(".0f")),
]


def format_table(rows: Sequence[dict], columns: Sequence[Column] = COMPARISON_COLUMNS) -> str:
    cells = [[header for header, _, _ in columns]]
    cells += [[fmt(row.get(key)) for _, key, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = []
    for number, line in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if number == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
