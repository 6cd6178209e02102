"""``map.sort_by``: multi-key, stable sorting of items.

Spec: ``"path [ASC|DESC] [NULLS FIRST|NULLS LAST], …"`` (keywords case-insensitive,
``ASCENDING``/``DESCENDING`` accepted). Defaults are ASC and NULLS LAST.

Ordering follows Prodigy's ``sorter.rs``:

* A missing field counts as null. Where nulls go is decided by NULLS FIRST/LAST alone,
  **independently of ASC/DESC** (so ``score DESC`` still puts nulls last).
* Non-null values of different types order by type rank bool < number < string < array <
  object; within a type: false < true, numbers by value, strings by code point, arrays and
  objects by their length. DESC reverses this value order only.
* The sort is stable: items that compare equal keep their input order.

Unlike Prodigy, an unknown word in a key (``score DSC``) is an error rather than ignored.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jetreduce.lang.pipeline.jsonpath import MISSING, PipelineError, lookup, parse_field_path

__all__ = ["SortKey", "compile_sort", "parse_sort", "validate_sort"]


@dataclass(frozen=True, slots=True)
class SortKey:
    """One ``path DIR NULLS POS`` clause of a sort spec."""

    path: tuple[str | int, ...]
    descending: bool = False
    nulls_first: bool = False


def _type_rank(v: Any) -> int:
    if isinstance(v, bool):
        return 1
    if isinstance(v, int | float):
        return 2
    if isinstance(v, str):
        return 3
    if isinstance(v, list):
        return 4
    return 5


def _cmp_values(a: Any, b: Any) -> int:
    """Three-way compare of two non-null JSON values (see the module docstring)."""
    ra, rb = _type_rank(a), _type_rank(b)
    if ra != rb:
        return -1 if ra < rb else 1
    if ra >= 4:  # arrays, objects: by size, as Prodigy does
        a, b = len(a), len(b)
    return -1 if a < b else 1 if a > b else 0


def _is_null(v: Any) -> bool:
    return v is None or v is MISSING


def _cmp_items(keys: tuple[SortKey, ...], a: Any, b: Any) -> int:
    for key in keys:
        va, vb = lookup(a, key.path), lookup(b, key.path)
        na, nb = _is_null(va), _is_null(vb)
        if na and nb:
            continue
        if na or nb:
            null_goes_first = -1 if key.nulls_first else 1
            return null_goes_first if na else -null_goes_first
        c = _cmp_values(va, vb)
        if c:
            return -c if key.descending else c
    return 0


def parse_sort(spec: str) -> tuple[SortKey, ...]:
    """Parse a sort spec into keys; :class:`PipelineError` (with position) if malformed."""
    keys: list[SortKey] = []
    offset = 0
    for clause in spec.split(","):
        words: list[tuple[str, int]] = []
        pos = 0
        for word in clause.split():
            pos = clause.index(word, pos)
            words.append((word, offset + pos))
            pos += len(word)
        offset += len(clause) + 1
        if not words:
            continue
        (path_text, path_pos), rest = words[0], words[1:]
        try:
            path = parse_field_path(path_text)
        except PipelineError as e:
            raise PipelineError(
                f"invalid sort field {path_text!r}", expression=spec, position=path_pos
            ) from e
        descending = False
        nulls_first = False
        if rest and rest[0][0].upper() in ("ASC", "ASCENDING", "DESC", "DESCENDING"):
            descending = rest[0][0].upper().startswith("DESC")
            rest = rest[1:]
        if rest and rest[0][0].upper() == "NULLS":
            if len(rest) < 2 or rest[1][0].upper() not in ("FIRST", "LAST"):
                where = rest[1][1] if len(rest) > 1 else rest[0][1]
                raise PipelineError(
                    "expected FIRST or LAST after NULLS", expression=spec, position=where
                )
            nulls_first = rest[1][0].upper() == "FIRST"
            rest = rest[2:]
        if rest:
            raise PipelineError(
                f"unexpected {rest[0][0]!r} (expected ASC, DESC, NULLS FIRST or NULLS LAST)",
                expression=spec,
                position=rest[0][1],
            )
        keys.append(SortKey(path, descending, nulls_first))
    if not keys:
        raise PipelineError("no sort fields", expression=spec)
    return tuple(keys)


def compile_sort(spec: str) -> Callable[[list[Any]], list[Any]]:
    """Compile ``spec`` once; the result returns a new, sorted list (the input is untouched)."""
    keys = parse_sort(spec)
    key_fn = functools.cmp_to_key(functools.partial(_cmp_items, keys))

    def sort(items: list[Any]) -> list[Any]:
        return sorted(items, key=key_fn)

    return sort


def validate_sort(spec: str) -> None:
    """Raise :class:`PipelineError` if ``spec`` is not a valid sort spec."""
    parse_sort(spec)
