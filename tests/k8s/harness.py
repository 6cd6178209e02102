"""The real services (planner, launcher with ``KubernetesBackend``, aggregator, janitor) on the
session nats-server, for the tests that run workflows through the process kubelet; and the
pieces backend tests share (a spec to launch, a Job LIST held back)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from helpers import read_stream
from jetreduce.cli.host import ServiceHost
from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.records import StoredSpec
from jetreduce.lang.parse import parse_workflow
from jetreduce.launcher.backend import AgentBackend
from jetreduce.launcher.k8s_api import KubeApi
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


class GatedJobList(KubeApi):
    """Once :attr:`armed`, the next Job LIST answers, sets :attr:`listed`, and returns only
    when :attr:`gate` is set: a poll slow to go through its Jobs, made deterministic, so that
    a test can launch or stop between a poll's listing and its end (:meth:`slow_poll`).
    Install it as the backend's ``kube``."""

    def __init__(self, kube: KubeApi) -> None:
        super().__init__(kube.client, kube.request_timeout_s)
        self.armed = False
        self.listed = asyncio.Event()
        self.gate = asyncio.Event()
        self.gated: Any = self.batch.list_namespaced_job
        """The LIST that holds the poll: the Jobs' (default), or the pods' of a Job."""

    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        answer = await super().call(fn, *args, **kwargs)
        if self.armed and fn == self.gated:
            self.armed = False
            self.listed.set()
            await self.gate.wait()
        return answer

    @contextlib.asynccontextmanager
    async def slow_poll(
        self, backend: KubernetesBackend, *, at_pods: bool = False
    ) -> AsyncIterator[None]:
        """Within: a poll of ``backend`` has listed the Jobs (or, ``at_pods``, a Job's pods)
        and waits before going on. On leaving, the poll goes on, and is awaited."""
        self.gated = self.core.list_namespaced_pod if at_pods else self.batch.list_namespaced_job
        self.armed = True
        self.listed.clear()
        self.gate.clear()
        poll = asyncio.create_task(backend.poll_once())
        try:
            await asyncio.wait_for(self.listed.wait(), 10)
            yield
        finally:
            self.gate.set()
            await asyncio.wait_for(poll, 10)
