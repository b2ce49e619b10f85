"""Reports: plain-text tables for the terminal (HTML reports come later), and where report
files go (checked before any work, written atomically, as every output of lowbit's)."""

from lowbit.advisor.sizing import format_report as format_size_report
from lowbit.export.atomic import check_file_output as check_report_path
from lowbit.export.atomic import write_text_atomically as write_report
from lowbit.report.table import (
    COMPARISON_COLUMNS,
    format_measurement,
    format_notes,
    format_table,
    format_verdict,
)

__all__ = [
    "COMPARISON_COLUMNS", "check_report_path", "write_report", "format_measurement", "format_notes", "format_size_report", "format_table", "format_verdict",
]  # fmt: skip
