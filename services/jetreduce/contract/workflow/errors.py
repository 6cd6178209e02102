"""What the workflow parser reports when a file is wrong.

Tree::

    ValueError
     └── WorkflowInvalid      the file cannot be run; carries every error found

A `Problem` is one finding (error or warning) with the dotted path of the offending field and
the 1-based line/column of the YAML node, so the CLI can print ``file:line:col`` like a compiler.
The parser collects all problems before raising, because fixing a workflow one error per run is
slow and the file is usually edited by hand.

`WorkflowInvalid` derives from `ValueError` so callers that only know "bad input" can catch it
without importing this module.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from jetreduce.contract.errors import PermanentError

__all__ = ["ERROR", "WARNING", "Problem", "WorkflowInvalid"]

ERROR = "error"
"""Severity of a problem that makes the workflow unusable."""

WARNING = "warning"
"""Severity of a problem that is reported but does not stop the workflow (e.g. an unknown key)."""


class Problem(msgspec.Struct, frozen=True):
    """One finding about a workflow file.

    ``path`` is the dotted location of the field (``map.max_parallel``,
    ``map.agent_template[1]``); it is ``""`` for problems about the whole document, such as a
    YAML syntax error. ``line`` and ``column`` are 1-based and point at the offending key or
    value; they are None only when no position is known.
    """

    path: str
    message: str
    line: int | None = None
    column: int | None = None
    severity: str = ERROR

    def render(self, source: str = "<workflow>") -> str:
        """Format as ``source:line:col: path: message`` (position and path left out if unknown)."""
        where = source
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        label = f"{self.path}: " if self.path else ""
        prefix = "warning: " if self.severity == WARNING else ""
        return f"{where}: {prefix}{label}{self.message}"


class WorkflowInvalid(PermanentError, ValueError):
    """The workflow file cannot be used. ``problems`` lists every error found, in file order.

    ``warnings`` holds the non-fatal findings of the same parse, so a caller that prints the
    errors can print those too. ``str()`` renders one problem per line, prefixed by ``source``.
    """

    def __init__(
        self,
        problems: Iterable[Problem],
        *,
        warnings: Iterable[Problem] = (),
        source: str = "<workflow>",
    ) -> None:
        self.problems: list[Problem] = list(problems)
        self.warnings: list[Problem] = list(warnings)
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        head = f"{self.source}: invalid workflow ({count} {noun})"
        lines = [head, *(f"  {p.render(self.source)}" for p in self.problems)]
        return "\n".join(lines)

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only arguments are not replayed by the default pickling of exceptions;
        # pickling matters because errors may cross process boundaries in the launcher.
        return (_rebuild, (self.problems, self.warnings, self.source))


def _rebuild(problems: list[Problem], warnings: list[Problem], source: str) -> WorkflowInvalid:
    return WorkflowInvalid(problems, warnings=warnings, source=source)
