"""``item.failed`` reaches the metrics process without its payload (up to 64 KiB of error
output each): a headers-only JetStream consumer counts it (runtime/telemetry/_observer.py).
Real nats-server; the bytes the metrics connection received are the measure."""

from __future__ import annotations

import re

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


def failed_total(reader: object) -> float:
    text = telemetry.render(reader.get_metrics_data())  # type: ignore[attr-defined]
    match = re.search(r"^jetreduce_items_failed_total (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_failed_attempts_are_counted_without_their_payloads(
    nats_url: str, prefix: str
) -> None:
    reader = telemetry.ensure_prometheus_reader()
    settings = NatsSettings(url=nats_url, prefix=prefix)
    nc = await connect(settings, name="metrics")
    publisher = await connect(settings, name="agent")
    subjects = Subjects(prefix)
    await declare(nc.jetstream(), subjects, None)
    metrics = await telemetry.EventMetrics(nc, subjects).start()
    try:
        received = nc.stats["in_bytes"]
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
            subject = subjects.item_failed("wf", index)
            await publisher.jetstream().publish(subject, ev.encode(failed))
        await wait_for(lambda: failed_total(reader) == ATTEMPTS, timeout_s=10)
        # Headers and metadata only: far less than one error tail, let alone ten.
        assert nc.stats["in_bytes"] - received < TAIL
    finally:
        await metrics.stop()
        await publisher.drain()
        await nc.drain()
