"""Text from the store or the wire, made safe to print on one line."""

from __future__ import annotations

__all__ = ["printable"]


def printable(text: str) -> str:
    """Control characters (a newline, an escape sequence…) shown as escapes: a workflow name
    or a reason can neither split a line of output nor drive the terminal."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )
