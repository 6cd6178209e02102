"""The scenarios of issue 7. Each is a function ``(Run) -> Result`` that starts what it needs,
measures, and stops everything before returning (context managers, bounded waits).

What is timed, per scenario (stated here because "throughput" hides choices):

* workflows are followed by a *lean* recorder: it subscribes only to the workflow's
  ``workflow.*``/``setup.*``/``map.*``/``reduce.*``/``agent.*`` events (and ``item.done`` only
  where per-item times are needed), not to every item like ``cli.watch.Watcher`` does, so the
  harness process costs the 2-core machine as little as possible;
* ``e2e`` = submit request sent → ``workflow.completed`` received by the harness;
* item start = ``ItemDone.ts - ItemDone.duration_s`` (both taken in the agent), item end =
  ``ItemDone.ts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.client import Client

from jetreduce.cli.submit import submit
from jetreduce.contract import events as ev
from jetreduce.contract.events import SetupCompleted, SubmitOptions, WorkflowPlanned, WorkItem
from jetreduce.contract.objects import input_object
from jetreduce.contract.records import Phase, StoredSpec, WorkflowRecord
from jetreduce.contract.subjects import TERMINAL_EVENTS, Subjects
from jetreduce.lang import parse_workflow
from jetreduce.queues.jetstream import JetStreamQueue
from jetreduce.runtime.connection import connect
from jetreduce.runtime.publish import publish_once
from jetreduce.runtime.service import ServiceContext
from jetreduce.runtime.settings import NatsSettings
from jetreduce.runtime.state import StateStore
from loadtest import ceilings
from loadtest.infra import (
    AWS_ENV,
    MemorySampler,
    cpu_seconds,
    moto_server,
    nats_cluster,
    nats_server,
    peak_rss_mb,
    profiled,
    redis_server,
    server_pids,
    services_process,
)
from loadtest.report import Result, rounded

__all__ = [
    "DISPATCH_PARALLEL",
    "Run",
    "agents",
    "backends",
    "dispatch",
    "efficiency",
    "enqueue",
    "latency",
    "memory",
    "peer",
    "shell",
]


@dataclass
class Run:
    """Options of one harness invocation."""

    quick: bool
    profile_dir: Path | None = None
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="jr-load-")))

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def profile(self, name: str) -> Path | None:
        return None if self.profile_dir is None else self.profile_dir / f"{name}.txt"


# -- workflow texts ------------------------------------------------------------------------------
def noop_workflow(n: int, parallel: int, template: str = "[]") -> str:
    """``n`` items from ``seq``; ``agent_template: []`` runs nothing per item, so what is
    measured is the orchestration itself."""
    return (
        f'name: load-{n}\nmode: mapreduce\nmap:\n  input: "seq 1 {n}"\n'
        f"  max_parallel: {parallel}\n  agent_template: {template}\n"
        'reduce:\n  - shell: "echo ${map.successful} of ${map.total} items"\n'
    )


def shell_workflow(n: int, parallel: int, command: str) -> str:
    return noop_workflow(n, parallel, f"\n    - shell: {command!r}")


# -- following a workflow ------------------------------------------------------------------------
_done_dec = msgspec.json.Decoder(ev.ItemDone)


class Recorder:
    """Arrival times (``time.time()``) of a workflow's phase events, and optionally every
    ``item.done`` payload (decoded after the run, so the callback stays cheap)."""

    TERMINAL = tuple(f"workflow.{e}" for e in (*TERMINAL_EVENTS, "rejected"))

    def __init__(self, nc: Client, subjects: Subjects, wf: str, *, items: bool = False) -> None:
        self.nc, self.s, self.wf, self.items = nc, subjects, wf, items
        self.times: dict[str, float] = {}
        self.payloads: dict[str, bytes] = {}
        self.raw_items: list[tuple[float, bytes]] = []
        self.done = asyncio.Event()
        self.item_waiters: dict[int, asyncio.Future[tuple[float, bytes]]] = {}
        self.progress: list[tuple[int, int]] = []
        """(in_flight, pending) of each progress snapshot while items were pending."""
        self._subs: list[Any] = []

    async def start(self) -> Recorder:
        async def on_event(msg: Any) -> None:
            kind = msg.subject.rsplit(".", 1)[0]
            self.times.setdefault(kind, time.time())
            self.payloads.setdefault(kind, msg.data)
            if kind in self.TERMINAL:
                self.done.set()

        async def on_item(msg: Any) -> None:
            now = time.time()
            self.raw_items.append((now, msg.data))
            if self.item_waiters:
                index = int(msg.subject.rsplit(".", 1)[1])
                fut = self.item_waiters.pop(index, None)
                if fut is not None and not fut.done():
                    fut.set_result((now, msg.data))

        async def on_progress(msg: Any) -> None:
            with contextlib.suppress(Exception):
                p = msgspec.json.decode(msg.data, type=ev.Progress)
                if p.pending > 0:
                    self.progress.append((p.in_flight, p.pending))

        self._subs.append(await self.nc.subscribe(self.s.progress(self.wf), cb=on_progress))
        for make in (self.s.workflow, self.s.setup, self.s.map, self.s.reduce, self.s.agent):
            self._subs.append(await self.nc.subscribe(make("*", self.wf), cb=on_event))
        if self.items:
            self._subs.append(await self.nc.subscribe(self.s.done_of(self.wf), cb=on_item))
        await self.nc.flush()
        return self

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def until_done(self, timeout_s: float) -> str:
        try:
            await asyncio.wait_for(self.done.wait(), timeout_s)
        except TimeoutError:
            raise TimeoutError(
                f"workflow {self.wf} not finished after {timeout_s:.0f}s "
                f"(events so far: {sorted(self.times)})"
            ) from None
        return next(k for k in self.TERMINAL if k in self.times)

    def item_spans(self) -> list[tuple[float, float]]:
        """(start, end) of every finished item, in agent clock (same host)."""
        spans = []
        for _, data in self.raw_items:
            done = _done_dec.decode(data)
            spans.append((done.ts - done.duration_s, done.ts))
        return spans


async def _connect(url: str) -> Client:
    return await connect(NatsSettings(url=url), name="jetreduce-loadtest", forever=False)


@dataclass
class Followed:
    wf: str
    t_submit: float
    rec: Recorder
    outcome: str

    def at(self, kind: str) -> float | None:
        return self.rec.times.get(kind)

    def since_submit(self, kind: str) -> float | None:
        t = self.at(kind)
        return None if t is None else t - self.t_submit

    def mean_in_flight(self) -> float | None:
        """Leased-but-unacked items (``num_ack_pending``) averaged over the progress
        snapshots taken while items were still pending: how many of the slots were busy."""
        v = [i for i, _ in self.rec.progress]
        return round(statistics.fmean(v), 1) if v else None

    def phases(self) -> dict[str, float | None]:
        keys = [
            "workflow.accepted",
            "setup.completed",
            "workflow.planned",
            "agent.launched",
            "map.complete",
            "reduce.completed",
            "workflow.completed",
        ]
        return {k: rounded(self.since_submit(k)) for k in keys}


async def follow_workflow(
    url: str, text: str, *, timeout_s: float, items: bool = False, **options: Any
) -> Followed:
    """Submit ``text`` through the CLI's submit path and follow it to its terminal event."""
    nc = await _connect(url)
    try:
        subjects = Subjects("")
        wf = f"load-{secrets.token_hex(4)}"
        rec = await Recorder(nc, subjects, wf, items=items).start()
        t0 = time.time()
        await submit(
            nc, subjects, text, SubmitOptions(**options), workflow_id=wf, source="loadtest"
        )
        outcome = await rec.until_done(timeout_s)
        await rec.stop()
        return Followed(wf, t0, rec, outcome)
    finally:
        await nc.close()


def _bound(n: int, per_s: float = 400.0, base_s: float = 120.0) -> float:
    """A generous time limit for ``n`` items: a scenario that stalls fails, it never hangs."""
    return base_s + n / per_s


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
    nc = await _connect(url)
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
        t_planned = await asyncio.wait_for(planned, _bound(n))
        deadline = time.monotonic() + _bound(n)
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
        await asyncio.wait_for(queue.enqueue(items), _bound(n))
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


# -- 2. dispatch ---------------------------------------------------------------------------------
DISPATCH_PARALLEL = 50


def _dispatch_once(
    run: Run,
    n: int,
    parallel: int,
    *,
    max_processes: int | None = None,
    profile: str | None = None,
    queue: str | None = None,
    extra_env: dict[str, str] | None = None,
    sampler: bool = False,
    sync_always: bool = False,
    cluster: bool = False,
    stream_replicas: int = 1,
) -> dict[str, Any]:
    """One no-op workflow end to end on a fresh server (or local 3-node cluster) and
    services process."""
    servers = nats_cluster if cluster else nats_server
    with (
        servers(sync_always=sync_always) as server,
        services_process(
            server.url,
            max_processes=max_processes,
            stream_replicas=stream_replicas,
            extra_env=extra_env,
        ) as svc,
        profiled(svc.pid, run.profile(profile) if profile else None),
    ):
        mem = MemorySampler(svc.pid).start() if sampler else None
        idle_mb = svc.peak_rss_mb()
        pids = server_pids(server)

        def server_cpu() -> float:
            return sum(cpu_seconds(pid)[0] for pid in pids)

        cpu0 = (cpu_seconds(svc.pid), server_cpu(), time.process_time())
        try:
            f = asyncio.run(
                follow_workflow(
                    server.url,
                    noop_workflow(n, parallel),
                    timeout_s=_bound(n),
                    workdir=str(run.workdir),
                    max_parallel=parallel,
                    queue=queue,
                )
            )
        finally:
            if mem is not None:
                mem.stop()
        e2e = f.since_submit(f.outcome) or 0.0
        # Let the launcher reap the reduce agent, so its CPU lands in the children's total.
        time.sleep(0.5)
        (svc_own, svc_kids), srv = cpu_seconds(svc.pid), server_cpu()
        cpu = {
            "services": svc_own - cpu0[0][0],
            "agents": svc_kids - cpu0[0][1],
            "nats_server": srv - cpu0[1],
            "harness": time.process_time() - cpu0[2],
        }
        planned, complete = f.at("workflow.planned"), f.at("map.complete")
        out: dict[str, Any] = {
            "workflow": f.wf,
            "outcome": f.outcome,
            "items": n,
            "max_parallel": parallel,
            "e2e_s": round(e2e, 3),
            "e2e_per_s": round(n / e2e, 1) if e2e else None,
            "map_s": rounded(complete - planned) if planned and complete else None,
            "map_per_s": round(n / (complete - planned), 1) if planned and complete else None,
            "phases_since_submit_s": f.phases(),
            "mean_in_flight_while_pending": f.mean_in_flight(),
            "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
            "cpu_of_2_cores": round(sum(cpu.values()) / (2 * e2e), 3) if e2e else None,
            "services_idle_rss_mb": round(idle_mb, 1),
            "services_peak_rss_mb": round(svc.peak_rss_mb(), 1),
            "nats_server_peak_rss_mb": round(max(peak_rss_mb(pid) for pid in pids), 1)
            if pids
            else None,
        }
        if mem is not None:
            out["agent_peak_rss_mb"] = {k: round(v, 1) for k, v in mem.agent_peak_mb.items()}
        if f.outcome != "workflow.completed":
            out["services_log"] = svc.log_tail()
        return out


def dispatch(run: Run) -> Result:
    """``n`` no-op items end to end (submit → ``workflow.completed``), 50 agent slots over
    the launcher's default process count; ratio to one consumer's raw fetch(100)+ack."""
    n = run.size(100_000, 5_000)
    ceil = ceilings.measure(run.quick)
    start = time.monotonic()
    d = _dispatch_once(run, n, DISPATCH_PARALLEL, profile="dispatch")
    rate = d["e2e_per_s"] or 0.0
    return Result(
        name="dispatch",
        figure=rate,
        unit="items/s",
        ceiling=round(ceil.fetch_ack_per_s),
        ceiling_what="fetch(100)+ack",
        ratio=round(rate / ceil.fetch_ack_per_s, 3),
        target="≥ 10,000 items/s e2e",
        passed=rate >= 10_000 and d["outcome"].endswith("completed"),
        wall_s=round(time.monotonic() - start, 1),
        params={"items": n, "max_parallel": DISPATCH_PARALLEL},
        details=d,
        summary=f"{rate:,.0f} items/s e2e ({n:,} in {d['e2e_s']:.1f} s; map phase "
        f"{d['map_per_s'] or 0:,.0f}/s)",
        quick=run.quick,
    )


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


def _pcts(values: list[float]) -> dict[str, float]:
    v = sorted(values)

    def pct(p: float) -> float:
        return round(v[min(len(v) - 1, int(p * len(v)))], 3)

    return {
        "p50": pct(0.50),
        "p90": pct(0.90),
        "p99": pct(0.99),
        "max": round(v[-1], 3),
        "mean": round(statistics.fmean(v), 3),
    }


async def _latency(url: str, n: int, workdir: Path) -> dict[str, Any]:
    nc = await _connect(url)
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
            done = _done_dec.decode(data)
            starts.append((done.ts - item.ts) * 1000)
            trips.append((seen - item.ts) * 1000)
            await asyncio.sleep(0.005)
        outcome = await rec.until_done(60)
        await rec.stop()
        return {"outcome": outcome, "agent_start_ms": _pcts(starts), "round_trip_ms": _pcts(trips)}
    finally:
        await nc.close()


# -- 4. agents -----------------------------------------------------------------------------------
AGENTS_SLOTS = 1_000
AGENTS_PROCESSES = 4


def agents(run: Run) -> Result:
    """Many agent slots over a few processes (``max_parallel`` = 1,000, the launcher capped
    at 4 processes: 250 slots each, like a few pods), against the 50-slot run, same size,
    same harness run. Slot count is what a pull consumer sees as concurrent leases."""
    n = run.size(100_000, 5_000)
    start = time.monotonic()
    base = _dispatch_once(run, n, DISPATCH_PARALLEL)
    many = _dispatch_once(run, n, AGENTS_SLOTS, max_processes=AGENTS_PROCESSES, profile="agents")
    r50, rmany = base["e2e_per_s"] or 0.0, many["e2e_per_s"] or 0.0
    ratio = rmany / r50 if r50 else 0.0
    ok = ratio >= 0.8 and many["outcome"].endswith("completed")
    return Result(
        name="agents",
        figure=rmany,
        unit="items/s",
        ceiling=r50,
        ceiling_what="50-slot run",
        ratio=round(ratio, 3),
        target="ratio ≥ 0.8, no stall",
        passed=ok,
        wall_s=round(time.monotonic() - start, 1),
        params={"items": n, "slots": AGENTS_SLOTS, "processes": AGENTS_PROCESSES},
        details={"slots_50": base, f"slots_{AGENTS_SLOTS}": many},
        summary=f"{AGENTS_SLOTS} slots/{AGENTS_PROCESSES} procs: {rmany:,.0f} items/s vs "
        f"50 slots: {r50:,.0f} items/s",
        quick=run.quick,
    )


# -- 5. efficiency -------------------------------------------------------------------------------
def efficiency(run: Run) -> Result:
    """``n`` items of ``sleep 0.2`` on 50 slots. Ideal = n x 0.2 / 50. The map wall is first
    item start → last item end (agent clock), which excludes the agents' own start-up;
    the e2e wall and planned → map.complete are reported beside it."""
    n = run.size(1_000, 250)
    parallel, item_s = 50, 0.2
    start = time.monotonic()
    with (
        nats_server() as server,
        services_process(server.url) as svc,
        profiled(svc.pid, run.profile("efficiency")),
    ):
        f = asyncio.run(
            follow_workflow(
                server.url,
                shell_workflow(n, parallel, "sleep 0.2"),
                timeout_s=_bound(n, 20),
                items=True,
                workdir=str(run.workdir),
                max_parallel=parallel,
            )
        )
    spans = f.rec.item_spans()
    ideal = n * item_s / parallel
    wall = max(e for _, e in spans) - min(s for s, _ in spans)
    overhead = wall / ideal - 1
    planned, complete = f.at("workflow.planned"), f.at("map.complete")
    per_item = statistics.fmean(e - s for s, e in spans)
    return Result(
        name="efficiency",
        figure=round(wall, 3),
        unit="s",
        ceiling=round(ideal, 3),
        ceiling_what="ideal",
        ratio=round(ideal / wall, 3),
        target="overhead ≤ 5%",
        passed=overhead <= 0.05 and len(spans) == n,
        wall_s=round(time.monotonic() - start, 1),
        params={"items": n, "max_parallel": parallel, "item_s": item_s},
        details={
            "items_seen": len(spans),
            "overhead": round(overhead, 4),
            "mean_item_s": round(per_item, 4),
            "planned_to_map_complete_s": rounded(complete - planned)
            if planned and complete
            else None,
            "e2e_s": rounded(f.since_submit(f.outcome)),
            "phases": f.phases(),
        },
        summary=f"map wall {wall:.2f} s vs ideal {ideal:.2f} s: overhead {overhead:.1%} "
        f"(mean item {per_item * 1000:.0f} ms)",
        quick=run.quick,
    )


# -- 6. shell ------------------------------------------------------------------------------------
SHELL_PARALLEL = 8


def shell(run: Run) -> Result:
    """``n`` items each running ``echo ${item}`` (one ``sh -c`` per item), 8 slots like the
    spawn ceiling's concurrency 8. Rate = n / (first item start → last item end)."""
    n = run.size(5_000, 500)
    ceil = ceilings.measure(run.quick)
    start = time.monotonic()
    with (
        nats_server() as server,
        services_process(server.url) as svc,
        profiled(svc.pid, run.profile("shell")),
    ):
        f = asyncio.run(
            follow_workflow(
                server.url,
                shell_workflow(n, SHELL_PARALLEL, "echo ${item}"),
                timeout_s=_bound(n, 100),
                items=True,
                workdir=str(run.workdir),
                max_parallel=SHELL_PARALLEL,
            )
        )
    spans = f.rec.item_spans()
    wall = max(e for _, e in spans) - min(s for s, _ in spans)
    rate = len(spans) / wall
    ratio = rate / ceil.spawn_per_s
    e2e = f.since_submit(f.outcome) or 0.0
    return Result(
        name="shell",
        figure=round(rate, 1),
        unit="items/s",
        ceiling=round(ceil.spawn_per_s, 1),
        ceiling_what="sh -c true x8",
        ratio=round(ratio, 3),
        target="ratio ≥ 0.8",
        passed=ratio >= 0.8 and len(spans) == n,
        wall_s=round(time.monotonic() - start, 1),
        params={"items": n, "max_parallel": SHELL_PARALLEL},
        details={
            "items_seen": len(spans),
            "map_wall_s": round(wall, 3),
            "e2e_s": round(e2e, 3),
            "mean_item_ms": round(statistics.fmean(e - s for s, e in spans) * 1000, 2),
            "phases": f.phases(),
        },
        summary=f"{rate:,.0f} items/s ({n:,} shell items, map wall {wall:.1f} s)",
        quick=run.quick,
    )


# -- 7. memory -----------------------------------------------------------------------------------
MEMORY_LIMIT_MB = 250.0


def memory(run: Run) -> Result:
    """``n`` no-op items end to end; peak RSS (VmHWM) of the services process — planner,
    launcher, aggregator and janitor share it, so it bounds the planner's and the
    aggregator's — and sampled peaks of the agents by phase (``reduce`` assembles the reduce
    input). nats-server's peak is reported beside it (not ours to bound)."""
    n = run.size(1_000_000, 50_000)
    start = time.monotonic()
    d = _dispatch_once(run, n, DISPATCH_PARALLEL, sampler=True, profile="memory")
    services_mb = d["services_peak_rss_mb"]
    reduce_mb = d.get("agent_peak_rss_mb", {}).get("reduce", 0.0)
    ok = services_mb <= MEMORY_LIMIT_MB and reduce_mb <= MEMORY_LIMIT_MB
    return Result(
        name="memory",
        figure=services_mb,
        unit="MiB",
        ceiling=None,
        ceiling_what="",
        ratio=None,
        target=f"≤ {MEMORY_LIMIT_MB:.0f} MiB each",
        passed=ok and d["outcome"].endswith("completed"),
        wall_s=round(time.monotonic() - start, 1),
        params={"items": n},
        details=d,
        summary=f"services process peak {services_mb:.0f} MiB (idle "
        f"{d['services_idle_rss_mb']:.0f}); reduce agent {reduce_mb:.0f} MiB; "
        f"{n:,} items",
        quick=run.quick,
    )


# -- 8. backends ---------------------------------------------------------------------------------
def backends(run: Run) -> Result:
    """The dispatch scenario on each queue backend, side by side: JetStream and Redis at the
    same size, SQS (moto) at a few hundred items — moto's single-threaded emulator manages
    tens of messages per second (research/baselines.md), so its figure is the emulator's."""
    n = run.size(20_000, 2_000)
    n_sqs = run.size(300, 100)
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="jr-load-backends-"))
    js_run = _dispatch_once(run, n, DISPATCH_PARALLEL)
    with redis_server(work) as redis_url:
        redis_run = _dispatch_once(
            run, n, DISPATCH_PARALLEL, queue=redis_url, profile="backends-redis"
        )
    with moto_server(work) as endpoint:
        sqs_url = f"sqs://jrload?region=us-east-1&endpoint={endpoint}"
        sqs_run = _dispatch_once(run, n_sqs, 8, queue=sqs_url, extra_env=AWS_ENV)
    rates = {
        k: v["e2e_per_s"] or 0.0
        for k, v in (("jetstream", js_run), ("redis", redis_run), ("sqs", sqs_run))
    }
    outcomes = [v["outcome"] for v in (js_run, redis_run, sqs_run)]
    return Result(
        name="backends",
        figure=rates["redis"],
        unit="items/s",
        ceiling=rates["jetstream"],
        ceiling_what="jetstream, same size",
        ratio=round(rates["redis"] / rates["jetstream"], 3) if rates["jetstream"] else None,
        target="all complete",
        passed=all(o.endswith("completed") for o in outcomes),
        wall_s=round(time.monotonic() - start, 1),
        params={"items": n, "sqs_items": n_sqs},
        details={"jetstream": js_run, "redis": redis_run, "sqs": sqs_run},
        summary=f"jetstream {rates['jetstream']:,.0f} · redis {rates['redis']:,.0f} "
        f"({n:,} items) · sqs/moto {rates['sqs']:,.1f} ({n_sqs} items) items/s e2e",
        quick=run.quick,
    )


# -- 9. peer -------------------------------------------------------------------------------------
def peer(run: Run) -> Result:
    """A Celery chord of ``n`` no-op tasks + a sum (Redis broker and result backend, prefork
    -c 2), against the same-size no-op jetreduce workflow in the same run."""
    from loadtest.celery_peer import run_chord

    n = run.size(10_000, 1_000)
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="jr-load-celery-"))
    with redis_server(work) as redis_url:
        celery = run_chord(redis_url, n, work, timeout_s=_bound(n, 20))
    ours = _dispatch_once(run, n, DISPATCH_PARALLEL)
    rate, theirs = ours["e2e_per_s"] or 0.0, celery["per_s"]
    ratio = rate / theirs if theirs else 0.0
    return Result(
        name="peer",
        figure=rate,
        unit="items/s",
        ceiling=theirs,
        ceiling_what="Celery chord",
        ratio=round(ratio, 2),
        target="faster than Celery",
        passed=ratio > 1.0,
        wall_s=round(time.monotonic() - start, 1),
        params={"items": n},
        details={"jetreduce": ours, "celery": celery},
        summary=f"jetreduce {rate:,.0f} items/s vs Celery chord {theirs:,.0f} items/s "
        f"({n:,} no-op items, submit→reduce result)",
        quick=run.quick,
    )
