"""The no-op dispatch scenarios: one workflow of ``n`` items that run nothing
(``dispatch_once``), measured at several shapes: 50 slots (``dispatch``), many slots over few
processes (``agents``), a million items (``memory``), and on each queue backend
(``backends``). Other modules (durability, agents1000, workloads) reuse ``dispatch_once``."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest import ceilings
from loadtest.common import Run, bound, follow_workflow, noop_workflow
from loadtest.infra import (
    AWS_ENV,
    moto_server,
    nats_cluster,
    nats_server,
    profiled,
    redis_server,
    server_pids,
    services_process,
)
from loadtest.procs import (
    AgentWatcher,
    MemorySampler,
    cpu_seconds,
    peak_rss_mb,
    tree_cpu_seconds,
)
from loadtest.report import Result, rounded

__all__ = [
    "DISPATCH_PARALLEL",
    "agents",
    "agents_shape",
    "backends",
    "dispatch",
    "dispatch_once",
    "memory",
]


# -- 2. dispatch ---------------------------------------------------------------------------------
DISPATCH_PARALLEL = 50


def dispatch_once(
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
    watch_agents: bool = False,
) -> dict[str, Any]:
    """One no-op workflow end to end on a fresh server (or local 3-node cluster) and
    services process.

    ``cpu_s.agents`` is the CPU of the services process's whole tree but itself (every
    agent of every phase: setup, map and reduce, live or reaped, wherever they sit in the
    tree), and ``agent_cpu_us_per_item`` that over ``n``: issue 17's "agent CPU per no-op
    item". ``watch_agents`` adds the map agents' own share, sampled every 0.1 s (each
    agent's last 0.1 s is missed)."""
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
        watcher = AgentWatcher(svc.pid, every_s=0.1).start() if watch_agents else None
        idle_mb = svc.peak_rss_mb()
        pids = server_pids(server)

        def server_cpu() -> float:
            return sum(cpu_seconds(pid)[0] for pid in pids)

        def own_and_agents() -> tuple[float, float]:
            own = cpu_seconds(svc.pid)[0]
            return own, tree_cpu_seconds(svc.pid) - own

        cpu0 = (own_and_agents(), server_cpu(), time.process_time())
        try:
            f = asyncio.run(
                follow_workflow(
                    server.url,
                    noop_workflow(n, parallel),
                    timeout_s=bound(n),
                    workdir=str(run.workdir),
                    max_parallel=parallel,
                    queue=queue,
                )
            )
        finally:
            for sampling in (mem, watcher):
                if sampling is not None:
                    sampling.stop()
        e2e = f.since_submit(f.outcome) or 0.0
        # Let the launcher reap the reduce agent, so its CPU lands in the children's total.
        time.sleep(0.5)
        (svc_own, svc_kids), srv = own_and_agents(), server_cpu()
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
            "agent_cpu_us_per_item": round(cpu["agents"] / n * 1e6, 1),
            "services_idle_rss_mb": round(idle_mb, 1),
            "services_peak_rss_mb": round(svc.peak_rss_mb(), 1),
            "nats_server_peak_rss_mb": round(max(peak_rss_mb(pid) for pid in pids), 1)
            if pids
            else None,
        }
        if watcher is not None:
            by_phase = watcher.cpu_by_phase()
            out["agent_cpu_s_sampled"] = {k: round(v, 2) for k, v in by_phase.items()}
            if "map" in by_phase:
                out["map_agent_cpu_us_per_item_sampled"] = round(by_phase["map"] / n * 1e6, 1)
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
    d = dispatch_once(run, n, DISPATCH_PARALLEL, profile="dispatch", watch_agents=True)
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
        f"{d['map_per_s'] or 0:,.0f}/s); agent CPU {d['agent_cpu_us_per_item']:,.0f} µs/item"
        + (
            f" (map agents {d['map_agent_cpu_us_per_item_sampled']:,.0f})"
            if "map_agent_cpu_us_per_item_sampled" in d
            else ""
        ),
        quick=run.quick,
    )


# -- 4. agents -----------------------------------------------------------------------------------
AGENTS_SLOTS = 1_000
SIXTEEN_CORES = 16


def agents_shape(run: Run) -> tuple[int, int]:
    """(items, processes): issue 17's row "200k items, 1,000 slots / 16 processes" where the
    machine has 16 cores; 100k over 4 processes below that (16 processes of 62 slots on 2
    cores measure the scheduler)."""
    if (os.cpu_count() or 1) >= SIXTEEN_CORES:
        return run.size(200_000, 5_000), 16
    return run.size(100_000, 5_000), 4


def agents(run: Run) -> Result:
    """Many agent slots over a few processes (``max_parallel`` = 1,000, the launcher capped
    at a few processes, like a few pods: see :func:`agents_shape`), against the 50-slot run,
    same size, same harness run. Slot count is what a pull consumer sees as concurrent
    leases."""
    n, processes = agents_shape(run)
    start = time.monotonic()
    base = dispatch_once(run, n, DISPATCH_PARALLEL)
    many = dispatch_once(run, n, AGENTS_SLOTS, max_processes=processes, profile="agents")
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
        params={
            "items": n,
            "slots": AGENTS_SLOTS,
            "processes": processes,
            "cores": os.cpu_count(),
        },
        details={"slots_50": base, f"slots_{AGENTS_SLOTS}": many},
        summary=f"{n:,} items, {AGENTS_SLOTS} slots/{processes} procs: {rmany:,.0f} items/s "
        f"vs 50 slots: {r50:,.0f} items/s",
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
    d = dispatch_once(run, n, DISPATCH_PARALLEL, sampler=True, profile="memory")
    services_mb = d["services_peak_rss_mb"]
    # None: the reduce agent came and went between two 0.1 s samples (a warm agent whose
    # reduce reads no results), so its peak is unknown, not zero.
    reduce_mb: float | None = d.get("agent_peak_rss_mb", {}).get("reduce")
    ok = services_mb <= MEMORY_LIMIT_MB and (reduce_mb or 0.0) <= MEMORY_LIMIT_MB
    reduce_seen = "not sampled (gone within 0.1 s)" if reduce_mb is None else f"{reduce_mb:.0f} MiB"
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
        f"{d['services_idle_rss_mb']:.0f}); reduce agent {reduce_seen}; "
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
    js_run = dispatch_once(run, n, DISPATCH_PARALLEL)
    with redis_server(work) as redis_url:
        redis_run = dispatch_once(
            run, n, DISPATCH_PARALLEL, queue=redis_url, profile="backends-redis"
        )
    with moto_server(work) as endpoint:
        sqs_url = f"sqs://jrload?region=us-east-1&endpoint={endpoint}"
        sqs_run = dispatch_once(run, n_sqs, 8, queue=sqs_url, extra_env=AWS_ENV)
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
