"""Launcher service: see the package docstring."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.aio.msg import Msg

from jetreduce.contract.events import (
    AgentExited,
    AgentLaunched,
    JobStatus,
    MapComplete,
    PodFailed,
    decode_as,
    encode,
)
from jetreduce.contract.records import Phase, StoredSpec
from jetreduce.launcher.admission import Candidate, admit
from jetreduce.launcher.backend import AgentBackend
from jetreduce.runtime.publish import is_stored, publish_retrying
from jetreduce.runtime.service import EventConsumer, ServiceContext
from jetreduce.runtime.state import StateStore

__all__ = ["Launcher"]

log = logging.getLogger(__name__)

_TERMINAL = ("completed", "failed", "cancelled", "timed_out")
RECONCILE_EVERY_S = 15.0
AGING_S = 300.0
"""Waiting this long lifts a workflow one priority lane (launcher/admission.py)."""


class Launcher:
    """Starts each phase's agents. ``max_slots`` caps the map agent slots of all workflows
    together (None: no cap); waiting workflows are admitted by priority (admission.py)."""

    def __init__(
        self,
        ctx: ServiceContext,
        backend: AgentBackend,
        *,
        max_slots: int | None = None,
        aging_s: float = AGING_S,
    ) -> None:
        if max_slots is not None and max_slots < 1:
            raise ValueError(f"max_slots must be at least 1, got {max_slots}")
        self.ctx = ctx
        self.s = ctx.subjects
        self.backend = backend
        self.state = StateStore(ctx.js, ctx.subjects)
        self.max_slots = max_slots
        self.aging_s = aging_s
        self._admitting = asyncio.Lock()
        backend.on_exit = self._on_agent_exit
        backend.on_status = self._on_status

    async def run(self, stop: asyncio.Event) -> None:
        filters = [
            self.s.workflow("accepted", "*"),
            self.s.workflow("planned", "*"),
            self.s.workflow("reopened", "*"),
            self.s.map("complete", "*"),
            *[self.s.workflow(e, "*") for e in _TERMINAL],
        ]
        consumer = EventConsumer(
            self.ctx,
            stream=self.s.events_stream,
            durable="launcher",
            filters=filters,
            handler=self.on_event,
        )
        try:
            await asyncio.gather(consumer.run(stop), self._reconciler(stop))
        finally:
            await self.backend.stop_all()

    async def _reconciler(self, stop: asyncio.Event) -> None:
        """Re-drive on start and periodically: a launcher that restarted (or a ``run`` that
        is resumed) has no agents, so every unfinished phase gets its agents back. Launching
        is idempotent, so racing the event handlers is harmless."""
        while not stop.is_set():
            try:
                await self.reconcile()
            except Exception:
                log.exception("launcher: reconcile failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), RECONCILE_EVERY_S)

    async def reconcile(self) -> None:
        for record in await self.state.list():
            if record.phase.terminal:
                continue
            wf = record.workflow_id
            spec = await self.state.get_spec(wf)
            if spec is None:
                continue
            if record.phase in (Phase.ACCEPTED, Phase.SETUP):
                if not await self._stored(self.s.setup("completed", wf)):
                    await self._launch(wf, "setup", [1], spec)
            elif record.phase == Phase.REDUCING and not await self._stored(
                self.s.reduce("completed", wf)
            ):
                await self._launch(wf, "reduce", [1], spec)
        await self.admit_maps()

    async def admit_maps(self, changed: str | None = None) -> None:
        """Start the map agents of every mapping workflow that may have them now: all of
        them without a slot cap, else by priority while slots are free. ``changed`` names
        the workflow an event was about: without a cap, it is the only one to look at."""
        if self.max_slots is None and changed is not None:
            record = await self.state.get(changed)
            records = [record] if record is not None else []
        else:
            records = await self.state.list()
        async with self._admitting:
            await self._sync_backend()
            used = 0
            waiting: list[Candidate] = []
            specs: dict[str, StoredSpec] = {}
            for record in records:
                if record.phase != Phase.MAPPING or not record.total:
                    continue
                wf = record.workflow_id
                slots = min(record.max_parallel, self.max_slots or record.max_parallel)
                if self.backend.running(wf, "map"):
                    used += slots
                    continue
                spec = await self.state.get_spec(wf)
                if spec is None or await self._stored(self.s.map("complete", wf)):
                    continue
                specs[wf] = spec
                waiting.append(Candidate(wf, spec.options.priority, record.created_ts, slots))
            free = None if self.max_slots is None else max(0, self.max_slots - used)
            admitted = admit(waiting, free, time.time(), self.aging_s)
            for c in admitted:
                await self._launch(
                    c.workflow_id, "map", self.backend.plan(c.slots), specs[c.workflow_id]
                )
            if len(admitted) < len(waiting):
                log.info(
                    "%d workflow(s) wait for agent slots (%d of %s in use)",
                    len(waiting) - len(admitted),
                    used + sum(c.slots for c in admitted),
                    self.max_slots,
                )

    async def _sync_backend(self) -> None:
        """Before counting used slots: a backend whose agents outlive the launcher
        (Kubernetes Jobs) must have looked at what runs, or a restarted launcher would see
        every slot free. ``sync`` is optional: local agents die with the launcher, so what
        it launched itself is all that runs."""
        sync = getattr(self.backend, "sync", None)
        if sync is not None:
            await sync()

    async def _stored(self, subject: str) -> bool:
        return await is_stored(self.ctx.js, self.s.events_stream, subject)

    async def on_event(self, msg: Msg) -> None:
        kind = ".".join(msg.subject.split(".")[-3:-1])
        wf = msg.subject.rsplit(".", 1)[-1]
        if kind.startswith("workflow.") and kind.split(".")[1] in _TERMINAL:
            await self.backend.stop(wf)
            if self.max_slots is not None:
                await self.admit_maps()  # its slots are free
            return
        record = await self.state.get(wf)
        spec = await self.state.get_spec(wf)
        if record is None or spec is None or record.phase.terminal:
            return
        if kind == "workflow.accepted":
            if record.phase.order > Phase.SETUP.order:
                return
            await self.state.transition(wf, Phase.SETUP)
            await self._launch(wf, "setup", [1], spec)
        elif kind in ("workflow.planned", "workflow.reopened"):
            await self.admit_maps(wf)
        elif kind == "map.complete":
            complete = decode_as(msg.data, MapComplete)
            await self.backend.stop(wf, "map")
            if self.max_slots is not None:
                await self.admit_maps()
            reduce = spec.workflow.reduce
            if reduce is None or not reduce.steps or complete.total == 0:
                return
            await self.state.transition(wf, Phase.REDUCING)
            await self._launch(wf, "reduce", [1], spec)

    async def _launch(self, wf: str, phase: str, slots: list[int], spec: StoredSpec) -> None:
        refusal = self.backend.refusal(spec)
        if refusal is not None:
            # Not run elsewhere instead: the final agent.exited fails the workflow with why
            # (repeated by the reconciler until the aggregator has done so; it acts once).
            log.warning("workflow %s: %s agents %s", wf, phase, refusal)
            await self._on_agent_exit(wf, phase, -1, -1, False, 0, refusal)
            return
        started = await self.backend.launch(wf, phase, slots, spec)
        if started:
            log.info("workflow %s: launched %d %s agent(s)", wf, started, phase)
            await publish_retrying(
                self.ctx.js,
                self.s.agent("launched", wf),
                encode(
                    AgentLaunched(
                        workflow_id=wf,
                        phase=phase,
                        agents=started,
                        slots=sum(slots),
                        backend=self.backend.name,
                    )
                ),
            )

    async def _on_agent_exit(
        self,
        wf: str,
        phase: str,
        index: int,
        code: int,
        restarted: bool,
        remaining: int,
        reason: str = "",
    ) -> None:
        await publish_retrying(
            self.ctx.js,
            self.s.agent("exited", wf),
            encode(
                AgentExited(
                    workflow_id=wf,
                    phase=phase,
                    index=index,
                    exit_code=code,
                    restarted=restarted,
                    remaining=remaining,
                    reason=reason,
                )
            ),
        )

    async def _on_status(self, event: JobStatus | PodFailed) -> None:
        """Publish a backend's Job/pod status as ``agent.job.<wf>`` / ``agent.pod_failed.<wf>``
        (the event's tag names its subject)."""
        kind = "job" if isinstance(event, JobStatus) else "pod_failed"
        await publish_retrying(self.ctx.js, self.s.agent(kind, event.workflow_id), encode(event))
