"""Reports: plain-text tables for the terminal (HTML reports come later)."""

from lowbit.advisor.sizing import format_report as format_size_report
from lowbit.report.table import (
    COMPARISON_COLUMNS,
    format_measurement,
    format_notes,
    format_table,
    format_verdict,
)

__all__ = ["COMPARISON_COLUMNS", "format_measurement", "format_notes", "format_size_report", "format_table", "format_verdict"]
