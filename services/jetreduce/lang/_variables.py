"""Values and variables of the ``${path}`` syntax: lookup by dotted path, Prodigy's rendering,
and :func:`render_text`.

The half of :mod:`jetreduce.lang.interpolate` that knows what a reference *means* (which value
it names, how that value reads as text) and nothing about shells, so that :mod:`._shell`'s lexer
and the plain-text renderer share one resolution and one rendering.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any, Final

import msgspec

__all__ = [
    "REFERENCE",
    "Variables",
    "item_scopes",
    "render_text",
    "render_value",
    "resolve_reference",
]

REFERENCE: Final = re.compile(r"\$\{([^}]+)\}|\$([A-Za-z_][A-Za-z0-9_]*|[0-9])")
"""Prodigy's reference syntax: ``${...}`` (up to the first ``}``), ``$NAME``, ``$1``."""

_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]|(\.)")
_COMPACT = msgspec.json.Encoder()


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


def resolve_reference(m: re.Match[str], variables: Variables) -> str | None:
    path, default = _split_reference(m)
    value = variables.render(path)
    return default if value is None else value


def render_text(template: str, variables: Variables) -> str:
    """Substitute every reference by its rendered value (no quoting; not for shells)."""

    def sub(m: re.Match[str]) -> str:
        value = resolve_reference(m, variables)
        return m.group(0) if value is None else value

    return REFERENCE.sub(sub, template)
