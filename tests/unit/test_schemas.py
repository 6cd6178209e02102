"""The committed JSON Schemas must match the msgspec types (regenerate: ``make schemas``).

They are compared structurally (``structure``): a msgspec release that renders docstrings
differently must not fail the suite, a changed field, type, enum or requirement must.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from jetreduce.contract import events as ev
from jetreduce.contract.schemas import generate, structure

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def test_committed_schemas_match_the_types() -> None:
    generated = generate()
    committed = {p.name for p in SCHEMAS.glob("*.json")}
    assert committed == set(generated), "schemas/ is out of date: run `make schemas`"
    for name, doc in generated.items():
        committed_doc = json.loads((SCHEMAS / name).read_text())
        assert structure(committed_doc) == structure(doc), f"{name} drifted: run `make schemas`"


def test_prose_differences_do_not_count_but_structure_does() -> None:
    doc = generate()["event.schema.json"]
    defs = doc["$defs"]
    reworded = copy.deepcopy(doc)
    for sub in reworded["$defs"].values():
        sub["description"] = "  re-indented\n    prose"
    assert structure(reworded) == structure(doc)

    # A property that happens to be called "description" is structure, not prose.
    named = copy.deepcopy(doc)
    name = next(iter(defs))
    named["$defs"][name].setdefault("properties", {})["description"] = {"type": "string"}
    assert structure(named) != structure(doc)

    for change in ("required", "type", "enum"):
        drifted = copy.deepcopy(doc)
        target = drifted["$defs"]["ItemFailed"]
        if change == "required":
            target["required"] = [*target["required"], "invented"]
        elif change == "type":
            target["properties"]["attempt"]["type"] = "string"
        else:
            target["properties"]["type"]["enum"] = ["item.failed", "item.other"]
        assert structure(drifted) != structure(doc), change


def test_every_event_type_is_in_the_schema() -> None:
    doc = generate()["event.schema.json"]
    names = set(doc["$defs"])
    for cls in ev.Event.__args__:  # type: ignore[attr-defined]
        assert cls.__name__ in names


def test_events_round_trip_with_type_and_version() -> None:
    event = ev.ItemFailed(
        workflow_id="wf-1",
        index=3,
        item_id="item_3",
        attempt=2,
        error="boom",
        exit_code=1,
        stderr_tail="",
        retry_in_s=2.0,
    )
    data = ev.encode(event)
    assert b'"type":"item.failed"' in data and b'"v":1' in data and b'"ts":' in data
    assert ev.decode(data) == event


def test_malformed_events_raise_bad_event_only() -> None:
    import pytest

    for payload in (b"", b"{", b"[]", b'{"type":"nope"}', b'{"type":"item.done"}', b"\xff" * 10):
        with pytest.raises(ev.BadEvent):
            ev.decode(payload)
