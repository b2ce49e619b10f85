"""Errors that reach the user.

A ``LowbitError`` carries a message that says what was wrong and what to do about it.
The CLI prints it without a traceback; the Python API lets it propagate as an exception.
Anything else that escapes is a bug in lowbit and keeps its traceback.
"""

from __future__ import annotations


class LowbitError(Exception):
    """A problem with the user's input or environment, explained in plain words."""


class UnknownNameError(LowbitError, KeyError):
    """A name (format, scheme, algorithm, architecture) that lowbit does not know."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""
