"""Aggregator replicas share one durable consumer, so ``workflow.planned`` reaches one of
them: every replica must still find and count every mapping workflow from the records, at
any time (issue 19: when the replica that saw the event died, the workflow hung)."""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import pytest
from nats.aio.msg import Msg

from jetreduce.aggregator.service import Aggregator
from jetreduce.contract import events as ev
from jetreduce.contract.records import Phase, StoredSpec
from jetreduce.lang import parse_workflow
from jetreduce.runtime.service import EventConsumer
from jetreduce.runtime.state import StateStore
from support import mapping_record, wait_for

from .test_services import _consumer_acked_all, context, running

pytestmark = pytest.mark.anyio

WORKFLOW = """
name: replicas
map:
  input: items.json
  agent_template:
    - shell: "echo ${item}"
"""


async def _mapping(state: StateStore, wf: str, total: int) -> None:
    spec = StoredSpec(workflow=parse_workflow(WORKFLOW).workflow, options=ev.SubmitOptions())
    await state.put_spec(wf, spec)
    assert await state.create(mapping_record(wf, total, "replicas"))


async def test_a_running_replica_counts_a_workflow_planned_while_another_had_the_event(
    nats_url: str, prefix: str
) -> None:
    async with context(nats_url, prefix) as ctx:
        s, state = ctx.subjects, StateStore(ctx.js, ctx.subjects)
        aggregator = Aggregator(ctx, rescan_s=0.2)
        async with running(aggregator):
            # Planned after this replica started, its workflow.planned consumed by a replica
            # that then died: no event will ever tell this one.
            await _mapping(state, "wf-lost", 2)
            for index in range(2):
                done = ev.ItemDone(
                    workflow_id="wf-lost",
                    index=index,
                    item_id=f"item_{index}",
                    output="",
                    exit_code=0,
                    duration_s=0.0,
                    attempts=1,
                )
                await ctx.js.publish(s.item_done("wf-lost", index), ev.encode(done))

            async def completed() -> bool:
                with contextlib.suppress(Exception):
                    await ctx.js.get_last_msg(s.events_stream, s.map("complete", "wf-lost"))
                    return True
                return False

            await wait_for(completed, 10)

            # One another replica ended (here: failed) is no longer counted by this one.
            await _mapping(state, "wf-ended", 5)
            await wait_for(lambda: "wf-ended" in aggregator.active, 10)
            await state.transition("wf-ended", Phase.FAILED, reason="failed elsewhere")
            await wait_for(lambda: "wf-ended" not in aggregator.active, 10)


async def test_a_map_complete_no_replica_will_handle_again_still_ends_the_workflow(
    nats_url: str, prefix: str
) -> None:
    """A workflow without a reduce whose ``map.complete`` is stored, and taken off the
    aggregators' consumer for good (a replica's last allowed delivery of it, say): every
    replica's rescan finds it still mapping, checks the count, and ends it."""
    async with context(nats_url, prefix) as ctx:
        s, state, wf = ctx.subjects, StateStore(ctx.js, ctx.subjects), "wf-orphan"
        await _mapping(state, wf, 1)
        await state.update(wf, lambda r: msgspec.structs.replace(r, done=1))
        done = ev.ItemDone(
            workflow_id=wf,
            index=0,
            item_id="item_0",
            output="",
            exit_code=0,
            duration_s=0.0,
            attempts=1,
        )
        await ctx.js.publish(s.item_done(wf, 0), ev.encode(done))
        complete = ev.MapComplete(workflow_id=wf, total=1, done=1, dead=0)
        await ctx.js.publish(s.map("complete", wf), ev.encode(complete))

        async def dropped(msg: Msg) -> None:
            return None

        stop = asyncio.Event()
        taker = EventConsumer(
            ctx,
            stream=s.events_stream,
            durable="aggregator",
            filters=Aggregator(ctx).filters,
            handler=dropped,
        )
        await taker.ensure()
        task = asyncio.create_task(taker.run(stop))
        try:
            await wait_for(_consumer_acked_all(ctx, "aggregator"), 10)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)

        async with running(Aggregator(ctx, rescan_s=0.2)):

            async def completed() -> bool:
                with contextlib.suppress(Exception):
                    await ctx.js.get_last_msg(s.events_stream, s.workflow("completed", wf))
                    return True
                return False

            await wait_for(completed, 10)
        record = await state.get(wf)
        assert record is not None and record.phase == Phase.COMPLETED
