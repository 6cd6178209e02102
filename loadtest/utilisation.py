"""How much of the slots a workflow holds it keeps busy (issue 17, elastic slots):
``utilisation``.

Two workflows compete for a launcher capped at ``SLOTS`` agent slots (``max_slots``), one
slot per agent process. The first (A) takes all of them; its items are uneven: item 1
sleeps ``long_s`` while the others sleep ``SHORT_S``, so A's queue runs dry early and only
the long item remains in flight. The second (B, half the slots) is submitted once A's map
agents are launched (A then holds every slot) and waits for slots. With slots handed back
when a queue runs dry, B's map agents start long before A's ``map.complete`` and both
workflows keep most of what they hold busy; without, A holds every slot until its last item
ends.

Figures, per workflow: utilisation = busy slot-seconds / held slot-seconds of its map
agents, and where it comes from, first found of:

1. ``workflow.completed``'s ``utilisation`` (the aggregator's sum of ``agent.usage``);
2. the ``agent.usage`` reports themselves (agents that publish them);
3. the harness: busy = the ``duration_s`` of every ``item.done``, held = each map agent
   process's slots x its lifetime (started → last seen alive, from ``/proc``, sampled every
   50 ms: ``procs.AgentWatcher``). ``agent.exited`` does not serve: it is published only
   for failed agents.

The other sources are reported beside it when present (a cross-check). Also: when B's map
agents were launched relative to A's ``map.complete`` (negative: before it) and to the moment
A's queue ran dry (A's last item start).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from typing import Any

from jetreduce.cli.submit import submit
from jetreduce.contract import events as ev
from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.subjects import Subjects
from loadtest.common import Recorder, Run, connect_harness, shell_workflow, stored_events
from loadtest.infra import nats_server, profiled, services_process
from loadtest.procs import AgentInfo, AgentWatcher
from loadtest.report import Result

__all__ = ["utilisation", "workflow_usage"]

SLOTS = 8
SHORT_S = 0.2
TARGET = 0.8


def _uneven(n: int, parallel: int, long_s: float) -> str:
    return shell_workflow(
        n, parallel, f'if [ "${{item}}" = 1 ]; then sleep {long_s}; else sleep {SHORT_S}; fi'
    )


def _first(events: list[ev.Event], cls: type[Any], phase: str | None = None) -> Any | None:
    for e in events:
        if isinstance(e, cls) and (phase is None or getattr(e, "phase", None) == phase):
            return e
    return None


def _harness_usage(events: list[ev.Event], agents: list[AgentInfo]) -> dict[str, Any] | None:
    """busy = every ``item.done``'s ``duration_s``; held = each map agent process's slots x
    (last seen alive - started), from ``/proc`` (sampled every 50 ms)."""
    if not agents:
        return None
    held = sum(a.slots * (a.last_seen - a.started) for a in agents)
    busy = sum(e.duration_s for e in events if isinstance(e, ev.ItemDone))
    return {
        "busy_slot_s": round(busy, 3),
        "held_slot_s": round(held, 3),
        "utilisation": round(busy / held, 4) if held > 0 else None,
        "agents": len(agents),
        "agent_lifetimes_s": sorted(round(a.last_seen - a.started, 2) for a in agents),
    }


def workflow_usage(events: list[ev.Event], agents: list[AgentInfo]) -> dict[str, Any]:
    """Every source of a workflow's utilisation (see the module docstring), and the one
    used (``source``/``utilisation``)."""
    out: dict[str, Any] = {}
    done = _first(events, ev.WorkflowCompleted)
    if done is not None and done.utilisation is not None:
        out["workflow.completed"] = {
            "utilisation": round(done.utilisation, 4),
            "busy_slot_s": done.busy_slot_s,
            "held_slot_s": done.held_slot_s,
        }
    usage = [e for e in events if isinstance(e, ev.AgentUsage) and e.phase == "map"]
    if usage:
        held = sum(u.held_s for u in usage)
        busy = sum(u.busy_s for u in usage)
        out["agent.usage"] = {
            "utilisation": round(busy / held, 4) if held > 0 else None,
            "busy_slot_s": round(busy, 3),
            "held_slot_s": round(held, 3),
            "reports": len(usage),
            "drained": sum(1 for u in usage if u.drained),
        }
    harness = _harness_usage(events, agents)
    if harness is not None:
        out["harness"] = harness
    for source in ("workflow.completed", "agent.usage", "harness"):
        if source in out and out[source]["utilisation"] is not None:
            return {"source": source, "utilisation": out[source]["utilisation"], **out}
    return {"source": None, "utilisation": None, **out}


def utilisation(run: Run) -> Result:
    n_a, n_b = run.size(81, 21), run.size(40, 12)
    long_s = run.size(5, 2)
    start = time.monotonic()
    with (
        nats_server() as server,
        services_process(server.url, max_slots=SLOTS, max_processes=SLOTS) as svc,
        profiled(svc.pid, run.profile("utilisation")),
    ):
        watcher = AgentWatcher(svc.pid).start()
        try:
            d = asyncio.run(_compete(server.url, run, n_a, n_b, float(long_s), watcher))
        finally:
            watcher.stop()
    a, b = d["a"]["utilisation"], d["b"]["utilisation"]
    worst = min(x for x in (a, b) if x is not None) if a is not None or b is not None else None
    passed = (
        a is not None
        and b is not None
        and a > TARGET
        and b > TARGET
        and d["outcomes"] == ["workflow.completed"] * 2
    )
    rel = d["b_map_launched_minus_a_map_complete_s"]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.0%}"

    return Result(
        name="utilisation",
        figure=None if worst is None else round(worst * 100, 1),
        unit="%",
        ceiling=None,
        ceiling_what="",
        ratio=worst,
        target=f"> {TARGET:.0%} each",
        passed=passed,
        wall_s=round(time.monotonic() - start, 1),
        params={
            "max_slots": SLOTS,
            "a_items": n_a,
            "b_items": n_b,
            "a_slots": SLOTS,
            "b_slots": SLOTS // 2,
            "long_item_s": long_s,
            "short_item_s": SHORT_S,
        },
        details=d,
        summary=f"busy/held slot-seconds: A {pct(a)}, B {pct(b)} "
        f"(from {d['a']['source']}); B's map agents launched "
        + ("-" if rel is None else f"{rel:+.2f} s")
        + " after A's map.complete",
        quick=run.quick,
    )


async def _compete(
    url: str, run: Run, n_a: int, n_b: int, long_s: float, watcher: AgentWatcher
) -> dict[str, Any]:
    nc = await connect_harness(url)
    try:
        s = Subjects("")
        tag = secrets.token_hex(3)
        plans = {
            "a": (f"util-a-{tag}", _uneven(n_a, SLOTS, long_s), SLOTS),
            "b": (f"util-b-{tag}", _uneven(n_b, SLOTS // 2, SHORT_S), SLOTS // 2),
        }
        a_mapping = asyncio.Event()

        async def on_launched(msg: Any) -> None:
            with contextlib.suppress(ev.BadEvent):
                if getattr(ev.decode(msg.data), "phase", None) == "map":
                    a_mapping.set()

        a_launch = await nc.subscribe(s.agent("launched", plans["a"][0]), cb=on_launched)
        recs = {}
        for key, (wf, text, parallel) in plans.items():
            recs[key] = await Recorder(nc, s, wf).start()
            await submit(
                nc,
                s,
                text,
                SubmitOptions(workdir=str(run.workdir), max_parallel=parallel),
                workflow_id=wf,
                source="loadtest",
            )
            if key == "a":
                # B comes once A holds every slot: it must wait for slots A hands back.
                await asyncio.wait_for(a_mapping.wait(), 60)
                await a_launch.unsubscribe()
        limit = 120 + (n_a + n_b) * SHORT_S + long_s
        outcomes = [await recs[k].until_done(limit) for k in plans]
        for rec in recs.values():
            await rec.stop()
        events = {k: await stored_events(nc, plans[k][0]) for k in plans}
    finally:
        await nc.close()
    a_done = _first(events["a"], ev.MapComplete)
    b_launch = _first(events["b"], ev.AgentLaunched, "map")
    a_items = [e for e in events["a"] if isinstance(e, ev.ItemDone)]
    a_dry = max((e.ts - e.duration_s for e in a_items), default=None)
    return {
        "outcome": outcomes[0] if outcomes[0] != "workflow.completed" else outcomes[1],
        "outcomes": outcomes,
        "a": workflow_usage(events["a"], watcher.of(plans["a"][0])),
        "b": workflow_usage(events["b"], watcher.of(plans["b"][0])),
        "b_map_launched_minus_a_map_complete_s": round(b_launch.ts - a_done.ts, 3)
        if b_launch and a_done
        else None,
        "b_map_launched_minus_a_queue_dry_s": round(b_launch.ts - a_dry, 3)
        if b_launch and a_dry is not None
        else None,
    }
