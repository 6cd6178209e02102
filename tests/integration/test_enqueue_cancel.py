"""The planner's chunked enqueue (planner/service.py) on a real JetStream queue: a workflow
that ends while its last chunk goes in is reported stopped, so the planner purges that chunk
too (the janitor's purge may have run before it arrived)."""

from __future__ import annotations

from typing import Any

import nats
import pytest

from jetreduce.contract.events import WorkItem
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.planner.service import _enqueue_in_chunks
from jetreduce.queues.factory import open_queue
from jetreduce.runtime.service import ServiceContext

pytestmark = pytest.mark.anyio


async def test_a_workflow_ended_during_the_last_chunk_is_reported_stopped(
    nats_url: str, prefix: str
) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        subjects = Subjects(prefix)
        await declare(js, subjects)
        queue = open_queue(ServiceContext(nc, js, subjects), "wf-cancel", "jetstream")
        await queue.prepare(visibility_s=30, max_attempts=3, parallel=1)
        asked: list[bool] = []

        async def ended() -> bool:  # a cancel lands while the only chunk is enqueued
            asked.append(True)
            return len(asked) > 1

        items: Any = iter(WorkItem(workflow_id="wf-cancel", index=i, item=i) for i in range(5))
        result = await _enqueue_in_chunks(queue, items, "p1", ended=ended)
        assert result.added == 5 and result.stopped
        await queue.purge()
        await queue.close()
    finally:
        await nc.drain()
