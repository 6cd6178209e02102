"""Hostile payloads through real JetStream (issue 8, invariant 5): garbage published on every
subject a service consumes is settled at once (terminated or acknowledged, never redelivered),
the services stay up, a valid workflow then runs to completion, and invalid submissions get a
rejection. Real nats-server, real services, agents as child processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from helpers import services
from jetreduce.cli.submit import SubmitRejected, submit
from jetreduce.contract import events as ev
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.runtime.connection import connect
from jetreduce.runtime.service import EventConsumer, Retry, ServiceContext
from jetreduce.runtime.settings import NatsSettings
from support import wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]

GHOST = "wf-ghost"
"""The workflow the garbage claims to be about (it does not exist)."""

WORKFLOW = """
name: after-garbage
mode: mapreduce
map:
  input: items.json
  json_path: "$.items[*]"
  max_parallel: 2
  agent_template:
    - shell: "echo ${item.n}"
reduce:
  - shell: "echo ${map.successful}/${map.total}"
"""


def garbage() -> list[bytes]:
    """Malformed JSON, wrong types, missing fields, deep nesting, a large payload, invalid
    UTF-8, hostile ids, and well-formed events of the wrong type."""
    hostile_ids = ["", "a.b", "*", ">", "wf x", "ü", "wf\n", "x" * 10_000]
    payloads = [
        b"",
        b"{not json",
        b"null",
        b"[]",
        b'"a string"',
        b"\xff\xfe\x00",
        b'{"type":"no.such.type","workflow_id":"wf-ghost"}',
        b'{"type":"map.complete","workflow_id":"wf-ghost"}',  # missing fields
        b'{"type":"map.complete","workflow_id":"wf-ghost","total":"x","done":[],"dead":{}}',
        b'{"type":"workflow.retry","workflow_id":"wf-ghost","indices":[-1, 1e400]}',
        b'{"type":"work.item","workflow_id":"wf-ghost","index":0,"item":'
        + b"[" * 50_000
        + b"]" * 50_000
        + b"}",
        b'{"type":"setup.failed","workflow_id":"wf-ghost","error":"' + b"x" * 500_000 + b'"}',
        ev.encode(ev.ReduceStarted(workflow_id=GHOST)),  # valid, but the wrong type
        ev.encode(ev.WorkflowCancelRequested(workflow_id=GHOST)),  # valid, unknown workflow
    ]
    for wf in hostile_ids:
        payloads.append(ev.encode(ev.SetupFailed(workflow_id=wf, error="spoofed")))
        payloads.append(ev.encode(ev.MapComplete(workflow_id=wf, total=1, done=1, dead=0)))
        payloads.append(ev.encode(ev.WorkflowCancelRequested(workflow_id=wf)))
    return payloads


def consumed_subjects(s: Subjects) -> list[str]:
    """Every subject a service consumes (see each service's EventConsumer filters)."""
    wf = GHOST
    return [
        s.submit,
        *(s.workflow(e, wf) for e in ("accepted", "planned", "reopened", "retry", "cancel")),
        *s.workflow_ends(wf),
        s.setup("completed", wf),
        s.setup("failed", wf),
        s.map("complete", wf),
        s.map("failed", wf),
        s.reduce("completed", wf),
        s.reduce("failed", wf),
        s.agent("exited", wf),
        s.item_failed(wf, 0),
    ]


DURABLES = {
    "planner-submit": "submit_stream",
    "planner-setup": "events_stream",
    "launcher": "events_stream",
    "aggregator": "events_stream",
    "janitor": "events_stream",
    "janitor-advisories": "advisories_stream",
}


async def all_settled(js: Any, s: Subjects) -> bool:
    for durable, stream in DURABLES.items():
        info = await js.consumer_info(getattr(s, stream), durable)
        if info.num_pending or info.num_ack_pending:
            return False
    return True


async def test_services_survive_garbage_then_run_a_workflow(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    (workdir / "items.json").write_text(json.dumps({"items": [{"n": i} for i in range(5)]}))
    async with services(nats_url, prefix, tmp_path) as h:
        js = h.nc.jetstream()
        s = h.subjects
        # Wait for every service's durable consumer, so none starts after the garbage.
        await wait_for(lambda: _consumers_exist(js, s), 30)
        sent = 0
        for subject in consumed_subjects(s):
            for payload in garbage():
                await js.publish(subject, payload)
                sent += 1
        advisory = s.max_deliveries_advisories.replace("*", "garbage")
        for payload in [b"{not json", b'{"stream_seq": "x"}', b'{"stream_seq": 99999999}']:
            await js.publish(advisory, payload)
        await wait_for(lambda: all_settled(js, s), 60, every_s=0.2)
        for durable, stream in DURABLES.items():
            info = await js.consumer_info(getattr(s, stream), durable)
            # Settled on the first delivery: terminated (BadEvent) or acknowledged, no retries.
            assert info.num_redelivered == 0, (durable, info)

        # Invalid submissions are answered with a rejection (reply and event).
        with pytest.raises(SubmitRejected) as info:
            await submit(h.nc, s, "name: [", ev.SubmitOptions(), workflow_id="bad-1", source="t")
        assert info.value.reply.problems and info.value.reply.problems[0].line == 1
        rejected = await js.get_last_msg(s.events_stream, s.workflow("rejected", "bad-1"))
        assert isinstance(ev.decode(rejected.data), ev.WorkflowRejected)
        for hostile in ["a.b", "*", ">", "wf x", "ü", "x" * 10_000]:
            reply = await _raw_submit(
                h.nc, s, ev.WorkflowSubmit(workflow=WORKFLOW, workflow_id=hostile)
            )
            assert not reply.accepted
            assert reply.problems[0].path == "workflow_id", reply

        # ...and a valid workflow still runs, start to finish.
        done = await h.run(WORKFLOW, workdir, timeout_s=120)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        assert (done.total, done.done, done.dead) == (5, 5, 0)
        assert done.reduce_output.strip() == "5/5"
        assert sent > 100


async def _consumers_exist(js: Any, s: Subjects) -> bool:
    try:
        for durable, stream in DURABLES.items():
            await js.consumer_info(getattr(s, stream), durable)
    except Exception:
        return False
    return True


async def _raw_submit(nc: Any, s: Subjects, event: ev.WorkflowSubmit) -> ev.SubmitReply:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, max_msgs=1)
    try:
        await nc.jetstream().publish(s.submit, ev.encode(event), headers={ev.REPLY_HEADER: inbox})
        msg = await sub.next_msg(timeout=30)
    finally:
        await sub.unsubscribe()
    return msgspec.json.decode(msg.data, type=ev.SubmitReply)


# -- the service loop's handling of poison messages --------------------------------------------


@contextlib.asynccontextmanager
async def consumer_on(
    nats_url: str, prefix: str, handler: Any, *, max_deliver: int
) -> AsyncIterator[tuple[ServiceContext, EventConsumer]]:
    nc = await connect(NatsSettings(url=nats_url), forever=False)
    s = Subjects(prefix)
    await declare(nc.jetstream(), s)
    ctx = ServiceContext(nc=nc, js=nc.jetstream(), subjects=s)
    consumer = EventConsumer(
        ctx,
        stream=s.events_stream,
        durable="poison-test",
        filters=[s.workflow("failed", "*")],
        handler=handler,
        max_deliver=max_deliver,
        ack_wait_s=30,
    )
    await consumer.ensure()  # so the first consumer_info of a test finds it
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        yield ctx, consumer
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await nc.close()


async def _settled(ctx: ServiceContext) -> bool:
    info = await ctx.js.consumer_info(ctx.subjects.events_stream, "poison-test")
    return not info.num_pending and not info.num_ack_pending


@pytest.mark.parametrize("failure", ["crash", "retry"])
async def test_a_handler_that_always_fails_is_terminated_after_max_deliver(
    nats_url: str, prefix: str, failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    async def handler(msg: Any) -> None:
        calls.append(msg.metadata.num_delivered)
        if failure == "crash":
            raise RuntimeError("poison")
        raise Retry("poison", delay_s=0.1)

    caplog.set_level(logging.INFO, logger="jetreduce.runtime.service")
    async with consumer_on(nats_url, prefix, handler, max_deliver=2) as (ctx, _):
        event = ev.WorkflowFailed(workflow_id="wf-p", reason="x")
        await ctx.js.publish(ctx.subjects.workflow("failed", "wf-p"), ev.encode(event))
        # Both deliveries first (right after the publish the consumer can still read as
        # settled), then settled: no third one.
        await wait_for(lambda: len(calls) >= 2, 30, every_s=0.05)
        await wait_for(lambda: _settled(ctx), 30, every_s=0.1)
        assert calls == [1, 2]
    dropped = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert dropped and (
        "giving up" in dropped[-1].getMessage() or "dropping" in dropped[-1].getMessage()
    )


async def test_a_bad_event_is_terminated_on_its_first_delivery(nats_url: str, prefix: str) -> None:
    calls: list[int] = []

    async def handler(msg: Any) -> None:
        calls.append(msg.metadata.num_delivered)
        ev.decode(msg.data)

    async with consumer_on(nats_url, prefix, handler, max_deliver=20) as (ctx, _):
        subject = ctx.subjects.workflow("failed", "wf-p")
        for payload in (
            b'{"type":"workflow.failed","workflow_id":"\xff","reason":""}',  # bad UTF-8
            b'{"type":"workflow.failed","workflow_id":"wf-p","reason":' + b"[" * 100_000,
            ev.encode(ev.WorkflowFailed(workflow_id="a.b", reason="")),
            b"{not json",
        ):
            await ctx.js.publish(subject, payload)
        await wait_for(lambda: _settled(ctx), 30, every_s=0.1)
        info = await ctx.js.consumer_info(ctx.subjects.events_stream, "poison-test")
        assert calls == [1, 1, 1, 1] and info.num_redelivered == 0
