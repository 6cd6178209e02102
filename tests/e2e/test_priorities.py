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

import msgspec
import pytest

from helpers import Harness, read_stream, services
from jetreduce.contract import events as ev
from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.records import Phase, StoredSpec, WorkflowRecord
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.lang.parse import parse_workflow
from jetreduce.launcher import service as launcher_service
from jetreduce.launcher.service import Launcher
from jetreduce.runtime.connection import connect
from jetreduce.runtime.service import ServiceContext
from jetreduce.runtime.settings import NatsSettings
from jetreduce.runtime.state import StateStore
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
GATED = "while [ ! -e {release} ]; do sleep 0.05; done"
"""The first workflow's items hold every slot until the test creates ``release`` (an absolute
path: each agent runs in a copy of the workflow directory, which a later file never reaches)."""


async def lifecycle(h: Harness) -> list[tuple[str, str]]:
    """(event type, workflow) of every plan, launch and map completion, in stream order."""
    body = f"{h.subjects.prefix}.*.*.*" if h.subjects.prefix else "*.*.*"
    stored = await read_stream(h.nc.jetstream(), h.subjects.events_stream, body)
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

    release = workdir / "release"
    runs = [start(*first, GATED.format(release=release))]
    await wait_for(lambda: stored("AgentLaunched", first[0]), timeout_s=30, every_s=0.1)
    submitted = time.monotonic()
    for name, priority in then:
        runs.append(start(name, priority, "true"))
        await asyncio.sleep(0.05)  # distinct submission times: FIFO is by submission
    await wait_for(lambda: stored("WorkflowPlanned", *(n for n, _ in then)), timeout_s=30)
    await wait_for(lambda: time.monotonic() >= submitted + hold_s, timeout_s=hold_s + 1)
    release.touch()
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


class RecordingBackend:
    """An ``AgentBackend`` that runs nothing: it records launches and stops."""

    name = "recording"
    on_exit = None
    on_status = None
    on_released = None

    def __init__(self) -> None:
        self.runs: set[tuple[str, str]] = set()
        self.launched: list[str] = []

    def plan(self, parallel: int) -> list[int]:
        return [parallel]

    def running(self, wf: str, phase: str) -> bool:
        return (wf, phase) in self.runs

    def held(self, wf: str, phase: str) -> int | None:
        return None  # counted as planned

    async def sync(self) -> None:
        pass

    def refusal(self, spec: StoredSpec) -> str | None:
        return None

    async def launch(self, wf: str, phase: str, slots: list[int], spec: StoredSpec) -> int:
        if (wf, phase) in self.runs:
            return 0
        self.runs.add((wf, phase))
        self.launched.append(wf)
        return len(slots)

    async def stop(self, wf: str, phase: str | None = None, grace_s: float = 10.0) -> None:
        self.runs -= {r for r in self.runs if r[0] == wf and phase in (None, r[1])}

    async def stop_all(self, grace_s: float = 10.0) -> None:
        self.runs.clear()


async def test_admission_reads_no_record_but_the_events_own(
    nats_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``--max-slots`` the launcher follows the mapping workflows through a watch of
    the records: handling a lifecycle event reads that workflow's record, never all of them
    (there are 60 finished workflows here), and still admits by priority."""
    monkeypatch.setattr(launcher_service, "RECONCILE_EVERY_S", 3600.0)  # only the first one
    spec = StoredSpec(
        workflow=parse_workflow(WORKFLOW.format(name="w", step="true"), source="t.yml").workflow,
        options=SubmitOptions(),
    )
    nc = await connect(NatsSettings(url=nats_url, prefix=prefix), name="admission-reads")
    subjects = Subjects(prefix)
    await declare(nc.jetstream(), subjects, None)
    ctx = ServiceContext(nc=nc, js=nc.jetstream(), subjects=subjects)
    state = StateStore(ctx.js, subjects)

    async def add(wf: str, phase: Phase, priority: str = "normal", at: float = 0.0) -> None:
        record = WorkflowRecord(
            workflow_id=wf,
            name="w",
            phase=phase,
            created_ts=at or time.time(),
            updated_ts=at or time.time(),
            total=2,
            max_parallel=2,
        )
        assert await state.create(record)
        opts = SubmitOptions(priority=priority)
        await state.put_spec(wf, msgspec.structs.replace(spec, options=opts))

    for n in range(60):
        await add(f"old-{n}", Phase.COMPLETED)
    await add("busy", Phase.MAPPING, at=time.time() - 20)
    await add("waiting", Phase.MAPPING, at=time.time() - 10)
    backend = RecordingBackend()
    launcher = Launcher(ctx, backend, max_slots=2)
    stop = asyncio.Event()
    task = asyncio.create_task(launcher.run(stop))
    try:
        # restart path: the first reconcile admits from every record (here: via the watch)
        await wait_for(lambda: backend.launched == ["busy"], timeout_s=10)
        lists = 0
        real_list = launcher.state.list

        async def counted() -> list[WorkflowRecord]:
            nonlocal lists
            lists += 1
            return await real_list()

        monkeypatch.setattr(launcher.state, "list", counted)
        await add("urgent", Phase.MAPPING, priority="high")
        await ctx.js.publish(
            subjects.workflow("planned", "urgent"),
            ev.encode(ev.WorkflowPlanned(workflow_id="urgent", total=2, max_parallel=2)),
        )
        for i in range(2):  # the launcher acts on a map.complete the results agree with
            done = ev.ItemDone(
                workflow_id="busy",
                index=i,
                item_id=f"item_{i}",
                output="",
                exit_code=0,
                duration_s=0.0,
                attempts=1,
            )
            await ctx.js.publish(subjects.item_done("busy", i), ev.encode(done))
        await ctx.js.publish(
            subjects.map("complete", "busy"),
            ev.encode(ev.MapComplete(workflow_id="busy", total=2, done=2, dead=0)),
        )
        # busy's slots go to urgent (high), not to waiting, which came first
        await wait_for(lambda: backend.launched == ["busy", "urgent"], timeout_s=10)
        assert lists == 0
        assert not backend.running("waiting", "map")
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await nc.drain()
