"""lowbit: make large language models small, and prove what it cost."""

__version__ = "0.1.0"
