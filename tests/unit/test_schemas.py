"""The committed JSON Schemas must match the msgspec types (regenerate: ``make schemas``)."""

from __future__ import annotations

from pathlib import Path

from jetreduce.contract import events as ev
from jetreduce.contract.schemas import generate, render

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def test_committed_schemas_match_the_types() -> None:
    generated = generate()
    committed = {p.name for p in SCHEMAS.glob("*.json")}
    assert committed == set(generated), "schemas/ is out of date: run `make schemas`"
    for name, doc in generated.items():
        assert (SCHEMAS / name).read_text() == render(doc), f"{name} drifted: run `make schemas`"


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
