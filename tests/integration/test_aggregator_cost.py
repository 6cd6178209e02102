"""The aggregator's cost per tick does not grow with the number of items (issue 16): it asks
the item queue's ``depth()`` (one round trip on every backend) and runs the O(items) exact
count of results only when the depth says the queue may be drained. On Redis it used to get
no depth at all and ran the exact count on every 0.25 s tick.

Cost is counted, not timed: the exact counts the aggregator asks NATS for, and the commands
the real Redis server executed for it (``INFO commandstats``, which counts the commands a
script runs too).
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from typing import Any

import pytest
import redis.asyncio as aioredis

from jetreduce.aggregator.arrivals import SOON_DELAYS_S
from jetreduce.aggregator.counting import Completed, MapCounter
from jetreduce.contract import events as ev
from jetreduce.contract.records import Phase, StoredSpec, WorkflowRecord
from jetreduce.lang import parse_workflow
from jetreduce.queues.base import ItemQueue, Lease
from jetreduce.queues.factory import open_queue
from jetreduce.runtime.publish import AckPipeline
from jetreduce.runtime.service import ServiceContext
from jetreduce.runtime.state import StateStore
from support import wait_for

from .test_aggregator_replicas import WORKFLOW
from .test_services import context

pytestmark = pytest.mark.anyio

TICKS = 8


async def _not_here(*args: object) -> None:
    raise AssertionError(f"nothing completes or fails here: {args}")


class CountingCounter(MapCounter):
    """The aggregator's real counting, counting the exact counts it asks the server for."""

    def __init__(self, ctx: ServiceContext, completed: Completed = _not_here) -> None:
        state = StateStore(ctx.js, ctx.subjects)
        super().__init__(ctx, state, failed=_not_here, completed=completed)
        self.counts: Counter[str] = Counter()

    async def count(self, subject_filter: str) -> int:
        self.counts[subject_filter] += 1
        return await super().count(subject_filter)

    async def in_range(self, wf: str, total: int) -> tuple[int, int]:
        self.counts["in range"] += 1
        return await super().in_range(wf, total)


async def redis_commands(r: aioredis.Redis) -> int:
    """Commands the server has executed so far (not counting the INFO calls asking it)."""
    stats: dict[str, Any] = await r.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


async def mapping_on(state: StateStore, wf: str, total: int, queue_url: str) -> None:
    spec = StoredSpec(
        workflow=parse_workflow(WORKFLOW).workflow, options=ev.SubmitOptions(queue=queue_url)
    )
    await state.put_spec(wf, spec)
    now = time.time()
    record = WorkflowRecord(
        workflow_id=wf, name="cost", phase=Phase.MAPPING, created_ts=now, updated_ts=now
    )
    record.total = total
    assert await state.create(record)


async def lease_all(queue: ItemQueue, n: int) -> list[Lease]:
    got: list[Lease] = []
    deadline = time.monotonic() + 20
    while len(got) < n:
        assert time.monotonic() < deadline, f"leased {len(got)} of {n}"
        got.extend(await queue.lease(min(100, n - len(got)), wait_s=0.5))
    return got


async def test_the_aggregators_cost_per_tick_does_not_grow_with_items_on_redis(
    nats_url: str, prefix: str, request: pytest.FixtureRequest
) -> None:
    server = request.getfixturevalue("redis_server")
    r = aioredis.Redis.from_url(server.url)
    per_tick: dict[int, int] = {}
    try:
        async with context(nats_url, prefix) as ctx:
            state = StateStore(ctx.js, ctx.subjects)
            for n in (10, 2000):
                wf = f"wf-cost-{n}-{secrets.token_hex(3)}"
                s = ctx.subjects
                await mapping_on(state, wf, n, server.url)
                queue = open_queue(ctx, wf, server.url)
                try:
                    await queue.prepare(visibility_s=60, max_attempts=1, parallel=4)
                    items = (ev.WorkItem(workflow_id=wf, index=i, item=i) for i in range(n))
                    assert (await queue.enqueue(items)).added == n
                    (held,) = await lease_all(queue, 1)  # one in flight, the rest pending

                    counter = CountingCounter(ctx)
                    await counter.track(wf, n)
                    await counter.check(wf)  # the first tick counts exactly, on schedule
                    assert counter.counts[s.terminal_of(wf)] == 1
                    # The schedule is time-based (EXACT_EVERY_MIN_S): moved out of the way,
                    # so what is left is what every tick costs.
                    counter.active[wf].next_exact = time.monotonic() + 600
                    before = await redis_commands(r)
                    for _ in range(TICKS):
                        await counter.check(wf)
                    per_tick[n] = (await redis_commands(r) - before) // TICKS
                    assert counter.counts[s.terminal_of(wf)] == 1, "exact count per tick"
                    assert counter.counts[s.dead_of(wf)] == 1 + TICKS + 1
                    assert counter.counts["in range"] == 0
                    assert wf in counter.active  # nothing finished: still mapping

                    # Drained (every item settled): the depth says so, and the very next
                    # tick counts exactly.
                    await queue.ack(held)
                    for lease in await lease_all(queue, n - 1):
                        await queue.ack(lease)
                    await counter.check(wf)
                    assert counter.counts[s.terminal_of(wf)] == 2
                    assert wf in counter.active  # no results stored: not complete
                    await counter.untrack(wf)
                finally:
                    await queue.purge()
                    await queue.close()
    finally:
        await r.aclose()
    # One depth script per tick (EVALSHA and the few O(1) commands it runs), whatever n.
    assert per_tick[10] == per_tick[2000] <= 6, per_tick


async def test_arriving_results_cost_no_count_until_they_may_complete_the_map(
    nats_url: str, prefix: str
) -> None:
    """The arrivals that wake the count (arrivals.py) are counted locally: thousands of
    results, duplicates and forged indices ask the server nothing; the last result then
    triggers the exact count at once, and a few checks at most."""
    n = 2000
    async with context(nats_url, prefix) as ctx:
        s, state, wf = ctx.subjects, StateStore(ctx.js, ctx.subjects), "wf-arrivals"
        await mapping_on(state, wf, n, "jetstream")  # no consumer yet: its depth is idle
        ended: list[tuple[str, int, int, int]] = []

        async def completed(wf: str, total: int, done: int, dead: int) -> None:
            ended.append((wf, total, done, dead))

        counter = CountingCounter(ctx, completed)
        try:
            await counter.track(wf, n)
            await counter.check(wf)
            assert counter.counts[s.terminal_of(wf)] == 1
            counter.active[wf].next_exact = time.monotonic() + 600  # no scheduled count

            def result(index: int) -> bytes:
                done = ev.ItemDone(
                    workflow_id=wf,
                    index=index,
                    item_id=f"item_{index}",
                    output="",
                    exit_code=0,
                    duration_s=0.0,
                    attempts=1,
                )
                return ev.encode(done)

            async with AckPipeline(ctx.nc) as pipeline:
                for index in [*range(n - 1), *range(0, n - 1, 7), n, n + 5]:
                    await pipeline.publish(s.item_done(wf, index), result(index))
                await pipeline.flush()
            await wait_for(lambda: counter.arrivals.watched[wf].seen_n == n - 1, 10)
            assert dict(counter.counts) == {s.terminal_of(wf): 1, s.dead_of(wf): 2}

            await ctx.js.publish(s.item_done(wf, n - 1), result(n - 1))
            await wait_for(lambda: ended, 10)
            assert ended == [(wf, n, n, 0)]
            assert counter.counts[s.terminal_of(wf)] == 2
            assert counter.counts["in range"] == 1
            assert counter.counts[s.dead_of(wf)] <= 2 + 2 * len(SOON_DELAYS_S)
        finally:
            await counter.close()
