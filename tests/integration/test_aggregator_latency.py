"""``map.complete`` follows a workflow's last result within milliseconds (issue 17), not at
the aggregator's next tick (``TICK_S``, 0.25 s): the result's arrival wakes the count.

The items go through the workflow's real queue and their results are stored as an agent
stores them (create-only, then the lease acked). The delay is read from the streams: the
time the server stored ``map.complete`` minus the time it stored the last result. A tick
would give delays of up to 250 ms.
"""

from __future__ import annotations

import datetime

import pytest

from jetreduce.aggregator.service import Aggregator
from jetreduce.contract import events as ev
from jetreduce.queues.factory import open_queue
from jetreduce.runtime.publish import publish_once
from jetreduce.runtime.service import ServiceContext
from jetreduce.runtime.state import StateStore
from support import wait_for

from .test_aggregator_cost import lease_all
from .test_aggregator_replicas import _mapping
from .test_services import context, count_stored, running

pytestmark = pytest.mark.anyio

ROUNDS = 5
ITEMS = 4
BOUND_S = 0.1
"""Well under ``TICK_S``: each round starts as the previous one completes (at a tick, before),
so its last result lands a few ms after a tick and waited most of one for the next."""


async def _stored_at(ctx: ServiceContext, stream: str, subject: str) -> datetime.datetime:
    msg = await ctx.js.get_last_msg(stream, subject)
    assert msg.time is not None
    return msg.time


async def _run_items(ctx: ServiceContext, wf: str, n: int) -> None:
    """What map agents do with each item: lease it, store its result, ack it."""
    s = ctx.subjects
    queue = open_queue(ctx, wf)
    try:
        await queue.prepare(visibility_s=60, max_attempts=1, parallel=n)
        items = (ev.WorkItem(workflow_id=wf, index=i, item=i) for i in range(n))
        assert (await queue.enqueue(items)).added == n
        await ctx.js.publish(
            s.workflow("planned", wf),
            ev.encode(ev.WorkflowPlanned(workflow_id=wf, total=n, max_parallel=n)),
        )
        for lease in await lease_all(queue, n):
            index = lease.item.index
            done = ev.ItemDone(
                workflow_id=wf,
                index=index,
                item_id=f"item_{index}",
                output="",
                exit_code=0,
                duration_s=0.0,
                attempts=1,
                agent="test",
            )
            stored = await publish_once(
                ctx.js, s.item_done(wf, index), ev.encode(done), guard=s.item_terminal(wf, index)
            )
            assert stored
            await queue.ack(lease)
    finally:
        await queue.close()


async def test_map_complete_follows_the_last_result_within_milliseconds(
    nats_url: str, prefix: str
) -> None:
    async with context(nats_url, prefix) as ctx:
        s, state = ctx.subjects, StateStore(ctx.js, ctx.subjects)
        delays: list[float] = []
        # Two replicas, each watching every counted workflow: one stores each event.
        async with running(Aggregator(ctx)), running(Aggregator(ctx, rescan_s=0.1)):
            for round_ in range(ROUNDS):
                wf = f"wf-latency-{round_}"
                await _mapping(state, wf, ITEMS)
                await _run_items(ctx, wf, ITEMS)

                async def completed(wf: str = wf) -> bool:
                    record = await state.get(wf)
                    return record is not None and record.phase.terminal

                await wait_for(completed, 10)
                complete = await _stored_at(ctx, s.events_stream, s.map("complete", wf))
                results = [
                    await _stored_at(ctx, s.results_stream, s.item_done(wf, i))
                    for i in range(ITEMS)
                ]
                delays.append((complete - max(results)).total_seconds())
                for subject in (s.map("complete", wf), s.workflow("completed", wf)):
                    assert await count_stored(ctx, s.events_stream, subject) == 1
    # The median: a round that the suite's other tests starved of CPU (fresh clone 25: the
    # last rounds of five took 59, 112 and 211 ms) must not hide the rest; on a tick every
    # round would take ~250 ms.
    assert all(d >= 0 for d in delays) and sorted(delays)[len(delays) // 2] < BOUND_S, delays
