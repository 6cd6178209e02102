"""The reduce does not wait for the map agents to exit (issue 18: with 1,000 agents it waited
14 s): the launcher stops them in the background, starts the reduce at once, and counts their
slots until they are gone, so a workflow waiting for slots starts only then. A shutdown while
they are being stopped leaves nothing running (the test's leak check enforces it).

The map agents' slow exit is a test-only backend: a real :class:`LocalBackend` whose ``stop``
of a map phase first waits for the test to open a gate (agents that take their time to go,
made deterministic). Real nats-server, in-process services, agents as child processes."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

import pytest

from helpers import Harness, read_stream, services
from jetreduce.contract import events as ev
from jetreduce.launcher.local import LocalBackend
from jetreduce.runtime.settings import NatsSettings
from support import wait_for

pytestmark = pytest.mark.anyio

GATED = """
name: gated
map:
  input: "seq 1 2"
  max_parallel: 2
  agent_template:
    - shell: "while [ ! -e {release} ]; do sleep 0.05; done"
reduce:
  - shell: "echo reduced"
"""
"""Two items that hold both slots until the test creates ``release`` (an absolute path)."""
WAITING = """
name: waiting
map:
  input: "seq 1 2"
  max_parallel: 2
  agent_template:
    - shell: "true"
"""


class SlowMapStop(LocalBackend):
    """Stopping a map phase waits for :attr:`gate` first, and until the gate opens a map
    phase's agents count as holding their slots (``held``): agents slow to go. Real agents
    leave by themselves at ``map.complete``, and a fast exit would free the slots before
    the stop began (fresh clone 20 saw the waiting workflow admitted so, rightly)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.map_slots: dict[str, int] = {}
        self.map_stops: list[str] = []
        """Workflows whose map stop was asked for."""
        self.map_stopped: list[str] = []
        """Workflows whose map stop returned."""

    async def launch(self, wf: str, phase: str, slots: list[int], spec: Any) -> int:
        if phase == "map":
            self.map_slots[wf] = sum(slots)
        return await super().launch(wf, phase, slots, spec)

    def held(self, wf: str, phase: str) -> int | None:
        if phase == "map" and wf in self.map_slots and not self.gate.is_set():
            return self.map_slots[wf]
        return super().held(wf, phase)

    async def stop(self, wf: str, phase: str | None = None, grace_s: float = 10.0) -> None:
        if phase == "map":
            self.map_stops.append(wf)
            await self.gate.wait()
        await super().stop(wf, phase, grace_s)
        if phase == "map":
            self.map_stopped.append(wf)


async def story(h: Harness) -> list[tuple[str, str, str]]:
    """(event type, workflow, phase) of the launches, map completions and workflow ends."""
    body = f"{h.subjects.prefix}.*.*.*" if h.subjects.prefix else "*.*.*"
    stored = await read_stream(h.nc.jetstream(), h.subjects.events_stream, body)
    out = []
    for e in stored:
        if isinstance(e, ev.AgentLaunched):
            out.append(("launched", e.workflow_id, e.phase))
        elif isinstance(e, ev.MapComplete):
            out.append(("map.complete", e.workflow_id, "map"))
        elif isinstance(e, ev.WorkflowCompleted):
            out.append(("completed", e.workflow_id, ""))
    return out


def backend(nats_url: str, prefix: str, tmp_path: Path) -> SlowMapStop:
    settings = NatsSettings(url=nats_url, prefix=prefix)
    return SlowMapStop(settings, log_dir=tmp_path / "agent-logs", max_processes=2)


async def test_the_reduce_starts_while_the_map_agents_are_still_being_stopped(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    tag = secrets.token_hex(3)
    first, second = f"first-{tag}", f"second-{tag}"
    agents = backend(nats_url, prefix, tmp_path)
    release = workdir / "release"
    async with services(nats_url, prefix, tmp_path, agent_backend=agents, max_slots=2) as h:
        runs = [
            asyncio.create_task(
                h.run(GATED.format(release=release), workdir, workflow_id=first, timeout_s=60)
            )
        ]
        await wait_for(lambda: _has(h, ("launched", first, "map")), timeout_s=30)
        runs.append(asyncio.create_task(h.run(WAITING, workdir, workflow_id=second)))
        await wait_for(lambda: _planned(h, second), timeout_s=30)
        release.touch()

        # The first workflow's reduce runs, and the workflow completes, while its map
        # agents' stop has not returned: nothing waited for them.
        done = await asyncio.wait_for(runs[0], 60)
        assert isinstance(done, ev.WorkflowCompleted), done
        assert agents.map_stops == [first] and agents.map_stopped == []
        events = await story(h)
        assert events.index(("launched", first, "reduce")) > events.index(
            ("map.complete", first, "map")
        )
        # Their slots still count: the waiting workflow has no agents yet.
        assert ("launched", second, "map") not in events, events

        agents.gate.set()  # the map agents are gone now: their slots go to the waiting one
        done = await asyncio.wait_for(runs[1], 60)
        assert isinstance(done, ev.WorkflowCompleted), done
        assert agents.map_stopped[0] == first
        events = await story(h)
    assert events.index(("launched", second, "map")) > events.index(("completed", first, ""))


async def test_a_shutdown_mid_stop_leaves_no_agent_behind(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    """The services stop while a map stop waits at its gate: the launcher ends that stop and
    the backend's ``stop_all`` takes its agents (the leak check fails a test that leaves any)."""
    wf = f"cut-{secrets.token_hex(3)}"
    agents = backend(nats_url, prefix, tmp_path)
    release = workdir / "release"
    async with services(nats_url, prefix, tmp_path, agent_backend=agents) as h:
        run = asyncio.create_task(h.run(GATED.format(release=release), workdir, workflow_id=wf))
        await wait_for(lambda: _has(h, ("launched", wf, "map")), timeout_s=30)
        release.touch()
        await wait_for(lambda: _has(h, ("launched", wf, "reduce")), timeout_s=30)
        assert agents.map_stops == [wf] and not agents.map_stopped
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
    assert not agents.running(wf, "map") and not agents.running(wf, "reduce")
    assert agents.map_stopped == []  # ended by the shutdown, not by the gate


async def _has(h: Harness, event: tuple[str, str, str]) -> bool:
    return event in await story(h)


async def _planned(h: Harness, wf: str) -> bool:
    return bool(
        await read_stream(
            h.nc.jetstream(), h.subjects.events_stream, h.subjects.workflow("planned", wf)
        )
    )
