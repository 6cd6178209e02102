"""Turning ``map.input`` bytes (a command's stdout or a file) into a JSON document / items.

Prodigy's rules (``input_source.rs``):

* **Command output** (lenient): if the whole (trimmed) text is JSON, that is the document;
  otherwise every non-empty line is one item: the line's JSON value if it parses, else
  ``{"item": "<trimmed line>"}``. Empty output means no items (a graceful zero-item run).
* **File** (strict): the whole file must be JSON; anything else, including an empty file,
  is a :class:`PipelineError` naming the decode problem.

Two entry points, because ``json_path`` must see the *document*, not a pre-split list:
:func:`parse_input_document` gives the document to hand to ``run_pipeline`` (so
``$.items[*]`` works on a command that prints ``{"items": [...]}``, which Prodigy's live code
would wrap in a list first and then find nothing), and :func:`parse_input_output` gives the
item list as Prodigy's "no json_path" case would.
"""

from __future__ import annotations

from typing import Any

import msgspec

from jetreduce.lang.pipeline.jsonpath import PipelineError

__all__ = ["line_item", "parse_input_document", "parse_input_output"]

_BOM = "\ufeff"


def _decode_text(data: bytes, *, strict: bool) -> str:
    try:
        text = data.decode("utf-8", errors="strict" if strict else "replace")
    except UnicodeDecodeError as e:
        raise PipelineError(f"input is not valid UTF-8: {e}") from e
    return text.removeprefix(_BOM)


def _try_json(text: str) -> tuple[bool, Any]:
    try:
        return True, msgspec.json.decode(text)
    except msgspec.DecodeError:
        return False, None


def parse_input_document(data: bytes, *, lenient_lines: bool = True) -> Any:
    """The JSON document that ``map.input`` produced (see the module docstring).

    With ``lenient_lines`` (command output) a non-JSON text becomes a list of line items and
    empty output becomes ``[]``; without it (files) non-JSON raises :class:`PipelineError`.
    """
    text = _decode_text(data, strict=not lenient_lines)
    stripped = text.strip()
    if not lenient_lines:
        try:
            return msgspec.json.decode(stripped)
        except msgspec.DecodeError as e:
            what = "is empty" if not stripped else f"is not valid JSON ({e})"
            raise PipelineError(f"input file {what}") from e
    if not stripped:
        return []
    ok, value = _try_json(stripped)
    if ok:
        return value
    return [item for item in map(line_item, text.splitlines()) if item is not None]


def line_item(raw: str) -> Any | None:
    """One line of command output as an item: its JSON value if it parses, else
    ``{"item": "<trimmed line>"}``; None for a blank line."""
    line = raw.strip()
    if not line:
        return None
    ok, value = _try_json(line)
    return value if ok else {"item": line}


def parse_input_output(data: bytes, *, lenient_lines: bool = True) -> list[Any]:
    """Items from ``map.input`` bytes: a JSON array gives its elements, another JSON value is
    one item, and (lenient only) other text gives one item per non-empty line."""
    doc = parse_input_document(data, lenient_lines=lenient_lines)
    return list(doc) if isinstance(doc, list) else [doc]
