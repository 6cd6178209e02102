"""Hosting services in one process: ``jetreduce services up``, ``jetreduce service NAME`` and
the embedded ``jetreduce run``. Each service runs as a supervised task; if one fails, the rest
are stopped and the error is raised (a half-running orchestrator is worse than a dead one)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from nats.js import JetStreamContext
from nats.js.errors import BadRequestError

from jetreduce.aggregator.service import Aggregator
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import TopologySettings, declare
from jetreduce.janitor.k8s_sweep import ORPHAN_SWEEP_S, WorkflowObjects
from jetreduce.janitor.service import Janitor
from jetreduce.launcher.backend import AgentBackend
from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.launcher.local import LocalBackend
from jetreduce.launcher.service import AGING_S, Launcher
from jetreduce.planner.service import Planner
from jetreduce.runtime.connection import close_quietly, connect
from jetreduce.runtime.health import health_server
from jetreduce.runtime.http import RouteServer
from jetreduce.runtime.service import TRANSIENT, ServiceContext
from jetreduce.runtime.settings import NatsSettings
from jetreduce.runtime.state import StateStore
from jetreduce.runtime.telemetry import (
    EventMetrics,
    MetricsServer,
    ensure_prometheus_reader,
)
from jetreduce.runtime.telemetry import meter as current_meter

__all__ = ["BACKENDS", "HEALTH_PORT_ENV", "SERVICE_NAMES", "ServiceHost"]

log = logging.getLogger(__name__)

NO_PEERS_FOR_PLACEMENT = 10005
"""JetStream's "no suitable peers for placement": a replicated stream's peer is offline."""

SERVICE_NAMES = ("planner", "launcher", "aggregator", "janitor")
BACKENDS = ("local", "kubernetes")
HEALTH_PORT_ENV = "JETREDUCE_HEALTH_PORT"
"""Serve ``/healthz`` and ``/readyz`` on this port (the Deployments set it; unset: none)."""
NATS_OUTAGE_GRACE_S = 300.0
"""How long NATS may be unreachable before ``/healthz`` fails (and liveness restarts the
pod). Shorter outages restart nothing: the services reconnect on their own, and restarting
every service because NATS is down would only add to the outage."""


class _Service(Protocol):
    async def run(self, stop: asyncio.Event) -> None: ...


class ServiceHost:
    def __init__(
        self,
        settings: NatsSettings,
        names: tuple[str, ...] = SERVICE_NAMES,
        *,
        log_dir: Path | None = None,
        max_processes: int | None = None,
        topology: TopologySettings | None = None,
        backend: str = "local",
        k8s: KubernetesSettings | None = None,
        max_slots: int | None = None,
        aging_s: float = AGING_S,
        default_queue: str | None = None,
        metrics_port: int | None = None,
        metrics_host: str = "0.0.0.0",
        health_port: int | None = None,
        agents: NatsSettings | None = None,
        agent_backend: AgentBackend | None = None,
        objects: WorkflowObjects | None = None,
        sweep_every_s: float = ORPHAN_SWEEP_S,
    ) -> None:
        """``agents``: how the launcher's agents connect (their own NATS identity, the
        ``agents`` role); None: as the services do. ``metrics_port``: serve Prometheus
        ``/metrics`` there (0 picks a free port, see :attr:`metrics_port`); None serves
        nothing. The process hosting the aggregator also derives the orchestrator's metrics
        from its events (``runtime/telemetry``).

        ``agent_backend``: a backend already built for the launcher (a test's, against the
        Kubernetes emulator), used as it is: ``agents``, ``log_dir``, ``max_processes`` and
        ``k8s`` describe how to build one and do not apply to it. ``objects``: what the
        janitor sweeps for orphans every ``sweep_every_s``; by default, on the kubernetes
        backend, the cluster's objects of workflows (nothing on the local one)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: choose from {', '.join(BACKENDS)}")
        self.backend = backend
        self.k8s = k8s
        unknown = set(names) - set(SERVICE_NAMES)
        if unknown:
            raise ValueError(f"unknown service(s): {', '.join(sorted(unknown))}")
        self.settings = settings
        self.agents = agents or settings
        self.names = names
        self.log_dir = log_dir
        self.max_processes = max_processes
        self.max_slots = max_slots
        self.default_queue = default_queue
        self.aging_s = aging_s
        self.topology = topology
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        env_port = os.environ.get(HEALTH_PORT_ENV)
        self.health_port = health_port if health_port is not None or not env_port else int(env_port)
        """``/healthz``/``/readyz`` port (0 picks one); None: ``$JETREDUCE_HEALTH_PORT``."""
        self.nats_grace_s = NATS_OUTAGE_GRACE_S
        self._nats_down_since: float | None = None
        self.agent_backend = agent_backend
        self.objects = objects
        self.sweep_every_s = sweep_every_s
        self.context: ServiceContext | None = None
        """The services' connection while :meth:`running`."""
        self.stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._services: dict[str, _Service] = {}

    def _build(self, ctx: ServiceContext) -> dict[str, _Service]:
        built: dict[str, _Service] = {}
        for name in self.names:
            if name == "planner":
                built[name] = Planner(
                    ctx,
                    default_queue=self.default_queue,
                    local_workdirs=self.backend == "local",
                )
            elif name == "launcher":
                built[name] = Launcher(
                    ctx,
                    self._backend(),
                    max_slots=self.max_slots,
                    aging_s=self.aging_s,
                )
            elif name == "aggregator":
                built[name] = Aggregator(ctx)
            elif name == "janitor":
                built[name] = Janitor(
                    ctx, objects=self._cluster_objects(), sweep_every_s=self.sweep_every_s
                )
        return built

    def _cluster_objects(self) -> WorkflowObjects | None:
        """On Kubernetes the janitor also sweeps objects whose workflow has ended."""
        if self.objects is not None:
            return self.objects
        if self.backend != "kubernetes":
            return None
        from jetreduce.launcher.kubernetes import KubernetesBackend

        return KubernetesBackend(self.settings, self.k8s or KubernetesSettings())

    def _backend(self) -> AgentBackend:
        if self.agent_backend is not None:
            return self.agent_backend
        if self.backend == "kubernetes":
            # Imported here: only installations that use it pay for the kubernetes client.
            from jetreduce.launcher.kubernetes import KubernetesBackend

            # The backend never connects: its settings are what agent pods get.
            return KubernetesBackend(self.agents, self.k8s or KubernetesSettings())
        return LocalBackend(self.agents, log_dir=self.log_dir, max_processes=self.max_processes)

    async def _declare(self, js: JetStreamContext, subjects: Subjects) -> None:
        """Declare the topology, waiting out a cluster that cannot answer yet: no leader (an
        election takes 4-9 s), or a replica's peer not seen back online after a restart. A
        replica started then must come up, not die (issue 19: the survivor of two did, and the
        workflow hung)."""
        while True:
            try:
                await declare(js, subjects, self.topology)
                return
            except (*TRANSIENT, BadRequestError) as exc:
                if isinstance(exc, BadRequestError) and exc.err_code != NO_PEERS_FOR_PLACEMENT:
                    raise
                log.warning("services: JetStream not answering yet (%r); retrying", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 1.0)
                if self.stop.is_set():
                    raise

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ServiceHost]:
        """Start every service; on exit, stop them and close the connection."""
        nc = await connect(self.settings, name="jetreduce-services")
        js = nc.jetstream()
        subjects = Subjects(self.settings.prefix)
        try:
            await self._declare(js, subjects)
        except BaseException:  # stopped while waiting, or a lasting error: no services ran
            await close_quietly(nc)
            raise
        ctx = self.context = ServiceContext(nc=nc, js=js, subjects=subjects)
        server: MetricsServer | None = None
        observer: EventMetrics | None = None
        health: RouteServer | None = None
        try:
            if self.health_port is not None:
                health = health_server(
                    lambda: self._unhealthy(nc),
                    lambda: self._unready(nc),
                    host=self.metrics_host,
                    port=self.health_port,
                    detail=self._leadership,
                )
                self.health_port = (await health.start()).port
            if self.metrics_port is not None:
                reader = ensure_prometheus_reader()
                server = MetricsServer(reader, host=self.metrics_host, port=self.metrics_port)
                await server.start()
                self.metrics_port = server.port
                self._declare_services()
            if current_meter() is not None and "aggregator" in self.names:
                observer = await EventMetrics(nc, subjects, StateStore(js, subjects)).start()
            self._services = self._build(ctx)
            for name, service in self._services.items():
                self._tasks.append(asyncio.create_task(self._guard(name, service), name=name))
            yield self
        finally:
            self.stop.set()
            if self._tasks:
                _, pending = await asyncio.wait(self._tasks, timeout=20)
                for task in pending:
                    task.cancel()
            if observer is not None:
                await observer.stop()
            if health is not None:
                await health.close()
            if server is not None:
                await server.close()
            await close_quietly(nc)

    def _unhealthy(self, nc: Any) -> str | None:
        """Liveness: a hosted service ended (the host then stops: restart it), or NATS has
        been unreachable longer than :attr:`nats_grace_s`."""
        ended = [t.get_name() for t in self._tasks if t.done()]
        if ended and not self.stop.is_set():
            return f"service(s) ended: {', '.join(ended)}"
        if nc.is_connected:
            self._nats_down_since = None
            return None
        now = time.monotonic()
        since = self._nats_down_since = self._nats_down_since or now
        if now - since > self.nats_grace_s:
            return f"NATS unreachable for {now - since:.0f}s"
        return None

    def _unready(self, nc: Any) -> str | None:
        """Readiness: connected to NATS and every hosted service running."""
        if self.stop.is_set():
            return "stopping"
        if not nc.is_connected:
            return "NATS not connected"
        return self._unhealthy(nc)

    def _leadership(self) -> list[str]:
        """``launcher: leading (…)`` or ``launcher: standing by (…)`` on ``/readyz``."""
        launcher = self._services.get("launcher")
        return [launcher.leadership.describe()] if isinstance(launcher, Launcher) else []

    def _declare_services(self) -> None:
        """``jetreduce_services{service=…} 1`` for each service hosted here: every
        endpoint answers something, and a scrape shows what runs where."""
        from opentelemetry.metrics import Observation

        meter = current_meter()
        if meter is not None:
            observations = [Observation(1, {"service": name}) for name in self.names]
            meter.create_observable_gauge(
                "jetreduce.services",
                callbacks=[lambda _o: observations],
                description="Services hosted by this process",
            )
            if "launcher" in self.names:
                meter.create_observable_gauge(
                    "jetreduce.launcher.leader",
                    callbacks=[lambda _o: [Observation(int(self._launcher_leads()))]],
                    description="1 if this process's launcher leads its replicas, else 0",
                )

    def _launcher_leads(self) -> bool:
        launcher = self._services.get("launcher")
        return isinstance(launcher, Launcher) and launcher.leadership.leading

    async def _guard(self, name: str, service: _Service) -> None:
        try:
            await service.run(self.stop)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("service %s failed; stopping the others", name)
            self.stop.set()
            raise
        if not self.stop.is_set():
            log.error("service %s finished unexpectedly; stopping the others", name)
            self.stop.set()

    async def wait(self) -> None:
        """Until stopped (signal) or a service fails; re-raises that failure."""
        await self.stop.wait()
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
