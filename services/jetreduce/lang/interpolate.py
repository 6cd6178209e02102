"""Variable interpolation (Prodigy's ``${path}`` syntax) and safe rendering into shell scripts.

Syntax, as in Prodigy's ``interpolation.rs``: ``${path}``, ``${path:-default}``, ``$NAME`` and
``$1``; paths use dots and ``[n]`` (``${item.tags[0]}``, ``${map.total}``). A reference that
does not resolve and has no default is left verbatim (Prodigy's non-strict mode), so inside
``sh -c`` the shell may still expand its own variables.

Values render as Prodigy's ``value_to_string``: strings raw, numbers and booleans as JSON text,
null as ``""``, an array of strings joined with ``", "``, other arrays and objects as compact
JSON. ``${item}`` renders a non-string item as compact JSON (whatever its shape).

Two renderers:

* :func:`render_text` pastes values into the text. For text that is never parsed by a shell:
  ``write_file`` content and paths, the ``claude`` argument (passed as one argv element).
* :func:`render_shell` never pastes a value into the script. Each resolved reference becomes a
  parameter expansion of a fresh environment variable (``JR_V0``, ``JR_V1`` …) carried in
  :attr:`ShellCommand.env`, quoted for the shell context where it stands. The shell does not
  re-parse the result of a parameter expansion, so item data such as ``$(touch x)``,
  backticks, ``; rm -rf /``, quotes or newlines is passed on as inert text. See
  :func:`render_shell` for the exact rewriting and its limits.

Errors: :class:`InterpolationError` (a ``ValueError``).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Final

import msgspec

from jetreduce.contract.errors import PermanentError

__all__ = [
    "ENV_PREFIX",
    "SPILL_THRESHOLD_BYTES",
    "InterpolationError",
    "ShellCommand",
    "Variables",
    "item_scopes",
    "render_shell",
    "render_text",
    "render_value",
]

ENV_PREFIX: Final = "JR_V"
"""Prefix of the environment variables :func:`render_shell` binds values to."""
SPILL_PREFIX: Final = "JR_F"
"""Prefix of the environment variables holding the paths of spilled values."""
SPILL_THRESHOLD_BYTES: Final = 64 * 1024
"""Values larger than this (UTF-8 bytes) go to a file when ``spill_dir`` is given."""
MAX_ENV_VALUE_BYTES: Final = 128 * 1024 - 256
"""Linux refuses any single ``NAME=value`` string over 128 KiB (MAX_ARG_STRLEN) with E2BIG."""

REFERENCE: Final = re.compile(r"\$\{([^}]+)\}|\$([A-Za-z_][A-Za-z0-9_]*|[0-9])")
"""Prodigy's reference syntax: ``${...}`` (up to the first ``}``), ``$NAME``, ``$1``."""

_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]|(\.)")
_INTEGER = re.compile(r"\s*[+-]?\d+\s*")
_COMPACT = msgspec.json.Encoder()


class InterpolationError(PermanentError, ValueError):
    """A value cannot be substituted safely (NUL byte, too large, would end a here-document…)."""


# --- values and variables --------------------------------------------------------------------


def _compact_json(value: Any) -> str:
    return _COMPACT.encode(value).decode()


def render_value(value: Any) -> str:
    """Render one JSON value the way Prodigy's ``value_to_string`` does."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ", ".join(value)
    return _compact_json(value)


def _parse_path(path: str) -> list[str | int] | None:
    """``a.b[0]`` → ``["a", "b", 0]``; None if it is not a variable path (e.g. ``x%.txt``
    is still a path of names, but ``a..b`` or ``a[x]`` are not)."""
    parts: list[str | int] = []
    pos = 0
    expect_name = True
    while pos < len(path):
        m = _PATH_PART.match(path, pos)
        if m is None:
            return None
        name, index, _dot = m.groups()
        if name is not None:
            if not expect_name:
                return None
            parts.append(name)
            expect_name = False
        elif index is not None:
            if not parts or expect_name:
                return None
            parts.append(int(index))
        else:
            if expect_name:
                return None
            expect_name = True
        pos = m.end()
    if expect_name:
        return None
    return parts


def _flat_key(parts: Sequence[str | int]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


_UNRESOLVED: Final = object()


def _walk(value: Any, parts: Sequence[str | int]) -> Any:
    for part in parts:
        if isinstance(value, Mapping):
            if isinstance(part, int) or part not in value:
                return _UNRESOLVED
            value = value[part]
        elif isinstance(value, list):
            index = part if isinstance(part, int) else int(part) if part.isdigit() else -1
            if not 0 <= index < len(value):
                return _UNRESOLVED
            value = value[index]
        else:
            return _UNRESOLVED
    return value


class Variables(Mapping[str, Any]):
    """Named values that templates may reference, looked up by dotted path.

    ``scopes`` maps top-level names to JSON values: ``{"item": {...}, "item_id": "item_3",
    "map.total": 7, "HOME_DIR": "/x"}``. A path is resolved by trying the **longest flat key
    first** (so the flat key ``"map.total"`` wins over ``map`` → ``total``), then walking the
    rest of the path through nested objects and arrays. ``v["item.tags[0]"]`` returns the value
    or raises ``KeyError``; iteration lists the top-level names.

    ``json_roots`` names variables that, referenced whole, render a non-string value as compact
    JSON instead of Prodigy's generic rendering (``${item}`` of ``["a","b"]`` is ``["a","b"]``,
    not ``a, b``).
    """

    def __init__(
        self, scopes: Mapping[str, Any], *, json_roots: Collection[str] = ("item",)
    ) -> None:
        self._scopes = dict(scopes)
        self._json_roots = frozenset(json_roots)

    def with_scopes(self, more: Mapping[str, Any]) -> Variables:
        """A copy with ``more`` added (overriding names already present)."""
        return Variables({**self._scopes, **more}, json_roots=self._json_roots)

    def resolve(self, path: str) -> Any:
        """The value at ``path``, or raise ``KeyError``."""
        if path in self._scopes:
            return self._scopes[path]
        parts = _parse_path(path)
        if parts is None:
            raise KeyError(path)
        for cut in range(len(parts), 0, -1):
            key = _flat_key(parts[:cut])
            if key in self._scopes:
                value = _walk(self._scopes[key], parts[cut:])
                if value is not _UNRESOLVED:
                    return value
        raise KeyError(path)

    def render(self, path: str) -> str | None:
        """The rendered text of ``path``, or None if it does not resolve."""
        try:
            value = self.resolve(path)
        except KeyError:
            return None
        if path in self._json_roots and not isinstance(value, str):
            return _compact_json(value)
        return render_value(value)

    def __getitem__(self, path: str) -> Any:
        return self.resolve(path)

    def __contains__(self, path: object) -> bool:
        if not isinstance(path, str):
            return False
        try:
            self.resolve(path)
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self._scopes)

    def __len__(self) -> int:
        return len(self._scopes)


def item_scopes(item: Any, index: int) -> dict[str, Any]:
    """The map-phase variables of one item: ``item``, ``item_id`` (``item_<index>``, 0-based
    after the pipeline, as Prodigy), ``item_json`` (compact JSON) and ``item_index``."""
    return {
        "item": item,
        "item_id": f"item_{index}",
        "item_json": _compact_json(item),
        "item_index": index,
    }


def _split_reference(m: re.Match[str]) -> tuple[str, str | None]:
    """(path, default) of a REFERENCE match; default is None without ``:-``."""
    braced, bare = m.group(1), m.group(2)
    if braced is None:
        return bare, None
    path, sep, default = braced.partition(":-")
    return path, (default if sep else None)


def _resolve_reference(m: re.Match[str], variables: Variables) -> str | None:
    path, default = _split_reference(m)
    value = variables.render(path)
    return default if value is None else value


def render_text(template: str, variables: Variables) -> str:
    """Substitute every reference by its rendered value (no quoting; not for shells)."""

    def sub(m: re.Match[str]) -> str:
        value = _resolve_reference(m, variables)
        return m.group(0) if value is None else value

    return REFERENCE.sub(sub, template)


# --- shell rendering -------------------------------------------------------------------------


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
        value = _resolve_reference(m, self.vars)
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
            value = _resolve_reference(m, self.vars)
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
