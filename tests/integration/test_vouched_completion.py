"""A ``map.complete`` the workflow's record vouches for is acted on without counting the
results again (issue 18): the aggregator writes its exact count into the record before it
stores the event, and only services write records. The launcher and every map agent used
to count the results themselves on each ``map.complete`` (O(items) on the server); 200
agents and the launcher counting at once held every JetStream API request for seconds.

Each test stores *no* results, so a count would say 0 terminal items: whatever is
accepted here was accepted on the record's word, and whatever the record does not vouch
for still meets the count and is refused. Real nats-server."""

from __future__ import annotations

import logging
import shutil

import msgspec
import pytest

from jetreduce.contract import events as ev
from jetreduce.contract.records import Phase, StoredSpec, WorkflowRecord, counted_complete
from jetreduce.lang import parse_workflow
from jetreduce.launcher.completion import map_is_complete
from jetreduce.runtime.publish import is_stored
from jetreduce.runtime.service import ServiceContext
from jetreduce.runtime.state import StateStore
from jetreduce.worker.agent import Agent
from jetreduce.worker.context import AgentConfig
from support import mapping_record, wait_for

from .test_services import context

pytestmark = pytest.mark.anyio

WORKFLOW = """
name: vouched
map:
  input: "seq 1 3"
  agent_template:
    - shell: "true"
reduce:
  - shell: "true"
"""


def _record(wf: str, *, counted: bool, done: int = 3, dead: int = 0) -> WorkflowRecord:
    return mapping_record(wf, 3, "vouched", done=done, dead=dead, map_counted=counted)


COMPLETE = ev.MapComplete(workflow_id="wf", total=3, done=3, dead=0)


def test_the_record_vouches_only_for_the_counts_it_holds() -> None:
    assert counted_complete(_record("wf", counted=True), COMPLETE)
    assert not counted_complete(_record("wf", counted=False), COMPLETE)  # not counted yet
    assert not counted_complete(None, COMPLETE)
    # Counted, but with another split (a forged event that got the total right):
    assert not counted_complete(_record("wf", counted=True, done=2, dead=1), COMPLETE)
    other_total = msgspec.structs.replace(COMPLETE, total=4, done=4)
    assert not counted_complete(_record("wf", counted=True), other_total)


async def _store_complete(ctx: ServiceContext, wf: str) -> int:
    event = msgspec.structs.replace(COMPLETE, workflow_id=wf)
    ack = await ctx.js.publish(ctx.subjects.map("complete", wf), ev.encode(event))
    return ack.seq


async def test_the_launcher_acts_on_a_vouched_map_complete_without_counting(
    nats_url: str, prefix: str
) -> None:
    async with context(nats_url, prefix) as ctx:
        wf = "wf-vouched"
        seq = await _store_complete(ctx, wf)
        complete = msgspec.structs.replace(COMPLETE, workflow_id=wf)
        assert await map_is_complete(ctx, _record(wf, counted=True), complete, seq)
        assert await is_stored(ctx.js, ctx.subjects.events_stream, ctx.subjects.map("complete", wf))


@pytest.mark.parametrize(
    "record",
    [
        pytest.param({"counted": False}, id="not-counted"),
        pytest.param({"counted": True, "done": 2, "dead": 1}, id="other-split"),
    ],
)
async def test_the_launcher_counts_and_removes_a_map_complete_its_record_does_not_vouch_for(
    nats_url: str, prefix: str, record: dict[str, int]
) -> None:
    async with context(nats_url, prefix) as ctx:
        wf = "wf-unvouched"
        seq = await _store_complete(ctx, wf)
        complete = msgspec.structs.replace(COMPLETE, workflow_id=wf)
        assert not await map_is_complete(ctx, _record(wf, **record), complete, seq)  # type: ignore[arg-type]
        subject = ctx.subjects.map("complete", wf)
        assert not await is_stored(ctx.js, ctx.subjects.events_stream, subject)


async def test_a_reopened_map_is_no_longer_vouched_for(nats_url: str, prefix: str) -> None:
    """A DLQ retry reopens the map: the old count must not vouch for a new ``map.complete``
    (the reopened items have no result yet)."""
    async with context(nats_url, prefix) as ctx:
        state = StateStore(ctx.js, ctx.subjects)
        wf = "wf-reopened"
        assert await state.create(_record(wf, counted=True))
        assert await state.transition(wf, Phase.COMPLETED) is not None
        await state.reopen(wf)
        record = await state.get(wf)
        assert record is not None and record.phase == Phase.MAPPING
        assert not record.map_counted
        assert not counted_complete(record, msgspec.structs.replace(COMPLETE, workflow_id=wf))


async def _map_agent(ctx: ServiceContext, wf: str, *, counted: bool) -> Agent:
    state = StateStore(ctx.js, ctx.subjects)
    spec = StoredSpec(workflow=parse_workflow(WORKFLOW).workflow, options=ev.SubmitOptions())
    await state.put_spec(wf, spec)
    assert await state.create(_record(wf, counted=counted))
    agent = Agent(ctx, AgentConfig(workflow_id=wf, phase="map", index=0), spec)
    agent.total = 3
    await agent._watch_end(also_map_complete=True)
    return agent


async def test_a_map_agent_leaves_on_a_vouched_map_complete(nats_url: str, prefix: str) -> None:
    async with context(nats_url, prefix) as ctx:
        wf = "wf-agent-vouched"
        agent = await _map_agent(ctx, wf, counted=True)
        try:
            await _store_complete(ctx, wf)
            await wait_for(agent.phase_over.is_set, 10)
            assert agent.stop.is_set() and not agent.abort.is_set()
        finally:
            shutil.rmtree(agent.scratch, ignore_errors=True)


async def test_a_map_agent_stays_on_a_map_complete_its_record_does_not_vouch_for(
    nats_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with context(nats_url, prefix) as ctx:
        wf = "wf-agent-unvouched"
        agent = await _map_agent(ctx, wf, counted=False)
        try:
            with caplog.at_level(logging.ERROR, logger="jetreduce.worker.context"):
                await _store_complete(ctx, wf)
                await wait_for(lambda: "false map.complete ignored" in caplog.text, 10)
            assert not agent.phase_over.is_set() and not agent.stop.is_set()
        finally:
            shutil.rmtree(agent.scratch, ignore_errors=True)
