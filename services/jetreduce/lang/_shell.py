"""Shell rendering: ``${path}`` references in a ``shell:`` step become environment variables.

The half of :mod:`jetreduce.lang.interpolate` that knows the shell: a small lexer that tracks
the quoting context of every reference so that no value is ever pasted where ``sh`` would
parse it (see :func:`render_shell`). What a reference resolves to is :mod:`._variables`'.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Final

from jetreduce.contract.errors import PermanentError
from jetreduce.lang._variables import REFERENCE, Variables, resolve_reference

__all__ = [
    "ENV_PREFIX",
    "SPILL_THRESHOLD_BYTES",
    "InterpolationError",
    "ShellCommand",
    "render_shell",
]

ENV_PREFIX: Final = "JR_V"
"""Prefix of the environment variables :func:`render_shell` binds values to."""
SPILL_PREFIX: Final = "JR_F"
"""Prefix of the environment variables holding the paths of spilled values."""
SPILL_THRESHOLD_BYTES: Final = 64 * 1024
"""Values larger than this (UTF-8 bytes) go to a file when ``spill_dir`` is given."""
MAX_ENV_VALUE_BYTES: Final = 128 * 1024 - 256
"""Linux refuses any single ``NAME=value`` string over 128 KiB (MAX_ARG_STRLEN) with E2BIG."""

_INTEGER = re.compile(r"\s*[+-]?\d+\s*")


class InterpolationError(PermanentError, ValueError):
    """A value cannot be substituted safely (NUL byte, too large, would end a here-document…)."""


@dataclass(frozen=True, slots=True)
class ShellCommand:
    """A rendered shell step: run ``argv`` with ``env`` added to the process environment.

    ``spill_files`` are the files written for oversized values; the caller owns ``spill_dir``
    and removes them after the step.
    """

    script: str
    env: dict[str, str] = field(default_factory=dict)
    spill_files: tuple[Path, ...] = ()

    @property
    def argv(self) -> list[str]:
        return ["sh", "-c", self.script]


class _Ctx(Enum):
    """Where in the shell grammar a character of the template stands."""

    TOP = "top"  # unquoted, top level
    CMDSUB = "cmdsub"  # unquoted, inside $( ... )
    BACKTICK = "backtick"  # unquoted, inside ` ... `
    DQUOTE = "dquote"
    SQUOTE = "squote"
    ARITH = "arith"  # inside $(( ... ))
    HEREDOC = "heredoc"  # body of <<EOF (expansions happen)
    HEREDOC_QUOTED = "heredoc_quoted"  # body of <<'EOF' (nothing happens)


_UNQUOTED: Final = frozenset({_Ctx.TOP, _Ctx.CMDSUB, _Ctx.BACKTICK})
_WORD_BREAK: Final = frozenset(" \t\n;&|()<>`")
_SPECIAL_PARAMS: Final = frozenset("$?#@*!-")


@dataclass(slots=True)
class _Frame:
    ctx: _Ctx
    depth: int = 0  # open parentheses (CMDSUB, ARITH)
    delimiter: str = ""  # HEREDOC*
    strip_tabs: bool = False  # HEREDOC* opened by <<-
    # BACKTICK opened inside "…": there \" delimits a nested double-quoted string.
    # DQUOTE opened by such a \": it closes at the next \".
    escaped_quotes: bool = False


@dataclass(frozen=True, slots=True)
class _PendingHeredoc:
    delimiter: str
    strip_tabs: bool
    quoted: bool


class _ShellRenderer:
    """One pass over the template with a stack of quoting contexts (see :func:`render_shell`)."""

    def __init__(self, template: str, variables: Variables, spill_dir: Path | None) -> None:
        self.t = template
        self.vars = variables
        self.spill_dir = spill_dir
        self.out: list[str] = []
        self.env: dict[str, str] = {}
        self.bound: dict[str, str] = {}  # rendered value → its expansion text
        self.spills: list[Path] = []
        self.n_values = 0
        self.stack: list[_Frame] = [_Frame(_Ctx.TOP)]
        self.pending: list[_PendingHeredoc] = []

    # -- values --

    def _bind(self, value: str) -> str:
        """Expansion text (``${JR_V0}`` or ``$(cat "${JR_F0}")``) that yields ``value``."""
        if value in self.bound:
            return self.bound[value]
        size = len(value.encode("utf-8", "surrogateescape"))
        if size > SPILL_THRESHOLD_BYTES and self.spill_dir is not None:
            name = f"{SPILL_PREFIX}{len(self.spills)}"
            fd, raw_path = tempfile.mkstemp(prefix="jr-spill-", suffix=".txt", dir=self.spill_dir)
            with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
                f.write(value)
            path = Path(raw_path)
            self.spills.append(path)
            self.env[name] = str(path)
            text = f'$(cat "${{{name}}}")'
        else:
            if size > MAX_ENV_VALUE_BYTES:
                raise InterpolationError(
                    f"value of {size} bytes is too large for an environment variable; "
                    "pass spill_dir to render_shell"
                )
            name = f"{ENV_PREFIX}{self.n_values}"
            self.n_values += 1
            self.env[name] = value
            text = f"${{{name}}}"
        self.bound[value] = text
        return text

    def _reference(self, m: re.Match[str], ctx: _Ctx) -> None:
        value = resolve_reference(m, self.vars)
        if value is None:
            self.out.append(m.group(0))
            return
        if "\0" in value:
            raise InterpolationError(f"value of {m.group(0)} contains a NUL byte")
        if ctx is _Ctx.ARITH and not _INTEGER.fullmatch(value):
            # The shell evaluates expanded text inside $(( )) as an expression (bash even runs
            # command substitutions hidden in array subscripts), so only plain integers go in.
            raise InterpolationError(f"{m.group(0)} inside $(( )) is not an integer: {value!r}")
        expansion = self._bind(value)
        if ctx in _UNQUOTED:
            self.out.append(f'"{expansion}"')
        elif ctx is _Ctx.SQUOTE:
            self.out.append(f"'\"{expansion}\"'")
        else:  # DQUOTE, HEREDOC, ARITH: expansions happen, no field splitting or globbing
            self.out.append(expansion)

    # -- scanning --

    def run(self) -> ShellCommand:
        i = 0
        while i < len(self.t):
            frame = self.stack[-1]
            if frame.ctx in _UNQUOTED:
                i = self._unquoted(i, frame)
            elif frame.ctx is _Ctx.DQUOTE:
                i = self._dquote(i, frame)
            elif frame.ctx is _Ctx.SQUOTE:
                i = self._squote(i)
            elif frame.ctx is _Ctx.ARITH:
                i = self._arith(i, frame)
            elif frame.ctx is _Ctx.HEREDOC:
                i = self._heredoc(i, frame)
            else:
                i = self._heredoc_quoted(i, frame)
        return ShellCommand("".join(self.out), self.env, tuple(self.spills))

    def _copy(self, i: int, n: int = 1) -> int:
        self.out.append(self.t[i : i + n])
        return i + n

    def _dollar(self, i: int, ctx: _Ctx) -> int:
        t = self.t
        if t.startswith("$((", i):
            self.stack.append(_Frame(_Ctx.ARITH))
            return self._copy(i, 3)
        if t.startswith("$(", i):
            self.stack.append(_Frame(_Ctx.CMDSUB))
            return self._copy(i, 2)
        if i + 1 < len(t) and t[i + 1] in _SPECIAL_PARAMS:
            return self._copy(i, 2)  # $$, $?, $# …: the shell's, never ours
        m = REFERENCE.match(t, i)
        if m is None:
            return self._copy(i)
        self._reference(m, ctx)
        return m.end()

    def _unquoted(self, i: int, frame: _Frame) -> int:
        t, c = self.t, self.t[i]
        if c == "'":
            self.stack.append(_Frame(_Ctx.SQUOTE))
            return self._copy(i)
        if c == '"':
            self.stack.append(_Frame(_Ctx.DQUOTE))
            return self._copy(i)
        if c == "\\" and frame.escaped_quotes and t.startswith('\\"', i):
            self.stack.append(_Frame(_Ctx.DQUOTE, escaped_quotes=True))
            return self._copy(i, 2)
        if c == "\\":
            return self._copy(i, 2)
        if c == "`":
            if frame.ctx is _Ctx.BACKTICK:
                self.stack.pop()
            else:
                self.stack.append(_Frame(_Ctx.BACKTICK))
            return self._copy(i)
        if c == "$":
            return self._dollar(i, frame.ctx)
        if c == "#" and (i == 0 or t[i - 1] in _WORD_BREAK):
            end = t.find("\n", i)
            end = len(t) if end < 0 else end
            return self._copy(i, end - i)  # a comment: references in it stay as written
        if c == "<" and t.startswith("<<", i) and not t.startswith("<<<", i):
            return self._heredoc_operator(i)
        if frame.ctx is _Ctx.CMDSUB and c == "(":
            frame.depth += 1
        elif frame.ctx is _Ctx.CMDSUB and c == ")":
            if frame.depth == 0:
                self.stack.pop()
            else:
                frame.depth -= 1
        elif c == "\n" and self.pending:
            self._copy(i)
            self._start_heredoc()
            return i + 1
        return self._copy(i)

    def _heredoc_operator(self, i: int) -> int:
        """Copy ``<<[-] WORD`` and queue its body, which starts after the next newline."""
        t = self.t
        j = i + 2
        strip_tabs = t.startswith("-", j)
        if strip_tabs:
            j += 1
        while j < len(t) and t[j] in " \t":
            j += 1
        word: list[str] = []
        quoted = False
        while j < len(t) and t[j] not in " \t\n;&|()<>":
            c = t[j]
            if c in "'\"":
                end = t.find(c, j + 1)
                end = len(t) if end < 0 else end
                word.append(t[j + 1 : end])
                quoted = True
                j = end + 1
            elif c == "\\":
                word.append(t[j + 1 : j + 2])
                quoted = True
                j += 2
            else:
                word.append(c)
                j += 1
        j = min(j, len(t))
        delimiter = "".join(word)
        if delimiter:
            self.pending.append(_PendingHeredoc(delimiter, strip_tabs, quoted))
        return self._copy(i, j - i)

    def _start_heredoc(self) -> None:
        doc = self.pending.pop(0)
        ctx = _Ctx.HEREDOC_QUOTED if doc.quoted else _Ctx.HEREDOC
        self.stack.append(_Frame(ctx, delimiter=doc.delimiter, strip_tabs=doc.strip_tabs))

    def _line(self, i: int) -> tuple[str, int]:
        """The template line starting at ``i`` (without newline) and the index after it."""
        end = self.t.find("\n", i)
        return (self.t[i:], len(self.t)) if end < 0 else (self.t[i:end], end + 1)

    def _ends_heredoc(self, line: str, frame: _Frame) -> bool:
        return (line.lstrip("\t") if frame.strip_tabs else line) == frame.delimiter

    def _close_heredoc(self, i: int, line_end: int) -> int:
        self._copy(i, line_end - i)
        self.stack.pop()
        if self.pending:
            self._start_heredoc()
        return line_end

    def _heredoc(self, i: int, frame: _Frame) -> int:
        t, c = self.t, self.t[i]
        if i == 0 or t[i - 1] == "\n":
            line, line_end = self._line(i)
            if self._ends_heredoc(line, frame):
                return self._close_heredoc(i, line_end)
        if c == "\\":
            return self._copy(i, 2)
        if c == "`":
            self.stack.append(_Frame(_Ctx.BACKTICK))
            return self._copy(i)
        if c == "$":
            return self._dollar(i, _Ctx.HEREDOC)
        return self._copy(i)

    def _heredoc_quoted(self, i: int, frame: _Frame) -> int:
        """A whole body line: values pasted raw (the shell expands nothing here)."""
        line, line_end = self._line(i)
        if self._ends_heredoc(line, frame):
            return self._close_heredoc(i, line_end)
        pieces: list[str] = []
        pos = 0
        for m in REFERENCE.finditer(line):
            value = resolve_reference(m, self.vars)
            pieces.append(line[pos : m.start()])
            if value is None:
                pieces.append(m.group(0))
            elif "\0" in value:
                raise InterpolationError(f"value of {m.group(0)} contains a NUL byte")
            else:
                pieces.append(value)
            pos = m.end()
        pieces.append(line[pos:])
        rendered = "".join(pieces)
        if any(self._ends_heredoc(part, frame) for part in rendered.split("\n")):
            raise InterpolationError(
                f"a value would end the quoted here-document early "
                f"(it contains the line {frame.delimiter!r})"
            )
        self.out.append(rendered + self.t[i + len(line) : line_end])
        return line_end

    def _dquote(self, i: int, frame: _Frame) -> int:
        c = self.t[i]
        if c == '"' or (frame.escaped_quotes and self.t.startswith('\\"', i)):
            self.stack.pop()
            return self._copy(i, 1 if c == '"' else 2)
        if c == "\\":
            return self._copy(i, 2)
        if c == "`":
            self.stack.append(_Frame(_Ctx.BACKTICK, escaped_quotes=not frame.escaped_quotes))
            return self._copy(i)
        if c == "$":
            return self._dollar(i, _Ctx.DQUOTE)
        return self._copy(i)

    def _squote(self, i: int) -> int:
        c = self.t[i]
        if c == "'":
            self.stack.pop()
            return self._copy(i)
        if c == "$":
            m = REFERENCE.match(self.t, i)
            if m is not None:
                # Prodigy substitutes inside single quotes too ('${item}' in its examples).
                self._reference(m, _Ctx.SQUOTE)
                return m.end()
        return self._copy(i)

    def _arith(self, i: int, frame: _Frame) -> int:
        c = self.t[i]
        if c == "(":
            frame.depth += 1
        elif c == ")":
            if frame.depth == 0:
                self.stack.pop()
                closing = 2 if self.t.startswith("))", i) else 1
                return self._copy(i, closing)
            frame.depth -= 1
        elif c == "\\":
            return self._copy(i, 2)
        elif c == "$":
            return self._dollar(i, _Ctx.ARITH)
        return self._copy(i)


def render_shell(
    template: str, variables: Variables, *, spill_dir: Path | None = None
) -> ShellCommand:
    """Render a ``shell:`` step so that no value can ever be executed by ``sh``.

    Each resolved reference is replaced by an expansion of an environment variable bound to
    its rendered value (equal values share one variable), written for the quoting context it
    stands in, which a small lexer tracks (quotes, backslashes, ``$( )``, backticks,
    ``$(( ))``, comments, here-documents):

    ========================  ==========================================================
    context                   replacement
    ========================  ==========================================================
    unquoted                  ``"${JR_V0}"`` (one word: no field splitting, no globbing)
    ``"…"``                   ``${JR_V0}``
    ``'…'``                   ``'"${JR_V0}"'`` (close, double-quoted expansion, reopen)
    ``<<EOF`` body            ``${JR_V0}``
    ``<<'EOF'`` body          the raw value (nothing expands there); InterpolationError if
                              a value line equals the delimiter
    ``$(( … ))``              ``${JR_V0}``, and the value must be an integer
    ``# comment``             left as written
    ========================  ==========================================================

    ``$(...)`` and backticks open a fresh unquoted context, also inside double quotes. A
    backslash-escaped ``\\$`` is not a reference. Unresolved references stay verbatim.

    Values over :data:`SPILL_THRESHOLD_BYTES` (e.g. ``${map.results}``) are written to a file
    in ``spill_dir`` when given and expanded as ``$(cat "${JR_F0}")`` (the path itself also
    travels in the env), which keeps argv/env under the kernel's per-string limit; as with any
    command substitution, trailing newlines of a spilled value are dropped. Without
    ``spill_dir``, values up to :data:`MAX_ENV_VALUE_BYTES` still go in the env and larger
    ones raise. Values with NUL bytes raise (the env cannot carry them).

    Limits, by design: an unquoted reference is always one word (Prodigy's
    ``for f in ${item.files}`` no longer splits); this protects ``sh`` only, so a program
    that itself interprets its argument (``eval``, ``python -c '${item}'``, ``awk``) still
    sees the value as code; the lexer does not track ``case`` patterns inside ``$( )``.
    """
    return _ShellRenderer(template, variables, spill_dir).run()
