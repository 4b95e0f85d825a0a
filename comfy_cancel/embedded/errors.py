"""The one error of the embedded stack, raised by each of its parts."""

from __future__ import annotations


class StackError(Exception):
    """The embedded stack could not start, or a part of it stopped; the message says what
    to do next."""
