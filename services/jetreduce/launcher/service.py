"""Launcher service: see the package docstring."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from jetreduce.contract.events import (
    AgentExited,
    AgentLaunched,
    MapComplete,
    WorkflowPlanned,
    decode,
    encode,
)
from jetreduce.contract.records import Phase, StoredSpec
from jetreduce.launcher.backend import AgentBackend
from jetreduce.runtime.publish import publish_retrying
from jetreduce.runtime.service import EventConsumer, ServiceContext
from jetreduce.runtime.state import StateStore

__all__ = ["Launcher"]

log = logging.getLogger(__name__)

_TERMINAL = ("completed", "failed", "cancelled", "timed_out")
RECONCILE_EVERY_S = 15.0


class Launcher:
    def __init__(self, ctx: ServiceContext, backend: AgentBackend) -> None:
        self.ctx = ctx
        self.s = ctx.subjects
        self.backend = backend
        self.state = StateStore(ctx.js, ctx.subjects)
        backend.on_exit = self._on_agent_exit

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
            elif record.phase == Phase.MAPPING and record.total:
                if not await self._stored(self.s.map("complete", wf)):
                    await self._launch(wf, "map", self.backend.plan(record.max_parallel), spec)
            elif record.phase == Phase.REDUCING and not await self._stored(
                self.s.reduce("completed", wf)
            ):
                await self._launch(wf, "reduce", [1], spec)

    async def _stored(self, subject: str) -> bool:
        try:
            await self.ctx.js.get_last_msg(self.s.events_stream, subject)
        except NotFoundError:
            return False
        return True

    async def on_event(self, msg: Msg) -> None:
        kind = ".".join(msg.subject.split(".")[-3:-1])
        wf = msg.subject.rsplit(".", 1)[-1]
        if kind.startswith("workflow.") and kind.split(".")[1] in _TERMINAL:
            await self.backend.stop(wf)
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
        elif kind == "workflow.planned":
            planned = decode(msg.data)
            assert isinstance(planned, WorkflowPlanned)
            if planned.total == 0 or record.phase.order > Phase.MAPPING.order:
                return
            await self._launch(wf, "map", self.backend.plan(planned.max_parallel), spec)
        elif kind == "workflow.reopened":
            if record.phase == Phase.MAPPING and record.total:
                await self._launch(wf, "map", self.backend.plan(record.max_parallel), spec)
        elif kind == "map.complete":
            await self.backend.stop(wf, "map")
            complete = decode(msg.data)
            assert isinstance(complete, MapComplete)
            reduce = spec.workflow.reduce
            if reduce is None or not reduce.steps or complete.total == 0:
                return
            await self.state.transition(wf, Phase.REDUCING)
            await self._launch(wf, "reduce", [1], spec)

    async def _launch(self, wf: str, phase: str, slots: list[int], spec: StoredSpec) -> None:
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
        self, wf: str, phase: str, index: int, code: int, restarted: bool, remaining: int
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
                )
            ),
        )
