"""Scenarios that time one part of the path: planning + enqueueing (``enqueue``) and one
item's way from the queue to an idle agent (``latency``)."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

from jetreduce.cli.submit import submit
from jetreduce.contract import events as ev
from jetreduce.contract.events import SetupCompleted, SubmitOptions, WorkflowPlanned, WorkItem
from jetreduce.contract.objects import input_object
from jetreduce.contract.records import Phase, StoredSpec, WorkflowRecord
from jetreduce.contract.subjects import Subjects
from jetreduce.lang import parse_workflow
from jetreduce.queues.jetstream import JetStreamQueue
from jetreduce.runtime.publish import publish_once
from jetreduce.runtime.service import ServiceContext
from jetreduce.runtime.state import StateStore
from loadtest import ceilings
from loadtest.common import (
    DONE_DECODER,
    Recorder,
    Run,
    bound,
    connect_harness,
    noop_workflow,
    pcts,
)
from loadtest.infra import nats_server, profiled, services_process
from loadtest.report import Result

__all__ = ["enqueue", "latency"]


# -- 1. enqueue ----------------------------------------------------------------------------------
def enqueue(run: Run) -> Result:
    """Planning + enqueueing ``n`` items through the real planner.

    Only the planner runs (no launcher, so no agent consumes while we count). The harness
    plays the setup agent: it stores the ``seq`` output in the object store and publishes
    ``setup.completed``; the planner then reads it, runs the input pipeline, moves the record
    to MAPPING, prepares the consumer, announces ``workflow.planned`` and enqueues. Timed:
    ``setup.completed`` published → the work consumer holds ``n`` pending messages. Beside it,
    ``JetStreamQueue.enqueue`` alone (the planner's publish path without planning).
    """
    n = run.size(100_000, 10_000)
    ceil = ceilings.measure(run.quick)
    start = time.monotonic()
    with (
        nats_server() as server,
        services_process(server.url, services="planner") as svc,
        profiled(svc.pid, run.profile("enqueue")),
    ):
        d = asyncio.run(_enqueue(server.url, n))
        d["services_peak_rss_mb"] = round(svc.peak_rss_mb(), 1)
    rate = n / d["planner_s"]
    ratio = rate / ceil.publish_per_s
    return Result(
        name="enqueue",
        figure=round(rate),
        unit="items/s",
        ceiling=round(ceil.publish_per_s),
        ceiling_what="publish_async",
        ratio=round(ratio, 3),
        target="ratio ≥ 0.8",
        passed=ratio >= 0.8,
        wall_s=round(time.monotonic() - start, 1),
        params={"items": n},
        details=d,
        summary=f"{rate:,.0f} items/s planned+enqueued ({n:,} in {d['planner_s']:.1f} s); "
        f"queue.enqueue alone {d['queue_enqueue_per_s']:,.0f}/s",
        quick=run.quick,
    )


async def _enqueue(url: str, n: int) -> dict[str, Any]:
    nc = await connect_harness(url)
    try:
        js = nc.jetstream()
        s = Subjects("")
        wf = f"enq-{secrets.token_hex(4)}"
        await submit(
            nc, s, noop_workflow(n, 50), SubmitOptions(), workflow_id=wf, source="loadtest"
        )
        data = b"".join(b"%d\n" % i for i in range(1, n + 1))
        store = await js.object_store(s.objects_bucket)
        await store.put(input_object(wf), data)
        planned = asyncio.get_running_loop().create_future()

        async def on_planned(_msg: Any) -> None:
            if not planned.done():
                planned.set_result(time.perf_counter())

        sub = await nc.subscribe(s.workflow("planned", wf), cb=on_planned)
        t0 = time.perf_counter()
        await publish_once(
            js,
            s.setup("completed", wf),
            ev.encode(
                SetupCompleted(
                    workflow_id=wf,
                    input_object=input_object(wf),
                    input_is_command=True,
                    input_bytes=len(data),
                )
            ),
        )
        t_planned = await asyncio.wait_for(planned, bound(n))
        deadline = time.monotonic() + bound(n)
        pending = 0
        while time.monotonic() < deadline:
            info = await js.consumer_info(s.work_stream, s.work_consumer(wf))
            pending = info.num_pending or 0
            if pending >= n:
                break
            await asyncio.sleep(0.02)
        t_end = time.perf_counter()
        await sub.unsubscribe()
        if pending < n:
            raise TimeoutError(f"only {pending} of {n} items enqueued in time")
        # The adapter alone, same server, another workflow's subjects.
        queue = JetStreamQueue(ServiceContext(nc=nc, js=js, subjects=s), f"{wf}-q")
        items = [WorkItem(workflow_id=f"{wf}-q", index=i, item=i + 1) for i in range(n)]
        t1 = time.perf_counter()
        await asyncio.wait_for(queue.enqueue(items), bound(n))
        q_s = time.perf_counter() - t1
        return {
            "planner_s": round(t_end - t0, 3),
            "to_planned_s": round(t_planned - t0, 3),
            "enqueue_after_planned_s": round(t_end - t_planned, 3),
            "queue_enqueue_s": round(q_s, 3),
            "queue_enqueue_per_s": round(n / q_s),
        }
    finally:
        await nc.close()


# -- 3. latency ----------------------------------------------------------------------------------
LATENCY_PARALLEL = 4


def latency(run: Run) -> Result:
    """Idle agents, items enqueued one at a time, each after the previous one finished.

    The planner is bypassed (it enqueues a whole plan at once): the harness creates the
    workflow record (MAPPING, total = n), prepares the queue and publishes
    ``workflow.planned``, so the real launcher starts the agents and the real aggregator
    finishes the workflow. It waits until every agent process has a pull request waiting
    (``num_waiting``), then enqueues one item at a time via ``JetStreamQueue.enqueue``.
    Measured: ``ItemDone.ts - WorkItem.ts`` — from just before the enqueue publish to the
    agent having leased, decoded and "run" the empty template (the step list is empty, so
    this is enqueue → agent start plus the cost of building the result); also the full round
    trip to the harness seeing ``item.done``.
    """
    n = run.size(1_000, 200)
    start = time.monotonic()
    with (
        nats_server() as server,
        services_process(server.url) as svc,
        profiled(svc.pid, run.profile("latency")),
    ):
        d = asyncio.run(_latency(server.url, n, run.workdir))
    p99 = d["agent_start_ms"]["p99"]
    return Result(
        name="latency",
        figure=p99,
        unit="ms p99",
        ceiling=None,
        ceiling_what="",
        ratio=None,
        target="p99 ≤ 10 ms",
        passed=p99 <= 10.0,
        wall_s=round(time.monotonic() - start, 1),
        params={"items": n, "agents_slots": LATENCY_PARALLEL},
        details=d,
        summary=f"enqueue→agent p50 {d['agent_start_ms']['p50']:.2f} ms, p99 {p99:.2f} ms "
        f"(round trip p99 {d['round_trip_ms']['p99']:.2f} ms)",
        quick=run.quick,
    )


async def _latency(url: str, n: int, workdir: Path) -> dict[str, Any]:
    nc = await connect_harness(url)
    try:
        js = nc.jetstream()
        s = Subjects("")
        ctx = ServiceContext(nc=nc, js=js, subjects=s)
        wf = f"lat-{secrets.token_hex(4)}"
        text = noop_workflow(n, LATENCY_PARALLEL)
        parsed = parse_workflow(text, env={}, source="loadtest")
        options = SubmitOptions(workdir=str(workdir), max_parallel=LATENCY_PARALLEL)
        state = StateStore(js, s)
        await state.put_spec(wf, StoredSpec(workflow=parsed.workflow, options=options))
        now = time.time()
        await state.create(
            WorkflowRecord(
                workflow_id=wf,
                name=parsed.workflow.name,
                phase=Phase.MAPPING,
                created_ts=now,
                updated_ts=now,
                total=n,
                max_parallel=LATENCY_PARALLEL,
            )
        )
        queue = JetStreamQueue(ctx, wf)
        await queue.prepare(visibility_s=30.0, max_attempts=3, parallel=LATENCY_PARALLEL)
        rec = await Recorder(nc, s, wf, items=True).start()
        await publish_once(
            js,
            s.workflow("planned", wf),
            ev.encode(WorkflowPlanned(workflow_id=wf, total=n, max_parallel=LATENCY_PARALLEL)),
        )
        # Idle agents: wait until each agent process has a fetch waiting on the consumer.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = await js.consumer_info(s.work_stream, s.work_consumer(wf))
            if (info.num_waiting or 0) >= 2:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        loop = asyncio.get_running_loop()
        starts: list[float] = []
        trips: list[float] = []
        for i in range(n):
            fut: asyncio.Future[tuple[float, bytes]] = loop.create_future()
            rec.item_waiters[i] = fut
            item = WorkItem(workflow_id=wf, index=i, item=i + 1)
            await queue.enqueue([item])
            seen, data = await asyncio.wait_for(fut, 10)
            done = DONE_DECODER.decode(data)
            starts.append((done.ts - item.ts) * 1000)
            trips.append((seen - item.ts) * 1000)
            await asyncio.sleep(0.005)
        outcome = await rec.until_done(60)
        await rec.stop()
        return {"outcome": outcome, "agent_start_ms": pcts(starts), "round_trip_ms": pcts(trips)}
    finally:
        await nc.close()
