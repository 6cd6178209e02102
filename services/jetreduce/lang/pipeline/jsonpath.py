"""JSON paths: the ``json_path`` selection language and the field paths of filter/sort/distinct.

Two languages live here because both walk plain JSON values (``dict``/``list``/scalars, as
decoded by msgspec) and every other pipeline module needs one of them:

* **Field paths** (``a.b[0].c``, optionally ``@.a``): one value relative to an item, or
  :data:`MISSING`. Used by ``filter``, ``sort_by`` and ``distinct``.
* **Selection paths** (``map.json_path``): the JSONPath subset Prodigy supports, ``$``,
  ``.field``, ``['field']``, ``[n]``, ``[*]``, ``..field``, ``[?(expr)]``. A path yields a
  list of values; each becomes one work item.

Also holds :class:`PipelineError`, the one error type of the item pipeline (it subclasses
``ValueError`` so callers may catch it either way).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from jetreduce.contract.errors import PermanentError

__all__ = [
    "MISSING",
    "PipelineError",
    "compile_json_path",
    "lookup",
    "parse_field_path",
    "select",
    "validate_json_path",
]


class PipelineError(PermanentError, ValueError):
    """A pipeline expression (json_path, filter, sort_by, …) or its input is invalid.

    ``position`` is the 0-based character offset in ``expression`` where the problem was
    found, when there is one; the message already includes it.
    """

    def __init__(
        self, message: str, *, expression: str | None = None, position: int | None = None
    ) -> None:
        self.expression = expression
        self.position = position
        text = message
        if position is not None:
            text = f"{text} at position {position}"
        if expression is not None:
            text = f"{text} in {expression!r}"
        super().__init__(text)


class _Missing:
    """Sentinel type: the path does not exist in the value (distinct from JSON null)."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Final = _Missing()
"""Returned by :func:`lookup` when a path does not resolve. Not the same as ``None`` (null)."""

FieldPath = tuple[str | int, ...]

_FIELD_SEGMENT = re.compile(r"([^.\[\]]+)|\[(\d+)\]|(\.)")


def parse_field_path(path: str) -> FieldPath:
    """Parse ``a.b[0].c`` into ``("a", "b", 0, "c")``.

    A leading ``@`` segment (JSONPath's "current item", as in ``@.score``) is dropped, so the
    same parser serves ``[?(@.score > 5)]`` and plain filters. ``""`` and ``"@"`` mean the
    item itself. There is deliberately **no** special ``item.`` prefix: Prodigy's filter
    resolves paths relative to the item, so ``item.score`` looks for a field named ``item``.
    """
    parts: list[str | int] = []
    pos = 0
    expect_name = True  # after a dot (or at the start) a name must follow
    while pos < len(path):
        m = _FIELD_SEGMENT.match(path, pos)
        if m is None:
            raise PipelineError("invalid field path", expression=path, position=pos)
        name, index, _dot = m.groups()
        if name is not None:
            if not expect_name:
                raise PipelineError("missing '.' before field", expression=path, position=pos)
            parts.append(name)
            expect_name = False
        elif index is not None:
            if expect_name and parts:
                raise PipelineError("'[' after '.'", expression=path, position=pos)
            parts.append(int(index))
            expect_name = False
        else:
            if expect_name:
                raise PipelineError("empty field name", expression=path, position=pos)
            expect_name = True
        pos = m.end()
    if expect_name and parts:
        raise PipelineError("path ends with '.'", expression=path, position=len(path))
    if parts and parts[0] == "@":
        parts.pop(0)
    return tuple(parts)


def lookup(value: Any, path: FieldPath) -> Any:
    """Walk ``path`` into ``value``; :data:`MISSING` if any step does not exist.

    Names only index objects and integers only index arrays, as in Prodigy (so ``tags.0``
    does not reach ``tags[0]``).
    """
    current = value
    for part in path:
        if isinstance(part, int):
            if isinstance(current, list) and part < len(current):
                current = current[part]
            else:
                return MISSING
        elif isinstance(current, Mapping) and part in current:
            current = current[part]
        else:
            return MISSING
    return current


# --- selection paths -------------------------------------------------------------------------

_NAME = re.compile(r"[^.\[\]\s]+")
_BRACKET = re.compile(r"\[\s*(?:(\d+)|'([^']*)'|\"([^\"]*)\")\s*\]")


@dataclass(frozen=True, slots=True)
class _Field:
    name: str


@dataclass(frozen=True, slots=True)
class _Index:
    index: int


@dataclass(frozen=True, slots=True)
class _Wildcard:
    pass


@dataclass(frozen=True, slots=True)
class _Descend:
    name: str


@dataclass(frozen=True, slots=True)
class _Predicate:
    test: Callable[[Any], bool]


_Step = _Field | _Index | _Wildcard | _Descend | _Predicate


def _find_predicate_end(path: str, start: int) -> int:
    """Index of the ``)`` closing a ``[?(`` opened just before ``start``, quote-aware."""
    depth = 0
    quote: str | None = None
    i = start
    while i < len(path):
        c = path[i]
        if quote is not None:
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "(":
            depth += 1
        elif c == ")":
            if depth == 0:
                return i
            depth -= 1
        i += 1
    raise PipelineError("unclosed filter '[?('", expression=path, position=start - 3)


def _parse_bracket(path: str, pos: int) -> tuple[_Step, int]:
    """Parse the ``[...]`` starting at ``pos``; return the step and the index after ``]``."""
    if path.startswith("[*]", pos):
        return _Wildcard(), pos + 3
    if path.startswith("[?(", pos):
        # Imported here: the filter language uses this module's field paths, so a top-level
        # import would be circular. It only runs when a path has a predicate.
        from jetreduce.lang.pipeline.filter import compile_filter

        end = _find_predicate_end(path, pos + 3)
        if not path.startswith("]", end + 1):
            raise PipelineError("expected ']' after filter", expression=path, position=end + 1)
        try:
            test = compile_filter(path[pos + 3 : end])
        except PipelineError as e:
            raise PipelineError(f"in filter: {e}", expression=path, position=pos) from e
        return _Predicate(test), end + 2
    m = _BRACKET.match(path, pos)
    if m is None:
        raise PipelineError(
            "expected [n], [*], ['name'] or [?(expr)]", expression=path, position=pos
        )
    index, single, double = m.groups()
    if index is not None:
        return _Index(int(index)), m.end()
    return _Field(single if single is not None else double), m.end()


def _parse_selection(path: str) -> list[_Step]:
    steps: list[_Step] = []
    pos = 0
    if path.startswith("$"):
        pos = 1
    elif path and path[0] not in ".[":
        # Prodigy accepts a bare leading name ("items[*]") as if it were "$.items[*]".
        m = _NAME.match(path)
        if m is None:  # pragma: no cover - guarded by the condition above
            raise PipelineError("invalid json_path", expression=path, position=0)
        steps.append(_Wildcard() if m.group() == "*" else _Field(m.group()))
        pos = m.end()
    while pos < len(path):
        if path.startswith("..", pos):
            m = _NAME.match(path, pos + 2)
            if m is None or m.group() == "*":
                raise PipelineError(
                    "expected a field name after '..'", expression=path, position=pos + 2
                )
            steps.append(_Descend(m.group()))
            pos = m.end()
        elif path[pos] == ".":
            m = _NAME.match(path, pos + 1)
            if m is None:
                raise PipelineError(
                    "expected a field name after '.'", expression=path, position=pos + 1
                )
            steps.append(_Wildcard() if m.group() == "*" else _Field(m.group()))
            pos = m.end()
        elif path[pos] == "[":
            step, pos = _parse_bracket(path, pos)
            steps.append(step)
        else:
            raise PipelineError("unexpected character", expression=path, position=pos)
    return steps


def _descend(value: Any, name: str, out: list[Any]) -> None:
    """Pre-order recursive descent, same visiting order as Prodigy's ``..field``."""
    if isinstance(value, Mapping):
        if name in value:
            out.append(value[name])
        for child in value.values():
            _descend(child, name, out)
    elif isinstance(value, list):
        for child in value:
            _descend(child, name, out)


def _apply(step: _Step, value: Any, out: list[Any]) -> None:
    if isinstance(step, _Field):
        if isinstance(value, Mapping) and step.name in value:
            out.append(value[step.name])
    elif isinstance(step, _Index):
        if isinstance(value, list) and step.index < len(value):
            out.append(value[step.index])
    elif isinstance(step, _Wildcard):
        if isinstance(value, list):
            out.extend(value)
        elif isinstance(value, Mapping):
            out.extend(value.values())
    elif isinstance(step, _Descend):
        _descend(value, step.name, out)
    elif isinstance(value, list):  # _Predicate: filters array elements only, as in Prodigy
        out.extend(v for v in value if step.test(v))


def compile_json_path(json_path: str) -> Callable[[Any], list[Any]]:
    """Compile a selection path once; the result maps a document to its items.

    ``""`` (no path) follows Prodigy: a top-level array gives its elements, any other value
    is one item. Otherwise the path's matches are the items, so ``$.items`` (no ``[*]``)
    gives **one** item, the array itself, and ``$`` gives the whole document as one item.
    ``[*]``/``.*`` also yield an object's values (an extension: Prodigy yields nothing).
    Raises :class:`PipelineError` for a malformed path.
    """
    if json_path.strip() == "":
        return lambda doc: list(doc) if isinstance(doc, list) else [doc]
    steps = _parse_selection(json_path.strip())

    def run(doc: Any) -> list[Any]:
        current: list[Any] = [doc]
        for step in steps:
            nxt: list[Any] = []
            for value in current:
                _apply(step, value, nxt)
            current = nxt
        return current

    return run


def select(doc: Any, json_path: str) -> list[Any]:
    """Items selected from ``doc`` by ``json_path`` (see :func:`compile_json_path`)."""
    return compile_json_path(json_path)(doc)


def validate_json_path(json_path: str) -> None:
    """Raise :class:`PipelineError` if ``json_path`` does not parse."""
    compile_json_path(json_path)
