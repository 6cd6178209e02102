"""Scenarios with real per-item work or a peer: ``efficiency`` (items that sleep: what the
orchestration adds around them), ``shell`` (one ``sh -c`` per item against the spawn ceiling)
and ``peer`` (the same no-op map-reduce as a Celery chord)."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from loadtest import ceilings
from loadtest.common import Followed, Run, bound, follow_workflow, shell_workflow
from loadtest.dispatching import DISPATCH_PARALLEL, dispatch_once
from loadtest.infra import nats_server, profiled, redis_server, services_process
from loadtest.report import Result, rounded

__all__ = ["efficiency", "peer", "shell"]


def _shell_items(
    run: Run, name: str, n: int, parallel: int, command: str, per_s: float
) -> tuple[Followed, list[tuple[float, float]], float]:
    """``n`` items running ``command`` on ``parallel`` slots, on a fresh server and services
    process (profiled as ``name``): the followed workflow, each item's (start, end) on the
    agents' clock, and the map wall (first start → last end)."""
    with (
        nats_server() as server,
        services_process(server.url) as svc,
        profiled(svc.pid, run.profile(name)),
    ):
        f = asyncio.run(
            follow_workflow(
                server.url,
                shell_workflow(n, parallel, command),
                timeout_s=bound(n, per_s),
                items=True,
                workdir=str(run.workdir),
                max_parallel=parallel,
            )
        )
    spans = f.rec.item_spans()
    return f, spans, max(e for _, e in spans) - min(s for s, _ in spans)


# -- 5. efficiency -------------------------------------------------------------------------------
def efficiency(run: Run) -> Result:
    """``n`` items of ``sleep 0.2`` on 50 slots. Ideal = n x 0.2 / 50. The map wall is first
    item start → last item end (agent clock), which excludes the agents' own start-up;
    the e2e wall and planned → map.complete are reported beside it."""
    n = run.size(1_000, 250)
    parallel, item_s = 50, 0.2
    start = time.monotonic()
    f, spans, wall = _shell_items(run, "efficiency", n, parallel, "sleep 0.2", 20)
    ideal = n * item_s / parallel
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
    f, spans, wall = _shell_items(run, "shell", n, SHELL_PARALLEL, "echo ${item}", 100)
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


# -- 9. peer -------------------------------------------------------------------------------------
PEER_TARGET = 10.0


def peer(run: Run) -> Result:
    """A Celery chord of ``n`` no-op tasks + a sum (Redis broker and result backend, prefork
    with one process per core), against the same-size no-op jetreduce workflow in the same
    run. Issue 17's row "10k items vs Celery chord": the ratio, target ≥ 10x."""
    from loadtest.celery_peer import CONCURRENCY, run_chord

    n = run.size(10_000, 1_000)
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="jr-load-celery-"))
    with redis_server(work) as redis_url:
        celery = run_chord(redis_url, n, work, timeout_s=bound(n, 20))
    ours = dispatch_once(run, n, DISPATCH_PARALLEL)
    rate, theirs = ours["e2e_per_s"] or 0.0, celery["per_s"]
    ratio = rate / theirs if theirs else 0.0
    return Result(
        name="peer",
        figure=rate,
        unit="items/s",
        ceiling=theirs,
        ceiling_what="Celery chord",
        ratio=round(ratio, 2),
        target=f"ratio ≥ {PEER_TARGET:.0f}",
        passed=ratio >= PEER_TARGET and ours["outcome"].endswith("completed"),
        wall_s=round(time.monotonic() - start, 1),
        params={"items": n, "celery_concurrency": CONCURRENCY},
        details={"jetreduce": ours, "celery": celery},
        summary=f"jetreduce {rate:,.0f} items/s vs Celery chord {theirs:,.0f} items/s: "
        f"{ratio:.1f}x ({n:,} no-op items, submit→reduce result; Celery prefork "
        f"-c {CONCURRENCY})",
        quick=run.quick,
    )
