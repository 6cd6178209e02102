"""Priorities across workflows (issue 5): with the installation's agent slots capped
(``--max-slots``), waiting workflows start by lane, FIFO within a lane, and a long wait
lifts a low workflow ahead of newer high ones. Real nats-server, in-process services, agents
as child processes."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import Harness, read_stream, services
from jetreduce.contract import events as ev
from support import wait_for

pytestmark = pytest.mark.anyio

WORKFLOW = """
name: {name}
map:
  input: "seq 1 2"
  max_parallel: 2
  agent_template:
    - shell: "{step}"
"""
GATED = "while [ ! -e release ]; do sleep 0.05; done"
"""The first workflow's items hold every slot until the test creates ``release``."""


async def lifecycle(h: Harness) -> list[tuple[str, str]]:
    """(event type, workflow) of every plan, launch and map completion, in stream order."""
    body = f"{h.subjects.prefix}.*.*.*" if h.subjects.prefix else "*.*.*"
    stored = await read_stream(h.nc.jetstream(), h.subjects.events_stream, body, quiet_s=0.2)
    return [
        (type(e).__name__, e.workflow_id)
        for e in stored
        if isinstance(e, ev.MapComplete | ev.WorkflowPlanned)
        or (isinstance(e, ev.AgentLaunched) and e.phase == "map")
    ]


async def run_all(
    h: Harness,
    workdir: Path,
    first: tuple[str, str],
    then: list[tuple[str, str]],
    hold_s: float = 0.0,
) -> tuple[list[Any], list[tuple[str, str]]]:
    """Run ``first`` until its agents hold every slot, submit ``then`` in order, release
    ``first`` once all of them wait (and ``hold_s`` has passed since the first of them was
    submitted), and follow every workflow to its end."""

    def start(name: str, priority: str, step: str) -> asyncio.Task[Any]:
        text = WORKFLOW.format(name=name, step=step)
        return asyncio.create_task(h.run(text, workdir, workflow_id=name, priority=priority))

    async def stored(kind: str, *wfs: str) -> bool:
        story = await lifecycle(h)
        return all((kind, wf) in story for wf in wfs)

    runs = [start(*first, GATED)]
    await wait_for(lambda: stored("AgentLaunched", first[0]), timeout_s=30, every_s=0.1)
    submitted = time.monotonic()
    for name, priority in then:
        runs.append(start(name, priority, "true"))
        await asyncio.sleep(0.05)  # distinct submission times: FIFO is by submission
    await wait_for(lambda: stored("WorkflowPlanned", *(n for n, _ in then)), timeout_s=30)
    await wait_for(lambda: time.monotonic() >= submitted + hold_s, timeout_s=hold_s + 1)
    (workdir / "release").touch()
    ends = await asyncio.wait_for(asyncio.gather(*runs), 120)
    story = [(k, wf) for k, wf in await lifecycle(h) if k != "WorkflowPlanned"]
    return ends, story


async def test_waiting_workflows_start_by_priority(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    tag = secrets.token_hex(3)
    first = (f"busy-{tag}", "low")
    normal, low, high = f"normal-{tag}", f"low-{tag}", f"high-{tag}"
    async with services(nats_url, prefix, tmp_path, max_slots=2) as h:
        ends, story = await run_all(
            h, workdir, first, [(normal, "normal"), (low, "low"), (high, "high")]
        )
    assert all(isinstance(e, ev.WorkflowCompleted) for e in ends), ends
    # one workflow at a time (2 slots, 2 each): each launch follows the previous completion
    assert story == [
        ("AgentLaunched", first[0]),
        ("MapComplete", first[0]),
        ("AgentLaunched", high),
        ("MapComplete", high),
        ("AgentLaunched", normal),
        ("MapComplete", normal),
        ("AgentLaunched", low),
        ("MapComplete", low),
    ]


async def test_a_long_wait_lifts_a_low_workflow(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    """With aging at 0.5 s, a low workflow that has waited two periods when slots free up
    counts as high, and, submitted first, starts ahead of the high one."""
    tag = secrets.token_hex(3)
    first = (f"busy-{tag}", "normal")
    low, high = f"low-{tag}", f"high-{tag}"
    async with services(nats_url, prefix, tmp_path, max_slots=2, aging_s=0.5) as h:
        ends, story = await run_all(h, workdir, first, [(low, "low"), (high, "high")], hold_s=1.2)
    assert all(isinstance(e, ev.WorkflowCompleted) for e in ends), ends
    launches = [wf for kind, wf in story if kind == "AgentLaunched"]
    assert launches == [first[0], low, high]
