"""A launcher that can no longer renew its lease (cut off from NATS) steps down and stops its
local agents before the other launcher may take over and start its own: the slots of the
two never add up. Real local backends; the agents are plain ``sleep`` processes (they stand
for agents that would keep running)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import pytest

from jetreduce.contract import events as ev
from jetreduce.contract.records import StoredSpec
from jetreduce.lang import parse_workflow
from jetreduce.launcher.local import LocalBackend
from jetreduce.launcher.service import Launcher
from jetreduce.runtime.connection import connect
from jetreduce.runtime.leadership import Leadership
from jetreduce.runtime.service import ServiceContext
from jetreduce.runtime.settings import NatsSettings
from jetreduce.runtime.state import StateStore
from support import mapping_record, wait_for

from .test_services import context

pytestmark = pytest.mark.anyio

WF = "wf-step-down"
WORKFLOW = """
name: step-down
map:
  input: items.json
  max_parallel: 2
  agent_template:
    - shell: "true"
"""
TTL_S = 2.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def _pids(backend: LocalBackend) -> list[int]:
    runs = [r for rs in backend._agents.values() for r in rs]
    return [r.proc.pid for r in runs if r.proc is not None and r.proc.returncode is None]


async def _mapping(ctx: ServiceContext) -> None:
    state = StateStore(ctx.js, ctx.subjects)
    spec = StoredSpec(workflow=parse_workflow(WORKFLOW).workflow, options=ev.SubmitOptions())
    await state.put_spec(WF, spec)
    assert await state.create(mapping_record(WF, 4, "step-down", max_parallel=2))


def _launcher(ctx: ServiceContext, js: object, name: str) -> tuple[Launcher, LocalBackend]:
    settings = NatsSettings(url="nats://127.0.0.1:1", prefix=ctx.subjects.prefix)
    backend = LocalBackend(settings, max_processes=2, command=("sleep", "60"))
    leadership = Leadership(
        js,  # type: ignore[arg-type]
        ctx.subjects.claims_bucket,
        ctx.subjects.claim_key("leader", "launcher"),
        name="launcher",
        ttl_s=TTL_S,
        poll_s=0.05,
        holder=f"{name}/1",
        host=name,  # as two hosts: the standby must wait for the lease to expire
    )
    return Launcher(ctx, backend, max_slots=2, leadership=leadership), backend


async def test_a_cut_off_leader_stops_its_agents_before_a_successor_starts(
    nats_url: str, prefix: str
) -> None:
    async with context(nats_url, prefix) as ctx:
        await _mapping(ctx)
        lease_nc = await connect(NatsSettings(url=nats_url, prefix=prefix), forever=False)
        first, first_backend = _launcher(ctx, lease_nc.jetstream(), "first")
        second, second_backend = _launcher(ctx, ctx.js, "second")
        stop = asyncio.Event()
        tasks = [asyncio.create_task(first.run(stop))]
        try:
            await wait_for(lambda: first.leadership.leading, 5)
            tasks.append(asyncio.create_task(second.run(stop)))
            await wait_for(lambda: len(_pids(first_backend)) == 2, 10)
            old = _pids(first_backend)
            assert not second.leadership.leading and not _pids(second_backend)

            # The first launcher's lease connection is cut: it cannot renew.
            await lease_nc.close()
            cut = time.monotonic()
            old_gone: float | None = None
            while not _pids(second_backend):
                # Sampled every 10 ms: never the old agents beside the new ones.
                assert time.monotonic() - cut < 3 * TTL_S, "no take-over"
                if old_gone is None and not any(_alive(pid) for pid in old):
                    old_gone = time.monotonic()
                await asyncio.sleep(0.01)
            assert not any(_alive(pid) for pid in old), "the old leader's agents still run"
            assert old_gone is not None, "the old agents died only as the new ones started"
            assert not first.leadership.leading
            assert not first_backend.running(WF, "map")
            await wait_for(lambda: len(_pids(second_backend)) == 2, 5)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
            with contextlib.suppress(Exception):
                await lease_nc.close()
