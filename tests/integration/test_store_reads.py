"""Reading every stored event on a subject (runtime/store.py), the one helper the launcher,
the CLI and the tests share: it reads to the end and returns at once (no quiet period), an
empty subject or a missing stream is [] without waiting, and a malformed stored payload is
skipped by ``read_events``, not fatal. Real nats-server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest

from jetreduce.contract import events as ev
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.runtime.store import read_events, read_subject

pytestmark = pytest.mark.anyio


@pytest.fixture
async def js(nats_url: str, prefix: str) -> AsyncIterator[Any]:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await declare(js, Subjects(prefix))
        yield js
    finally:
        await nc.close()


def failed(wf: str, index: int, attempt: int) -> bytes:
    return ev.encode(
        ev.ItemFailed(
            workflow_id=wf, index=index, item_id=f"item_{index}", attempt=attempt,
            error="boom", exit_code=1, stderr_tail="", retry_in_s=None,
        )
    )  # fmt: skip


async def test_reads_every_stored_event_in_order_and_returns_at_the_end(
    js: Any, prefix: str
) -> None:
    s = Subjects(prefix)
    for attempt in range(1, 31):
        await js.publish(s.item_failed("wf-r", attempt % 3), failed("wf-r", attempt % 3, attempt))
    await js.publish(s.item_failed("wf-other", 0), failed("wf-other", 0, 1))
    await js.publish(s.item_failed("wf-r", 1), b"{not an event")

    started = time.monotonic()
    raw = await read_subject(js, s.events_stream, s.item_failed("wf-r", "*"))
    events = await read_events(js, s.events_stream, s.item_failed("wf-r", "*"))
    assert time.monotonic() - started < 5  # read to the end, not to a timeout
    assert len(raw) == 31  # the malformed one too
    assert [e.attempt for e in events if isinstance(e, ev.ItemFailed)] == list(range(1, 31))
    assert len(events) == 30  # the malformed one skipped
    one = await read_events(js, s.events_stream, s.item_failed("wf-r", 2))
    assert [e.attempt for e in one if isinstance(e, ev.ItemFailed)] == list(range(2, 31, 3))


async def test_an_empty_subject_and_a_missing_stream_are_empty_at_once(
    js: Any, prefix: str
) -> None:
    s = Subjects(prefix)
    started = time.monotonic()
    assert await read_subject(js, s.events_stream, s.item_failed("wf-none", "*")) == []
    assert await read_events(js, f"{s.events_stream}_MISSING", "nothing.here") == []
    assert time.monotonic() - started < 2
