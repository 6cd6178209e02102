"""Elastic slots, launcher side (issue 17): with the installation's slots capped, admission
counts the slots a running workflow's agents still hold, and an agent that drains (its queue
ran dry: it exits 0 before ``map.complete``) hands its slots back at once, so a waiting
workflow starts then, not when the first one's map completes.

The drain is simulated by the agent command (the real agents' drain is built elsewhere): map
agents with an index above 0 wait for the test's ``drain`` file and exit 0; every other agent
is the real one. Real nats-server, in-process services, agents as child processes."""

from __future__ import annotations

import asyncio
import secrets
import sys
from pathlib import Path

import pytest

from helpers import Harness, read_stream, services
from jetreduce.contract import events as ev
from jetreduce.launcher import service as launcher_service
from jetreduce.launcher.local import LocalBackend
from jetreduce.runtime.settings import NatsSettings
from support import wait_for

pytestmark = pytest.mark.anyio

BUSY = """
name: busy
map:
  input: "seq 1 2"
  max_parallel: 2
  agent_template:
    - shell: "while [ ! -e {release} ]; do sleep 0.05; done"
"""
SMALL = """
name: small
map:
  input: "seq 1 2"
  max_parallel: 1
  agent_template:
    - shell: "true"
"""
AGENT = f"{sys.executable} -m jetreduce.cli.agent_main"
DRAINING = """
if [ "$JETREDUCE_PHASE" = map ] && [ "$JETREDUCE_AGENT_INDEX" != 0 ]; then
  while [ ! -e {drain} ]; do sleep 0.05; done
  exit 0
fi
exec {agent}
"""


async def story(h: Harness) -> list[tuple[str, str]]:
    body = f"{h.subjects.prefix}.*.*.*" if h.subjects.prefix else "*.*.*"
    stored = await read_stream(h.nc.jetstream(), h.subjects.events_stream, body)
    out = []
    for e in stored:
        if isinstance(e, ev.AgentLaunched) and e.phase == "map":
            out.append(("launched", e.workflow_id))
        elif isinstance(e, ev.MapComplete):
            out.append(("map.complete", e.workflow_id))
        elif isinstance(e, ev.WorkflowPlanned):
            out.append(("planned", e.workflow_id))
        elif isinstance(e, ev.WorkflowCompleted):
            out.append(("completed", e.workflow_id))
    return out


async def test_a_drained_agent_hands_its_slot_to_a_waiting_workflow(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launcher_service, "RECONCILE_EVERY_S", 3600.0)  # no periodic re-admit
    tag = secrets.token_hex(3)
    busy, small = f"busy-{tag}", f"small-{tag}"
    release, drain = workdir / "release", tmp_path / "drain"
    agents = LocalBackend(
        NatsSettings(url=nats_url, prefix=prefix),
        log_dir=tmp_path / "agent-logs",
        max_processes=2,
        command=("sh", "-c", DRAINING.format(drain=drain, agent=AGENT)),
    )

    async def seen(*events: tuple[str, str]) -> bool:
        got = await story(h)
        return all(e in got for e in events)

    async with services(nats_url, prefix, tmp_path, agent_backend=agents, max_slots=2) as h:
        first = asyncio.create_task(
            h.run(BUSY.format(release=release), workdir, workflow_id=busy, timeout_s=60)
        )
        await wait_for(lambda: seen(("launched", busy)), timeout_s=30)
        second = asyncio.create_task(h.run(SMALL, workdir, workflow_id=small, timeout_s=60))
        await wait_for(lambda: seen(("planned", small)), timeout_s=30)
        assert agents.held(busy, "map") == 2
        assert not await seen(("launched", small))  # both slots are busy's

        drain.touch()  # busy's agent 1 finds its queue dry and leaves: one slot is free
        done = await asyncio.wait_for(second, 30)  # the small one runs in it, and completes
        assert isinstance(done, ev.WorkflowCompleted), done
        assert agents.held(busy, "map") == 1
        assert not await seen(("map.complete", busy))  # all before busy's map completed

        release.touch()
        done = await asyncio.wait_for(first, 30)
        assert isinstance(done, ev.WorkflowCompleted), done
        events = await story(h)
    assert events.index(("completed", small)) < events.index(("map.complete", busy))
