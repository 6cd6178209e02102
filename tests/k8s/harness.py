"""The real services (planner, launcher with ``KubernetesBackend``, aggregator, janitor) on the
session nats-server, for the tests that run workflows through the process kubelet."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from helpers import read_stream
from jetreduce.aggregator.service import Aggregator
from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.records import StoredSpec
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.janitor.service import Janitor
from jetreduce.lang.parse import parse_workflow
from jetreduce.launcher.backend import AgentBackend
from jetreduce.launcher.kubernetes import KubernetesBackend
from jetreduce.launcher.service import Launcher
from jetreduce.planner.service import Planner
from jetreduce.runtime.connection import connect
from jetreduce.runtime.service import ServiceContext
from jetreduce.runtime.settings import NatsSettings


@contextlib.asynccontextmanager
async def orchestrator(
    settings: NatsSettings, backend: AgentBackend, *, sweep_every_s: float = 60.0
) -> AsyncIterator[ServiceContext]:
    """The four services, wired as an installation with the kubernetes backend should be:
    the janitor sweeps the backend's objects for orphans (a local backend has none to
    sweep). Re-raises a service's failure."""
    nc = await connect(settings, name="k8s-test-services")
    subjects = Subjects(settings.prefix)
    await declare(nc.jetstream(), subjects, None)
    ctx = ServiceContext(nc=nc, js=nc.jetstream(), subjects=subjects)
    stop = asyncio.Event()
    services: list[Any] = [
        Planner(ctx),
        Launcher(ctx, backend),
        Aggregator(ctx),
        Janitor(
            ctx,
            objects=backend if isinstance(backend, KubernetesBackend) else None,
            sweep_every_s=sweep_every_s,
        ),
    ]
    tasks = [asyncio.create_task(s.run(stop), name=type(s).__name__) for s in services]
    try:
        yield ctx
    finally:
        stop.set()
        _, pending = await asyncio.wait(tasks, timeout=20)
        for t in pending:
            t.cancel()
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        await nc.drain()


async def stored_events(ctx: ServiceContext, subject: str) -> list[Any]:
    """Every event stored on ``subject``, in order."""
    return await read_stream(ctx.js, ctx.subjects.events_stream, subject)


MAP_ONLY = """
name: map-only
mode: mapreduce
map:
  input: items.json
  json_path: "$.items[*]"
  max_parallel: 3
  agent_template:
    - shell: "true"
"""


def map_only_spec() -> StoredSpec:
    """A stored spec of a one-step map-only workflow, for backend tests that launch Jobs
    without the services (the slots come from the test)."""
    return StoredSpec(
        workflow=parse_workflow(MAP_ONLY, source="t.yml").workflow,
        options=SubmitOptions(backend="kubernetes"),
    )
