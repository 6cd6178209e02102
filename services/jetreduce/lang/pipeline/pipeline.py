"""The whole item pipeline: json_path → filter → sort_by → distinct → offset → max_items.

That order is Prodigy's (``data_pipeline/mod.rs::process``). We apply ``distinct`` and
``offset`` as documented; Prodigy's live coordinator builds its pipeline without them, so a
workflow that sets them gets fewer items here than under Prodigy (see research §1.3 ⚠L).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import msgspec

from jetreduce.lang.pipeline.filter import compile_filter
from jetreduce.lang.pipeline.jsonpath import (
    MISSING,
    PipelineError,
    compile_json_path,
    lookup,
    parse_field_path,
)
from jetreduce.lang.pipeline.sort import compile_sort

__all__ = ["ItemPipeline", "run_pipeline"]

_SORTED_JSON = msgspec.json.Encoder(order="sorted")


def _distinct_key(value: Any) -> bytes:
    """Canonical JSON of the distinct field; a missing field counts as null, as in Prodigy."""
    return b"null" if value is MISSING else _SORTED_JSON.encode(value)


class ItemPipeline:
    """A compiled pipeline: build once (all expressions validated), call per document.

    Raises :class:`PipelineError` from the constructor for any invalid expression or a
    negative ``offset``/``max_items``, so the error surfaces at submit time.
    """

    def __init__(
        self,
        *,
        json_path: str = "",
        filter: str | None = None,
        sort_by: str | None = None,
        distinct: str | None = None,
        offset: int | None = None,
        max_items: int | None = None,
    ) -> None:
        for name, number in (("offset", offset), ("max_items", max_items)):
            if number is not None and number < 0:
                raise PipelineError(f"{name} must be >= 0, got {number}")
        self._select = compile_json_path(json_path)
        self._select_path = json_path.strip() != ""
        self._filter: Callable[[Any], bool] | None = (
            compile_filter(filter) if filter is not None else None
        )
        self._sort = compile_sort(sort_by) if sort_by is not None else None
        self._distinct = parse_field_path(distinct) if distinct is not None else None
        self._offset = offset
        self._max_items = max_items

    @property
    def sorts(self) -> bool:
        """Whether a ``sort_by`` is set (it needs every item at once)."""
        return self._sort is not None

    @property
    def selects(self) -> bool:
        """Whether a ``json_path`` is set (it needs the whole document)."""
        return self._select_path

    def __call__(self, doc: Any) -> list[Any]:
        return list(self.run(self._select(doc)))

    def run(self, items: Iterable[Any]) -> Iterator[Any]:
        """Every stage after ``json_path``, lazily: only ``sort_by`` holds the items (it must
        see them all); ``distinct`` holds one key per distinct value."""
        if self._filter is not None:
            items = filter(self._filter, items)
        if self._sort is not None:
            items = self._sort(list(items))
        if self._distinct is not None:
            items = self._unique(items, self._distinct)
        if self._offset or self._max_items is not None:
            start = self._offset or 0
            stop = None if self._max_items is None else start + self._max_items
            items = itertools.islice(items, start, stop)
        return iter(items)

    @staticmethod
    def _unique(items: Iterable[Any], path: Any) -> Iterator[Any]:
        seen: set[bytes] = set()
        for item in items:
            key = _distinct_key(lookup(item, path))
            if key not in seen:
                seen.add(key)
                yield item


def run_pipeline(
    doc: Any,
    *,
    json_path: str = "",
    filter: str | None = None,
    sort_by: str | None = None,
    distinct: str | None = None,
    offset: int | None = None,
    max_items: int | None = None,
) -> list[Any]:
    """Select, filter, sort, dedupe and page the items of ``doc`` (see :class:`ItemPipeline`)."""
    return ItemPipeline(
        json_path=json_path,
        filter=filter,
        sort_by=sort_by,
        distinct=distinct,
        offset=offset,
        max_items=max_items,
    )(doc)
