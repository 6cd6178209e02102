"""``workflow.completed`` carries the map agents' utilisation (issue 17): the sum of every
``agent.usage`` report stored for the workflow. Without a reduce, the workflow ends right after
``map.complete``, while its map agents are still leaving: the aggregator waits for the reports
of the agents launched (``agent.launched`` of phase map, plus restarts) as they are stored,
for at most its bound, then ends the workflow with what arrived.

Against a server with per-role users: the reports are published as the agents role (which
may), the launcher's events and results as the services and agents publish them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import connected_as, stored_or_refused
from jetreduce.aggregator.service import Aggregator
from jetreduce.contract import events as ev
from jetreduce.contract.records import Phase, StoredSpec, WorkflowRecord
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.embedded import EmbeddedServer, role_settings
from jetreduce.lang import parse_workflow
from jetreduce.runtime.connection import connect
from jetreduce.runtime.publish import is_stored
from jetreduce.runtime.service import ServiceContext
from jetreduce.runtime.settings import NatsSettings
from jetreduce.runtime.state import StateStore

from .test_aggregator_replicas import _mapping
from .test_services import running

pytestmark = pytest.mark.anyio


@pytest.fixture
def server(tmp_path: Path, prefix: str) -> Iterator[EmbeddedServer]:
    with EmbeddedServer(tmp_path / "nats", roles=prefix) as srv:
        yield srv


@contextlib.asynccontextmanager
async def as_services(server: EmbeddedServer, prefix: str) -> AsyncIterator[ServiceContext]:
    settings = role_settings(server.data_dir, "services", NatsSettings(url=server.url))
    assert settings is not None
    nc = await connect(settings, forever=False)
    subjects = Subjects(prefix)
    try:
        await declare(nc.jetstream(), subjects)
        yield ServiceContext(nc=nc, js=nc.jetstream(), subjects=subjects)
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def as_agent(server: EmbeddedServer) -> AsyncIterator[tuple[Any, list[str]]]:
    env = dict(line.split("=", 1) for line in (server.data_dir / "agents.env").read_text().split())
    user, password = env["JETREDUCE_NATS_USER"], env["JETREDUCE_NATS_PASSWORD"]
    async with connected_as(server.url, user, password) as (nc, errors):
        yield nc, errors


def _usage(wf: str, index: int, held_s: float, busy_s: float) -> bytes:
    return ev.encode(
        ev.AgentUsage(
            workflow_id=wf,
            phase="map",
            agent=f"host/map-{index}",
            index=index,
            slots=2,
            held_s=held_s,
            busy_s=busy_s,
            items=1,
        )
    )


async def _launched(ctx: ServiceContext, wf: str, agents: int) -> None:
    """What the launcher publishes as it starts a workflow's map agents."""
    launched = ev.AgentLaunched(
        workflow_id=wf, phase="map", agents=agents, slots=2 * agents, backend="local"
    )
    await ctx.js.publish(ctx.subjects.agent("launched", wf), ev.encode(launched))


async def _results(nc: Any, errors: list[str], s: Subjects, wf: str, n: int) -> None:
    for index in range(n):
        done = ev.ItemDone(
            workflow_id=wf,
            index=index,
            item_id=f"item_{index}",
            output="",
            exit_code=0,
            duration_s=0.0,
            attempts=1,
            agent="host/map-0",
        )
        assert await stored_or_refused(nc, errors, s.item_done(wf, index), ev.encode(done))


async def test_workflow_completed_sums_every_report_and_waits_for_a_late_one(
    server: EmbeddedServer, prefix: str
) -> None:
    async with as_services(server, prefix) as ctx, as_agent(server) as (agent, errors):
        s, state, wf = ctx.subjects, StateStore(ctx.js, ctx.subjects), "wf-usage"
        # A bound far longer than the test waits: the late report must end the wait.
        async with running(Aggregator(ctx, rescan_s=0.2, usage_wait_s=30)):
            complete = await ctx.nc.subscribe(s.map("complete", wf), max_msgs=1)
            completed = await ctx.nc.subscribe(s.workflow("completed", wf), max_msgs=1)
            await _mapping(state, wf, 2)  # a map without a reduce
            await _launched(ctx, wf, 2)
            # Agent 1 was killed after reporting and restarted: its new run reports again.
            usage = s.agent("usage", wf)
            assert await stored_or_refused(agent, errors, usage, _usage(wf, 0, 10, 8))
            assert await stored_or_refused(agent, errors, usage, _usage(wf, 1, 4, 1))
            exited = ev.AgentExited(
                workflow_id=wf, phase="map", index=1, exit_code=-9, restarted=True, remaining=2
            )
            await ctx.js.publish(s.agent("exited", wf), ev.encode(exited))
            await _results(agent, errors, s, wf, 2)

            await complete.next_msg(timeout=10)
            # Expected 3 reports, 2 stored: the restarted agent is still leaving.
            assert not await is_stored(ctx.js, s.events_stream, s.workflow("completed", wf))
            late = _usage(wf, 1, 6, 5)
            reported = time.monotonic()
            assert await stored_or_refused(agent, errors, usage, late)
            msg = await completed.next_msg(timeout=10)
            waited = time.monotonic() - reported
    done = ev.decode_as(msg.data, ev.WorkflowCompleted)
    assert (done.total, done.done, done.dead) == (2, 2, 0)
    assert (done.busy_slot_s, done.held_slot_s) == (14.0, 20.0)
    assert done.utilisation == 0.7
    assert waited < 2.0, waited  # on the report's arrival, not at the 30 s bound


async def test_a_report_that_never_comes_holds_the_end_only_for_the_bound(
    server: EmbeddedServer, prefix: str
) -> None:
    bound_s = 0.3
    async with as_services(server, prefix) as ctx, as_agent(server) as (agent, errors):
        s, state, wf = ctx.subjects, StateStore(ctx.js, ctx.subjects), "wf-silent"
        async with running(Aggregator(ctx, rescan_s=0.2, usage_wait_s=bound_s)):
            completed = await ctx.nc.subscribe(s.workflow("completed", wf), max_msgs=1)
            await _mapping(state, wf, 1)
            await _launched(ctx, wf, 1)  # killed without a word: it never reports
            await _results(agent, errors, s, wf, 1)
            msg = await completed.next_msg(timeout=10)
        ended = await ctx.js.get_last_msg(s.events_stream, s.workflow("completed", wf))
        mapped = await ctx.js.get_last_msg(s.events_stream, s.map("complete", wf))
    done = ev.decode_as(msg.data, ev.WorkflowCompleted)
    assert (done.total, done.done) == (1, 1)
    assert (done.utilisation, done.busy_slot_s, done.held_slot_s) == (None, 0.0, 0.0)
    assert ended.time is not None and mapped.time is not None
    held_up = (ended.time - mapped.time).total_seconds()
    assert bound_s <= held_up < bound_s + 2.0, held_up


WITH_REDUCE = """
name: reduced
map:
  input: items.json
  agent_template:
    - shell: "echo ${item}"
reduce:
  - shell: "echo done"
"""


async def test_after_a_reduce_a_missing_report_is_awaited_only_within_the_bound(
    server: EmbeddedServer, prefix: str
) -> None:
    """The reduce starts while map agents may still be leaving (the launcher does not wait
    for them), so a report missing at the end is awaited, but only for the bound: one agent
    that never reports does not hold the workflow's end."""
    async with as_services(server, prefix) as ctx, as_agent(server) as (agent, errors):
        s, state, wf = ctx.subjects, StateStore(ctx.js, ctx.subjects), "wf-reduced"
        spec = StoredSpec(workflow=parse_workflow(WITH_REDUCE).workflow, options=ev.SubmitOptions())
        await state.put_spec(wf, spec)
        now = time.time()
        record = WorkflowRecord(
            workflow_id=wf, name="reduced", phase=Phase.REDUCING, created_ts=now, updated_ts=now
        )
        record.total, record.done = 1, 1
        assert await state.create(record)
        async with running(Aggregator(ctx, rescan_s=0.2, usage_wait_s=1.0)):
            completed = await ctx.nc.subscribe(s.workflow("completed", wf), max_msgs=1)
            await _launched(ctx, wf, 2)
            usage = s.agent("usage", wf)
            assert await stored_or_refused(agent, errors, usage, _usage(wf, 0, 8, 2))
            reduced = ev.ReduceCompleted(workflow_id=wf, output="done", duration_s=0.1)
            assert await stored_or_refused(
                agent, errors, s.reduce("completed", wf), ev.encode(reduced)
            )
            msg = await completed.next_msg(timeout=5)
    done = ev.decode_as(msg.data, ev.WorkflowCompleted)
    assert (done.total, done.done, done.reduce_output) == (1, 1, "done")
    assert (done.utilisation, done.busy_slot_s, done.held_slot_s) == (0.25, 2.0, 8.0)
