"""Reports: plain-text tables for the terminal (HTML reports come later)."""

from lowbit.report.table import format_table

__all__ = ["format_table"]
