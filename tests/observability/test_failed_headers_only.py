"""``item.failed``, ``item.done`` and ``item.dead`` reach the metrics process without their
payloads (up to 64 KiB of output each): headers-only JetStream consumers count them, and the
duration comes from a header (runtime/telemetry/_observer.py). Real nats-server; the bytes
the metrics connection received are the measure."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from jetreduce.contract import events as ev
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.runtime import telemetry
from jetreduce.runtime.connection import connect
from jetreduce.runtime.settings import NatsSettings
from support import wait_for

pytestmark = pytest.mark.anyio

TAIL = 60_000
ATTEMPTS = 10


def sample(reader: object, line: str) -> float:
    text = telemetry.render(reader.get_metrics_data())  # type: ignore[attr-defined]
    match = re.search(rf"^{re.escape(line)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@dataclass
class MetricsProcess:
    reader: Any
    nc: Any
    """The metrics process's connection: its received bytes are the measure."""
    publisher: Any
    subjects: Subjects


@contextlib.asynccontextmanager
async def metrics_process(nats_url: str, prefix: str) -> AsyncIterator[MetricsProcess]:
    """Event metrics on a connection of their own, and an agent-like publisher."""
    reader = telemetry.ensure_prometheus_reader()  # before the instruments are made
    settings = NatsSettings(url=nats_url, prefix=prefix)
    nc = await connect(settings, name="metrics")
    publisher = await connect(settings, name="agent")
    subjects = Subjects(prefix)
    await declare(nc.jetstream(), subjects, None)
    metrics = await telemetry.EventMetrics(nc, subjects).start()
    try:
        yield MetricsProcess(reader, nc, publisher, subjects)
    finally:
        await metrics.stop()
        await publisher.drain()
        await nc.drain()


async def test_failed_attempts_are_counted_without_their_payloads(
    nats_url: str, prefix: str
) -> None:
    failed_total = "jetreduce_items_failed_total"
    async with metrics_process(nats_url, prefix) as m:
        before = sample(m.reader, failed_total)
        received = m.nc.stats["in_bytes"]
        for index in range(ATTEMPTS):
            failed = ev.ItemFailed(
                workflow_id="wf",
                index=index,
                item_id=f"item_{index}",
                attempt=1,
                error="exit 1",
                exit_code=1,
                stderr_tail="e" * TAIL,
                retry_in_s=1.0,
            )
            subject = m.subjects.item_failed("wf", index)
            await m.publisher.jetstream().publish(subject, ev.encode(failed))
        await wait_for(lambda: sample(m.reader, failed_total) == before + ATTEMPTS, timeout_s=10)
        # Headers and metadata only: far less than one error tail, let alone ten.
        assert m.nc.stats["in_bytes"] - received < TAIL


async def test_results_are_counted_and_timed_from_their_headers(nats_url: str, prefix: str) -> None:
    done_total = "jetreduce_items_done_total"
    timed = 'jetreduce_item_duration_seconds_count{outcome="done"}'
    summed = 'jetreduce_item_duration_seconds_sum{outcome="done"}'
    async with metrics_process(nats_url, prefix) as m:
        before = [sample(m.reader, line) for line in (done_total, timed, summed)]
        received = m.nc.stats["in_bytes"]
        for index in range(ATTEMPTS):
            done = ev.ItemDone(
                workflow_id="wf",
                index=index,
                item_id=f"item_{index}",
                output="o" * TAIL,
                exit_code=0,
                duration_s=2.5,
                attempts=1,
            )
            await m.publisher.jetstream().publish(
                m.subjects.item_done("wf", index),
                ev.encode(done),
                headers={ev.DURATION_HEADER: "2.5"},
            )
        await wait_for(lambda: sample(m.reader, done_total) == before[0] + ATTEMPTS, timeout_s=10)
        assert sample(m.reader, timed) == before[1] + ATTEMPTS
        assert sample(m.reader, summed) == pytest.approx(before[2] + 2.5 * ATTEMPTS)
        assert m.nc.stats["in_bytes"] - received < TAIL
