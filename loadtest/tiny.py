"""What a tiny workflow costs (issue 17): ``tiny`` (services already up, submit →
``workflow.completed``) and ``run`` (``jetreduce run`` of the same file, embedded server and
services included).

For short work every workflow pays fixed costs (agent starts, ticks, waits between phases),
so the figure is latency, not throughput. ``tiny`` repeats the workflow on one set of
services (a warm-up first, then ``runs`` timed ones: median and p90) and builds the timeline
of each run from its stored events' timestamps, so the limiting step is named by the data:

submit → accepted → setup agent launched → ``setup.completed`` → planned → map agents
launched → first item start → last ``item.done`` → ``map.complete`` → reduce agent launched
→ ``reduce.completed`` → ``workflow.completed``.

A point that is missing (a service that stops publishing an event, say) is skipped: the
segment then spans from the previous point that exists, and its name says so.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jetreduce.contract import events as ev
from loadtest.common import Run, connect_harness, follow_workflow, stored_events
from loadtest.infra import REPO, nats_server, profiled, services_process
from loadtest.procs import agent_pids
from loadtest.report import Result

__all__ = ["TINY_WORKFLOW", "cli_run", "timeline", "tiny"]

TINY_ITEMS = 4
TINY_WORKFLOW = f"""\
name: tiny
mode: mapreduce
setup:
  - shell: "echo setup"
map:
  input: "seq 1 {TINY_ITEMS}"
  max_parallel: {TINY_ITEMS}
  agent_template:
    - shell: "echo ${{item}}"
reduce:
  - shell: "echo ${{map.successful}} of ${{map.total}}"
"""
"""A setup step, a 4-item map and a reduce step, each a cheap ``echo``: what is left is the
orchestration's fixed cost per workflow."""
TINY_TARGET_S = 0.150
RUN_TARGET_S = 0.8


# -- the timeline --------------------------------------------------------------------------------
def _points(events: list[ev.Event], t_submit: float) -> list[tuple[str, float | None]]:
    """The named instants of one run, in the order they should happen (None: not seen)."""

    def first(cls: type[Any], phase: str | None = None) -> float | None:
        ts = [
            e.ts
            for e in events
            if isinstance(e, cls) and (phase is None or getattr(e, "phase", None) == phase)
        ]
        return min(ts) if ts else None

    done = [e for e in events if isinstance(e, ev.ItemDone)]
    return [
        ("submit", t_submit),
        ("accepted", first(ev.WorkflowAccepted)),
        ("setup agent launched", first(ev.AgentLaunched, "setup")),
        ("setup.completed", first(ev.SetupCompleted)),
        ("planned", first(ev.WorkflowPlanned)),
        ("map agents launched", first(ev.AgentLaunched, "map")),
        ("first item start", min(d.ts - d.duration_s for d in done) if done else None),
        ("last item.done", max(d.ts for d in done) if done else None),
        ("map.complete", first(ev.MapComplete)),
        ("reduce agent launched", first(ev.AgentLaunched, "reduce")),
        ("reduce.completed", first(ev.ReduceCompleted)),
        ("workflow.completed", first(ev.WorkflowCompleted)),
    ]


def timeline(events: list[ev.Event], t_submit: float) -> dict[str, float]:
    """Milliseconds between consecutive instants that were seen, keyed ``"a → b"``."""
    seen = [(name, t) for name, t in _points(events, t_submit) if t is not None]
    return {
        f"{a} → {b}": round((tb - ta) * 1000, 1) for (a, ta), (b, tb) in itertools.pairwise(seen)
    }


def _limiting(steps: dict[str, float]) -> str:
    name, ms = max(steps.items(), key=lambda kv: kv[1])
    total = sum(steps.values())
    return f"{name} {ms:.0f} ms ({ms / total:.0%})" if total > 0 else name


# -- tiny ----------------------------------------------------------------------------------------
def tiny(run: Run) -> Result:
    """The tiny workflow ``runs`` times (after one warm-up) on services that are already up,
    each once the previous run's agents have exited: e2e = submit sent →
    ``workflow.completed`` received by the harness."""
    runs = run.size(10, 2)
    start = time.monotonic()
    with (
        nats_server() as server,
        services_process(server.url) as svc,
        profiled(svc.pid, run.profile("tiny")),
    ):
        d = asyncio.run(_tiny(server.url, runs, run.workdir, svc.pid))
    med = d["e2e_ms"]["median"]
    return Result(
        name="tiny",
        figure=med,
        unit="ms",
        ceiling=None,
        ceiling_what="",
        ratio=None,
        target=f"median ≤ {TINY_TARGET_S * 1000:.0f} ms",
        passed=med <= TINY_TARGET_S * 1000 and d["outcome"] == "workflow.completed",
        wall_s=round(time.monotonic() - start, 1),
        params={"items": TINY_ITEMS, "runs": runs, "warm_up": 1},
        details=d,
        summary=f"submit→completed median {med:,.0f} ms, p90 {d['e2e_ms']['p90']:,.0f} ms "
        f"({runs} runs, {TINY_ITEMS} items); largest step: {d['limiting']}"
        + (
            f"; three agent launches → first result {d['agent_phases_ms']:,.0f} ms"
            if d["agent_phases_ms"] is not None
            else ""
        ),
        quick=run.quick,
    )


async def _agents_gone(services_pid: int, timeout_s: float = 10.0) -> None:
    """Wait (bounded) until the previous run's agents have exited, so a run does not share
    the cores with the last one's reduce agent shutting down."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(agent_pids(services_pid, phase) for phase in ("setup", "map", "reduce")):
            return
        await asyncio.sleep(0.02)


def _e2e_figures(e2e: list[float]) -> dict[str, float]:
    """Median and nearest-rank p90 (the 9th of 10 runs), in ms."""
    v = sorted(e2e)
    return {
        "median": round(statistics.median(v), 1),
        "p90": round(v[max(0, math.ceil(0.9 * len(v)) - 1)], 1),
        "min": round(v[0], 1),
        "max": round(v[-1], 1),
    }


async def _tiny(url: str, runs: int, workdir: Path, services_pid: int) -> dict[str, Any]:
    e2e: list[float] = []
    steps: list[dict[str, float]] = []
    outcomes: list[str] = []
    for i in range(runs + 1):
        await _agents_gone(services_pid)
        f = await follow_workflow(
            url, TINY_WORKFLOW, timeout_s=60, workdir=str(workdir), max_parallel=TINY_ITEMS
        )
        if i == 0:
            continue  # warm-up: page cache, the server's first stream writes
        nc = await connect_harness(url)
        try:
            events = await stored_events(nc, f.wf)
        finally:
            await nc.close()
        outcomes.append(f.outcome)
        e2e.append((f.since_submit(f.outcome) or 0.0) * 1000)
        steps.append(timeline(events, f.t_submit))
    # The run whose e2e is the median, and each step's median over all runs.
    order = sorted(range(runs), key=lambda k: e2e[k])
    median_run = steps[order[runs // 2]]
    names = [k for k in median_run]
    step_medians = {
        k: round(statistics.median(s[k] for s in steps if k in s), 1)
        for k in names
        if any(k in s for s in steps)
    }
    bad = [o for o in outcomes if o != "workflow.completed"]
    return {
        "outcome": bad[0] if bad else "workflow.completed",
        "e2e_ms": _e2e_figures(e2e),
        "e2e_ms_each": [round(x, 1) for x in e2e],
        "timeline_ms_median_run": median_run,
        "step_median_ms": step_medians,
        "limiting": _limiting(step_medians),
        "agent_phases_ms": _agent_phases(step_medians),
    }


AGENT_STEPS = (
    "setup agent launched → setup.completed",
    "map agents launched → first item start",
    "reduce agent launched → reduce.completed",
)


def _agent_phases(steps: dict[str, float]) -> float | None:
    """The three steps from an agent's launch to its phase's first result: mostly process
    start and imports while agents are cold (issue 17's "three Python process starts")."""
    found = [steps[k] for k in AGENT_STEPS if k in steps]
    return round(sum(found), 1) if len(found) == len(AGENT_STEPS) else None


# -- run -----------------------------------------------------------------------------------------
def _jetreduce_argv() -> list[str]:
    """The installed ``jetreduce`` console script next to this interpreter (what a user
    runs), else ``python -m jetreduce``."""
    script = Path(sys.executable).with_name("jetreduce")
    return [str(script)] if os.access(script, os.X_OK) else [sys.executable, "-m", "jetreduce"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETREDUCE_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _timed(argv: list[str], cwd: Path, timeout_s: float = 120.0) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(
        argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout_s
    )
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr[-2000:]}")
    return wall, done.stdout


def cli_run(run: Run) -> Result:
    """``jetreduce run -q tiny.yml`` as a subprocess, fresh data directory each time (so the
    embedded server starts on an empty store, as on a first run): process start → exit,
    after a warm-up in the full run.
    Beside it, what starting the interpreter and importing the CLI alone costs."""
    runs, warm_up = run.size(5, 1), run.size(1, 0)
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="jr-load-run-"))
    (work / "tiny.yml").write_text(TINY_WORKFLOW)
    walls: list[float] = []
    for i in range(warm_up + runs):
        # The default data directory, emptied: each run is a first run. (Data directories of
        # their own inside the workflow's directory were copied into every map agent's
        # workspace by the runs after them, so each run was slower than the last.)
        shutil.rmtree(work / ".jetreduce", ignore_errors=True)
        argv = [*_jetreduce_argv(), "run", "-q", "tiny.yml"]
        wall, out = _timed(argv, work)
        if f"{TINY_ITEMS} of {TINY_ITEMS}" not in out:
            raise RuntimeError(f"jetreduce run printed {out[-500:]!r}, not the reduce output")
        if i >= warm_up:  # a warm-up first in the full run (page cache)
            walls.append(wall)
    imports = [
        _timed([sys.executable, "-c", "import jetreduce.cli.app"], work)[0]
        for _ in range(run.size(3, 1))
    ]
    med = statistics.median(walls)
    return Result(
        name="run",
        figure=round(med, 3),
        unit="s",
        ceiling=None,
        ceiling_what="",
        ratio=None,
        target=f"median ≤ {RUN_TARGET_S} s",
        passed=med <= RUN_TARGET_S,
        wall_s=round(time.monotonic() - start, 1),
        params={"items": TINY_ITEMS, "runs": runs, "warm_up": warm_up},
        details={
            "outcome": "workflow.completed",
            "wall_s_each": [round(w, 3) for w in walls],
            "median_s": round(med, 3),
            "cli_import_s_median": round(statistics.median(imports), 3),
        },
        summary=f"`jetreduce run` of the tiny workflow: median {med:.2f} s ({runs} runs; "
        f"interpreter + CLI import alone {statistics.median(imports):.2f} s)",
        quick=run.quick,
    )
