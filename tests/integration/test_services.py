"""Each service against a real JetStream, driven by the events it consumes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from jetreduce.aggregator.service import Aggregator
from jetreduce.cli.submit import SubmitRejected, submit
from jetreduce.contract import events as ev
from jetreduce.contract.records import Phase, StoredSpec, WorkflowRecord
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.lang import parse_workflow
from jetreduce.planner.service import Planner
from jetreduce.runtime.connection import connect
from jetreduce.runtime.service import ServiceContext
from jetreduce.runtime.settings import NatsSettings
from jetreduce.runtime.state import StateStore
from jetreduce.runtime.store import read_subject
from support import mapping_record, wait_for

pytestmark = pytest.mark.anyio

WORKFLOW = """
name: svc
mode: mapreduce
map:
  input: items.json
  agent_template:
    - shell: "echo ${item}"
"""


@contextlib.asynccontextmanager
async def context(nats_url: str, prefix: str) -> AsyncIterator[ServiceContext]:
    nc = await connect(NatsSettings(url=nats_url), forever=False)
    js = nc.jetstream()
    subjects = Subjects(prefix)
    await declare(js, subjects)
    try:
        yield ServiceContext(nc=nc, js=js, subjects=subjects)
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def running(service: Planner | Aggregator) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def count_stored(ctx: ServiceContext, stream: str, subject: str) -> int:
    info = await ctx.js.stream_info(stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def test_planner_rejects_with_every_problem_and_keeps_running(
    nats_url: str, prefix: str
) -> None:
    bad = "name: x\nmode: mapreduce\nmap:\n  max_parallel: abc\n  agent_template:\n    - nope: 1\n"
    async with context(nats_url, prefix) as ctx, running(Planner(ctx)):
        with pytest.raises(SubmitRejected) as info:
            await submit(
                ctx.nc, ctx.subjects, bad, ev.SubmitOptions(), workflow_id="bad-1", source="bad.yml"
            )
        problems = info.value.reply.problems
        paths = {p.path for p in problems}
        assert {"map.input", "map.max_parallel"} <= paths, problems
        assert all(p.line for p in problems)
        # A malformed payload is answered too, and the planner goes on serving.
        inbox = ctx.nc.new_inbox()
        sub = await ctx.nc.subscribe(inbox, max_msgs=1)
        await ctx.js.publish(ctx.subjects.submit, b"{not json", headers={ev.REPLY_HEADER: inbox})
        reply = msgspec.json.decode((await sub.next_msg(timeout=10)).data, type=ev.SubmitReply)
        assert not reply.accepted and "malformed" in reply.problems[0].message
        ok = await submit(
            ctx.nc, ctx.subjects, WORKFLOW, ev.SubmitOptions(), workflow_id="good-1", source="t"
        )
        assert ok.accepted
        rejected = await ctx.js.get_last_msg(
            ctx.subjects.events_stream, ctx.subjects.workflow("rejected", "bad-1")
        )
        assert isinstance(ev.decode(rejected.data), ev.WorkflowRejected)


async def test_planner_refuses_bad_handlers_and_pipeline_expressions(
    nats_url: str, prefix: str
) -> None:
    """Submit checks what ``validate`` checks (issue 16: these used to be accepted)."""
    bad = (
        "name: x\nmap:\n  input: items.json\n  sort_by: 'score SIDEWAYS'\n  agent_template:\n"
        "    - shell: make\n      on_failure:\n        - shell: 'echo handler'\n"
    )
    async with context(nats_url, prefix) as ctx, running(Planner(ctx)):
        with pytest.raises(SubmitRejected) as info:
            await submit(
                ctx.nc, ctx.subjects, bad, ev.SubmitOptions(), workflow_id="bad-2", source="b.yml"
            )
    problems = {(p.path, p.line, p.column) for p in info.value.reply.problems}
    assert problems == {
        ("map.sort_by", 4, 12),
        ("map.agent_template[0].on_failure[0]", 8, 11),
    }


async def test_a_deeply_nested_workflow_object_is_rejected_not_crashed_on(
    nats_url: str, prefix: str
) -> None:
    """The object form of ``workflow`` is hostile input too: 600 levels of nesting get a
    rejection (it used to die of RecursionError in yaml.safe_dump: no reply at all)."""
    deep = '{"k": ' * 600 + '"x"' + "}" * 600  # within msgspec's limit, past yaml's
    payload = (
        '{"type": "workflow.submit", "workflow_id": "deep-1", '
        f'"workflow": {{"name": "d", "x": {deep}}}}}'
    ).encode()
    async with context(nats_url, prefix) as ctx, running(Planner(ctx)):
        inbox = ctx.nc.new_inbox()
        sub = await ctx.nc.subscribe(inbox, max_msgs=1)
        await ctx.js.publish(ctx.subjects.submit, payload, headers={ev.REPLY_HEADER: inbox})
        reply = msgspec.json.decode((await sub.next_msg(timeout=10)).data, type=ev.SubmitReply)
    assert not reply.accepted
    assert any("nesting" in p.message for p in reply.problems), reply.problems


async def test_a_workflow_is_planning_while_its_input_is_expanded(
    nats_url: str, prefix: str
) -> None:
    """The record says ``planning`` between setup and mapping (expanding a million items
    takes minutes, and ``status`` used to say ``setup`` all along): its revisions, in order."""
    async with context(nats_url, prefix) as ctx, running(Planner(ctx)):
        wf = "wf-planning"
        reply = await submit(
            ctx.nc, ctx.subjects, WORKFLOW, ev.SubmitOptions(), workflow_id=wf, source="t"
        )
        assert reply.accepted
        state = StateStore(ctx.js, ctx.subjects)
        assert await state.transition(wf, Phase.SETUP) is not None  # as the launcher does
        store = await ctx.js.object_store(ctx.subjects.objects_bucket)
        await store.put(f"input/{wf}", b"[1, 2, 3]")
        setup = ev.SetupCompleted(workflow_id=wf, input_object=f"input/{wf}")
        await ctx.js.publish(ctx.subjects.setup("completed", wf), ev.encode(setup))

        async def mapping() -> bool:
            rec = await state.get(wf)
            return rec is not None and rec.phase == Phase.MAPPING

        await wait_for(mapping, 10)
        # The record's revisions as stored (the bucket keeps 5), read in stream order: what
        # nats-py's kv.history() returns, without its watcher, which once found no entry
        # at all on a loaded machine (fresh clone 27).
        bucket = ctx.subjects.workflows_bucket
        revisions = await read_subject(ctx.js, f"KV_{bucket}", f"$KV.{bucket}.{wf}")
        phases = [msgspec.json.decode(m.data, type=WorkflowRecord).phase for m in revisions]
    assert phases == [Phase.ACCEPTED, Phase.SETUP, Phase.PLANNING, Phase.MAPPING], phases


async def test_resubmit_and_replanning_enqueue_each_item_once(nats_url: str, prefix: str) -> None:
    async with context(nats_url, prefix) as ctx, running(Planner(ctx)):
        for _ in range(2):  # the same id twice: one record, one accepted event
            reply = await submit(
                ctx.nc,
                ctx.subjects,
                WORKFLOW,
                ev.SubmitOptions(),
                workflow_id="wf-idem",
                source="t",
            )
            assert reply.accepted
        store = await ctx.js.object_store(ctx.subjects.objects_bucket)
        await store.put("input/wf-idem", b"[1, 2, 3, 4, 5]")
        setup = ev.SetupCompleted(workflow_id="wf-idem", input_object="input/wf-idem")
        # setup.completed delivered twice (a redelivery, or a restarted setup agent).
        for _ in range(2):
            await ctx.js.publish(ctx.subjects.setup("completed", "wf-idem"), ev.encode(setup))
        state = StateStore(ctx.js, ctx.subjects)

        async def planned() -> bool:
            rec = await state.get("wf-idem")
            return rec is not None and rec.total == 5

        await wait_for(planned, 10)
        work = ctx.subjects.work_of("wf-idem")
        await wait_for(lambda: count_stored(ctx, ctx.subjects.work_stream, work), 10)
        # Give the second (duplicate) planning a chance to run, then count: still 5.
        await wait_for(_consumer_acked_all(ctx, "planner-setup"), 10)
        assert await count_stored(ctx, ctx.subjects.work_stream, work) == 5
        accepted = ctx.subjects.workflow("accepted", "*")
        assert await count_stored(ctx, ctx.subjects.events_stream, accepted) == 1


def _consumer_acked_all(ctx: ServiceContext, durable: str):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        info = await ctx.js.consumer_info(ctx.subjects.events_stream, durable)
        return info.num_pending == 0 and info.num_ack_pending == 0

    return check


async def test_aggregator_completes_once_despite_duplicate_results(
    nats_url: str, prefix: str
) -> None:
    async with context(nats_url, prefix) as ctx:
        state = StateStore(ctx.js, ctx.subjects)
        wf = "wf-agg"
        spec = StoredSpec(workflow=parse_workflow(WORKFLOW).workflow, options=ev.SubmitOptions())
        await state.put_spec(wf, spec)
        await state.create(mapping_record(wf, 3, "agg"))

        async def result(index: int) -> None:
            done = ev.ItemDone(
                workflow_id=wf,
                index=index,
                item_id=f"item_{index}",
                output="",
                exit_code=0,
                duration_s=0.0,
                attempts=1,
            )
            # A plain publish, bypassing the create-only guard: the worst a buggy or
            # replayed agent could do. The count must still be per item.
            await ctx.js.publish(ctx.subjects.item_done(wf, index), ev.encode(done))

        async with running(Aggregator(ctx)):
            await ctx.js.publish(
                ctx.subjects.workflow("planned", wf),
                ev.encode(ev.WorkflowPlanned(workflow_id=wf, total=3, max_parallel=1)),
            )
            for index in (0, 0, 1, 1, 1):
                await result(index)
            progress = ctx.subjects.progress(wf)

            async def saw_two() -> bool:
                try:
                    msg = await ctx.js.get_last_msg(ctx.subjects.progress_stream, progress)
                except Exception:
                    return False
                event = ev.decode(msg.data)
                return isinstance(event, ev.Progress) and event.done == 2

            await wait_for(saw_two, 10)
            complete = ctx.subjects.map("complete", wf)
            assert await count_stored(ctx, ctx.subjects.events_stream, complete) == 0
            await result(2)
            await result(2)
            await wait_for(
                lambda: count_stored(
                    ctx, ctx.subjects.events_stream, ctx.subjects.workflow("completed", wf)
                ),
                10,
            )
        assert await count_stored(ctx, ctx.subjects.events_stream, complete) == 1
        msg = await ctx.js.get_last_msg(ctx.subjects.events_stream, complete)
        event = ev.decode(msg.data)
        assert isinstance(event, ev.MapComplete) and (event.done, event.dead) == (3, 0)
        record = await state.get(wf)
        assert record is not None and record.phase == Phase.COMPLETED

        # A restarted aggregator sees the same stream and does not complete again.
        async with running(Aggregator(ctx)):
            await ctx.js.publish(
                ctx.subjects.workflow("planned", wf),
                ev.encode(ev.WorkflowPlanned(workflow_id=wf, total=3, max_parallel=1)),
            )
            await wait_for(_consumer_acked_all(ctx, "aggregator"), 10)
        assert await count_stored(ctx, ctx.subjects.events_stream, complete) == 1


async def test_an_event_on_another_workflows_subject_is_refused(nats_url: str, prefix: str) -> None:
    """``setup.failed.<A>`` carrying workflow B's id must not fail B: the aggregator
    terminates it as malformed (the subject's id and the payload's must agree)."""
    async with context(nats_url, prefix) as ctx:
        state = StateStore(ctx.js, ctx.subjects)
        now = time.time()
        for wf in ("victim", "other"):
            await state.create(
                WorkflowRecord(
                    workflow_id=wf, name=wf, phase=Phase.SETUP, created_ts=now, updated_ts=now
                )
            )
        async with running(Aggregator(ctx)):
            forged = ev.SetupFailed(workflow_id="victim", error="forged")
            await ctx.js.publish(ctx.subjects.setup("failed", "other"), ev.encode(forged))
            real = ev.SetupFailed(workflow_id="other", error="real")
            await ctx.js.publish(ctx.subjects.setup("failed", "other"), ev.encode(real))

            async def other_failed() -> bool:
                record = await state.get("other")
                return record is not None and record.phase == Phase.FAILED

            # One consumer, in stream order: once the real one is handled, so was the forgery.
            await wait_for(other_failed, timeout_s=10)
        victim = await state.get("victim")
    assert victim is not None and victim.phase == Phase.SETUP


async def test_planner_rejects_a_workdir_agents_cannot_use(
    nats_url: str, prefix: str, tmp_path: Path
) -> None:
    """Local backend: a missing or unreadable ``workdir`` is a problem in the reply, not a
    setup agent restarted until it gives up (issue 13)."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0)
    async with context(nats_url, prefix) as ctx, running(Planner(ctx, local_workdirs=True)):
        for n, workdir in enumerate([tmp_path / "missing", tmp_path / "a-file", locked]):
            if workdir.name == "a-file":
                workdir.write_text("")
            if workdir == locked and os.access(locked, os.R_OK):
                continue  # root reads anything: nothing to prove here
            with pytest.raises(SubmitRejected) as info:
                await submit(
                    ctx.nc,
                    ctx.subjects,
                    WORKFLOW,
                    ev.SubmitOptions(workdir=str(workdir)),
                    workflow_id=f"wd-{n}",
                    source="t",
                )
            (problem,) = info.value.reply.problems
            assert problem.path == "options.workdir" and str(workdir) in problem.message
        ok = await submit(
            ctx.nc,
            ctx.subjects,
            WORKFLOW,
            ev.SubmitOptions(workdir=str(tmp_path)),
            workflow_id="wd-ok",
            source="t",
        )
        assert ok.accepted
    locked.chmod(0o700)
