"""Errors the library raises for the user: the CLI prints them as one line, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: printed as one line (no traceback), exit status 2."""


def first_line(text: str, limit: int = 500) -> str:
    """The first non-blank line of an error message (at most ``limit`` characters): for one-line reports."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[0][:limit] if lines else "(no message)"
