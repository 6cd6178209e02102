"""A result stored under an index the workflow does not have (forged: ``>= total``) is not
counted towards the map's completion: the aggregator counts the items ``0..total-1`` one by
one before it completes the map, and completes it once the missing item's result is in."""

from __future__ import annotations

import contextlib

import pytest

from jetreduce.aggregator.service import Aggregator
from jetreduce.contract import events as ev
from jetreduce.contract.records import Phase, counted_complete
from jetreduce.runtime.publish import is_stored
from jetreduce.runtime.state import StateStore
from support import wait_for

from .test_aggregator_replicas import _mapping
from .test_services import _consumer_acked_all, context, running

pytestmark = pytest.mark.anyio


def _done(wf: str, index: int) -> ev.ItemDone:
    return ev.ItemDone(
        workflow_id=wf,
        index=index,
        item_id=f"item_{index}",
        output="",
        exit_code=0,
        duration_s=0.0,
        attempts=1,
        agent="a",
    )


async def test_a_result_beyond_the_total_does_not_complete_the_map(
    nats_url: str, prefix: str
) -> None:
    async with context(nats_url, prefix) as ctx:
        s, state, wf = ctx.subjects, StateStore(ctx.js, ctx.subjects), "wf-range"
        aggregator = Aggregator(ctx, rescan_s=0.2)
        async with running(aggregator):
            await _mapping(state, wf, 3)
            await wait_for(lambda: wf in aggregator.active, 10)
            for index in (0, 1, 7):  # 7: no such item; item 2 has not finished
                await ctx.js.publish(s.item_done(wf, index), ev.encode(_done(wf, index)))

            async def complete() -> ev.MapComplete | None:
                with contextlib.suppress(Exception):
                    msg = await ctx.js.get_last_msg(s.events_stream, s.map("complete", wf))
                    return ev.decode_as(msg.data, ev.MapComplete)
                return None

            # The distinct count says 3 of 3: the item-by-item count has run and refused.
            async def counted_three() -> bool:
                return await aggregator.counter.count(s.terminal_of(wf)) == 3

            await wait_for(counted_three, 10)
            checks = 0
            while checks < 8:  # a few ticks of the aggregator after it saw 3 of 3
                await aggregator.counter.check(wf)
                checks += 1
            assert await complete() is None
            assert wf in aggregator.active

            await ctx.js.publish(s.item_done(wf, 2), ev.encode(_done(wf, 2)))

            async def completed() -> bool:
                return await complete() is not None

            await wait_for(completed, 10)
            found = await complete()
            assert found is not None and (found.total, found.done, found.dead) == (3, 3, 0)
            # Its count is in the record first, which vouches for the event (the launcher and
            # the agents then need no count of their own: test_vouched_completion.py).
            assert counted_complete(await state.get(wf), found)


async def test_a_false_map_complete_does_not_end_a_map_without_reduce(
    nats_url: str, prefix: str
) -> None:
    """Anyone who may publish could store ``map.complete``: for a workflow without a reduce
    the aggregator ends it only when the server holds as many terminal results as planned
    (the launcher's rule for starting a reduce), so the forgery ends nothing, and the map
    completes when its real results are in."""
    async with context(nats_url, prefix) as ctx:
        s, state, wf = ctx.subjects, StateStore(ctx.js, ctx.subjects), "wf-forged"
        aggregator = Aggregator(ctx, rescan_s=0.2)
        async with running(aggregator):
            await _mapping(state, wf, 2)  # no reduce
            await wait_for(lambda: wf in aggregator.active, 10)
            forged = ev.MapComplete(workflow_id=wf, total=2, done=2, dead=0)
            await ctx.js.publish(s.map("complete", wf), ev.encode(forged))
            await wait_for(_consumer_acked_all(ctx, "aggregator"), 10)  # handled
            record = await state.get(wf)
            assert record is not None and record.phase == Phase.MAPPING
            assert not await is_stored(ctx.js, s.events_stream, s.workflow("completed", wf))

            for index in range(2):
                await ctx.js.publish(s.item_done(wf, index), ev.encode(_done(wf, index)))

            async def completed() -> bool:
                return await is_stored(ctx.js, s.events_stream, s.workflow("completed", wf))

            await wait_for(completed, 10)
            msg = await ctx.js.get_last_msg(s.events_stream, s.workflow("completed", wf))
        done = ev.decode_as(msg.data, ev.WorkflowCompleted)
        assert (done.total, done.done, done.dead) == (2, 2, 0)


async def test_a_result_under_a_non_ascii_digit_does_not_stand_in_for_an_item(
    nats_url: str, prefix: str
) -> None:
    """``"٣".isdigit()`` and ``int("٣") == 3``: a forged ``item.done.<wf>.٣`` must not count as
    item 3, and ``"²"`` (a digit ``int`` refuses) must not break the count."""
    async with context(nats_url, prefix) as ctx:
        s, state, wf = ctx.subjects, StateStore(ctx.js, ctx.subjects), "wf-digits"
        await _mapping(state, wf, 4)
        for index in (0, 1, 2):
            await ctx.js.publish(s.item_done(wf, index), ev.encode(_done(wf, index)))
        for token in ("٣", "²"):
            forged = s.item_done(wf, 0).rsplit(".", 1)[0] + "." + token
            await ctx.js.publish(forged, ev.encode(_done(wf, 3)))
        aggregator = Aggregator(ctx)
        assert await aggregator.counter.count(s.terminal_of(wf)) == 5  # the distinct count
        assert await aggregator.counter.in_range(wf, 4) == (3, 0)
        await aggregator.counter.track(wf, 4)
        try:
            for _ in range(3):
                await aggregator.counter.check(wf)
            assert wf in aggregator.active  # not complete: item 3 has no result
            assert not await is_stored(ctx.js, s.events_stream, s.map("complete", wf))
        finally:
            await aggregator.counter.close()
