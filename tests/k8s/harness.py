"""The real services (planner, launcher with ``KubernetesBackend``, aggregator, janitor) on the
session nats-server, for the tests that run workflows through the process kubelet."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from helpers import read_stream
from jetreduce.cli.host import ServiceHost
from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.records import StoredSpec
from jetreduce.lang.parse import parse_workflow
from jetreduce.launcher.backend import AgentBackend
from jetreduce.launcher.kubernetes import KubernetesBackend
from jetreduce.runtime.service import ServiceContext
from jetreduce.runtime.settings import NatsSettings


@contextlib.asynccontextmanager
async def orchestrator(
    settings: NatsSettings, backend: AgentBackend, *, sweep_every_s: float = 60.0
) -> AsyncIterator[ServiceContext]:
    """The four services hosted as ``jetreduce services up`` hosts them (``ServiceHost``),
    with the backend the test built: the janitor sweeps the backend's objects for orphans (a
    local backend has none to sweep). Re-raises a service's failure."""
    pods = backend if isinstance(backend, KubernetesBackend) else None
    host = ServiceHost(
        settings,
        backend="local" if pods is None else "kubernetes",
        agent_backend=backend,
        objects=pods,
        sweep_every_s=sweep_every_s,
    )
    async with host.running():
        assert host.context is not None
        yield host.context
    await host.wait()  # stopped: re-raises the failure of a service, if one failed


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
