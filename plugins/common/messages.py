"""Wording of the built-in plugins' error messages."""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """An exception's message with its whitespace runs (newlines included) collapsed: errors
    reach the user as one line."""
    return " ".join(str(exc).split())
