"""Errors the library raises for the user: the CLI prints them as one line, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: printed as one line (no traceback), exit status 2."""
