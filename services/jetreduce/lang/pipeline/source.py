"""The items of a workflow's input, read from a spooled file and streamed when possible.

The planner goes over the items twice, once to count them (``workflow.planned`` carries the
total before the first item is queued, so agents start while it enqueues) and once to
enqueue them. Command output in line form, the shape of big inputs (``seq``, ``find``,
``cat ids.txt``), is read line by line both times, so planning holds one item at a time
however many there are. A JSON document (a file, or command output that is one JSON value)
is decoded whole, as it must be without a streaming JSON parser; so is a list that a
``json_path`` or ``sort_by`` needs to see entire (read once, not once per pass).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from jetreduce.lang.pipeline.input_parse import line_item, parse_input_document
from jetreduce.lang.pipeline.pipeline import ItemPipeline

__all__ = ["InputItems", "is_line_stream"]

_BOM = "\ufeff"
_json = msgspec.json.Encoder()


def _lines(path: Path) -> Iterator[str]:
    """The file's lines as ``str.splitlines`` of its whole text would give them."""
    with open(path, encoding="utf-8", errors="replace") as f:
        first = True
        for chunk in f:
            if first:
                chunk = chunk.removeprefix(_BOM)
                first = False
            yield from chunk.splitlines()


def is_line_stream(path: Path) -> bool:
    """Whether command output is one item per line, decided from its first lines.

    The whole output is one JSON document only if it parses as one. A first line that is a
    complete JSON value followed by more text cannot be the start of one; neither can a
    first line that is not JSON and does not open an array or object (strings and numbers
    do not span lines). A single line is left to the document rules (it is small)."""
    first: str | None = None
    for raw in _lines(path):
        line = raw.strip()
        if not line:
            continue
        if first is not None:
            try:
                msgspec.json.decode(first)
                return True
            except msgspec.DecodeError:
                return not first.startswith(("[", "{"))
        first = line
    return False


class InputItems:
    """The pipeline's items, re-iterable; see the module docstring for when they stream."""

    def __init__(self, path: Path, *, lenient_lines: bool, pipeline: ItemPipeline) -> None:
        self._path = path
        self._pipeline = pipeline
        self.streamed = (
            lenient_lines
            and not pipeline.selects
            and not pipeline.sorts  # sorting holds them all anyway: once, not per pass
            and is_line_stream(path)
        )
        self._items: list[Any] | None = None
        if not self.streamed:
            doc = parse_input_document(path.read_bytes(), lenient_lines=lenient_lines)
            self._items = pipeline(doc)

    def __iter__(self) -> Iterator[Any]:
        if self._items is not None:
            return iter(self._items)
        lines = (line_item(raw) for raw in _lines(self._path))
        return self._pipeline.run(item for item in lines if item is not None)

    def scan(self, inline_limit: int) -> tuple[int, set[int]]:
        """How many items there are, and the indexes of those whose JSON is larger than
        ``inline_limit`` bytes (they travel through the object store, not in a message)."""
        big: set[int] = set()
        count = 0
        for count, item in enumerate(self, start=1):
            if len(_json.encode(item)) > inline_limit:
                big.add(count - 1)
        return count, big
