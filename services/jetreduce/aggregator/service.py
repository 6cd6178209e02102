"""Aggregator service: see the package docstring. This module wires its parts together and
decides when each runs: the event consumer (phase outcomes → the workflow's end), the tick
(every counted workflow, ``TICK_S``) and the rescan (which workflows to count).

Counting is counting.py, the arrivals that wake it are arrivals.py, the end of a workflow is
finishing.py (with its utilisation, usage.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.aio.msg import Msg

from jetreduce.aggregator.counting import MapCounter, Tracked
from jetreduce.aggregator.finishing import Finisher
from jetreduce.aggregator.usage import USAGE_WAIT_S
from jetreduce.contract.events import (
    AgentExited,
    Event,
    MapComplete,
    MapFailed,
    ReduceCompleted,
    ReduceFailed,
    SetupFailed,
    WorkflowPlanned,
    WorkflowReopened,
    decode,
)
from jetreduce.contract.records import Phase, needs_reduce
from jetreduce.runtime.publish import is_stored
from jetreduce.runtime.service import EventConsumer, ServiceContext
from jetreduce.runtime.state import StateStore
from jetreduce.runtime.telemetry import bound, messaging, span

__all__ = ["TICK_S", "Aggregator"]

log = logging.getLogger(__name__)

TICK_S = 0.25
"""How often every counted workflow is checked (counting.py says what a check costs). Its
last results wake it sooner (arrivals.py); the tick is what covers anything they missed,
and it paces progress."""
RESCAN_S = 2.0
"""How often the workflow records are read again to find mapping workflows this replica does
not count yet (as cheap as the janitor's timeout sweep, which reads them every second)."""


class Aggregator:
    def __init__(
        self,
        ctx: ServiceContext,
        *,
        rescan_s: float = RESCAN_S,
        usage_wait_s: float = USAGE_WAIT_S,
    ) -> None:
        self.ctx = ctx
        self.s = ctx.subjects
        self.state = StateStore(ctx.js, ctx.subjects)
        self.rescan_s = rescan_s
        self.finisher = Finisher(ctx, self.state, untrack=self._untrack, usage_wait_s=usage_wait_s)
        self.counter = MapCounter(
            ctx, self.state, failed=self.finisher.failed, completed=self._map_completed
        )
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def active(self) -> dict[str, Tracked]:
        """The workflows this replica counts, by id."""
        return self.counter.active

    async def _untrack(self, wf: str) -> None:
        await self.counter.untrack(wf)

    async def run(self, stop: asyncio.Event) -> None:
        consumer = EventConsumer(
            self.ctx,
            stream=self.s.events_stream,
            durable="aggregator",
            filters=[
                self.s.workflow("planned", "*"),
                self.s.workflow("reopened", "*"),
                self.s.setup("failed", "*"),
                self.s.map("complete", "*"),
                self.s.map("failed", "*"),
                self.s.reduce("completed", "*"),
                self.s.reduce("failed", "*"),
                self.s.agent("exited", "*"),
            ],
            handler=self.on_event,
        )
        try:
            await asyncio.gather(consumer.run(stop), self._ticker(stop), self._rescanner(stop))
        finally:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.finisher.close()
            await self.counter.close()

    async def _rescanner(self, stop: asyncio.Event) -> None:
        """Rebuild the set of counted workflows from the records, on start and every
        ``rescan_s``. ``workflow.planned`` reaches one replica of the shared durable
        consumer: if that one dies, the others must still find the workflow, or it stays
        ``mapping`` forever (issue 19)."""
        while not stop.is_set():
            try:
                await self.rescan()
            except Exception:
                log.exception("aggregator: reading the workflow records failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rescan_s)

    async def rescan(self) -> None:
        """Count every mapping workflow whose ``map.complete`` is not stored yet; stop
        counting those that left the map phase (another replica completed or failed them,
        or they were cancelled)."""
        read_at = time.monotonic()
        mapping: dict[str, int] = {}
        for record in await self.state.list():
            if record.phase == Phase.MAPPING and record.total is not None:
                mapping[record.workflow_id] = record.total
        active = self.counter.active
        # Not one tracked since the read began (an event may have just planned or reopened it).
        for wf in [wf for wf, t in active.items() if wf not in mapping and t.started < read_at]:
            await self.counter.untrack(wf)
        for wf, total in mapping.items():
            if wf in active:
                continue
            if await is_stored(self.ctx.js, self.s.events_stream, self.s.map("complete", wf)):
                continue  # counted to the end already; the launcher moves it on
            await self.counter.track(wf, total)
            # Counted at once, as on workflow.planned: its results may all be in already
            # (the replica that had the event is gone or busy), and arrivals wake a count
            # only once one exact count has set their estimate.
            try:
                await self.counter.check(wf)
            except Exception:  # the tick counts it again; the other workflows go on
                log.exception("aggregator: counting %s failed", wf)

    async def _ticker(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for wf in list(self.counter.active):
                try:
                    if await self.counter.ended(wf):
                        continue
                    await self.counter.check(wf)
                except Exception:
                    log.exception("aggregator: counting %s failed", wf)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK_S)

    async def _map_completed(self, wf: str, total: int, done: int, dead: int) -> None:
        """This replica stored ``map.complete``: a workflow without a reduce ends now, not
        when the event comes back through the consumer (which then joins this)."""
        task = asyncio.create_task(self._map_done(wf, total, done, dead), name=f"end-{wf}")
        self._tasks.add(task)
        task.add_done_callback(self._ended_task)

    def _ended_task(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The stored map.complete reaches the consumer too, which tries again.
            log.error("aggregator: ending a workflow failed", exc_info=task.exception())

    async def _map_done(self, wf: str, total: int, done: int, dead: int) -> None:
        spec = await self.state.get_spec(wf)
        # An empty map needs no reduce whatever the spec (even one that cannot be read).
        if total == 0 or (spec is not None and not needs_reduce(spec, total)):
            await self.finisher.completed(wf, total, done, dead)

    # -- events ---------------------------------------------------------------------------
    async def on_event(self, msg: Msg) -> None:
        """Traced (joining the event's ``traceparent``) and logged with the workflow id."""
        # Every subject consumed here ends with its workflow's id: an event about another
        # workflow on it is forged or misrouted, and must not fail or finish that one.
        event = decode(msg.data, subject=msg.subject)
        attributes = messaging(msg.subject, "process")
        parent = msg.headers or {}
        with (
            bound(workflow_id=event.workflow_id),
            span(
                str(event.__struct_config__.tag),
                parent=parent,
                kind="consumer",
                attributes=attributes,
                join_only=True,
            ),
        ):
            await self._on_event(event)

    async def _on_event(self, event: Event) -> None:
        wf = event.workflow_id
        if isinstance(event, WorkflowPlanned):
            record = await self.state.get(wf)
            if record is not None and not record.phase.terminal and wf not in self.counter.active:
                await self.counter.track(wf, event.total)
                await self.counter.check(wf)
        elif isinstance(event, WorkflowReopened):
            record = await self.state.get(wf)
            if record is not None and record.total is not None:
                await self.counter.track(wf, record.total)
        elif isinstance(event, SetupFailed):
            await self.finisher.failed(wf, f"setup failed: {event.error}")
        elif isinstance(event, MapFailed):
            record = await self.state.get(wf)
            if record is not None and not record.phase.terminal:
                reason = f"{event.item_id} failed and its on_failure sets fail_workflow"
                await self.finisher.failed(wf, f"{reason}: {event.error}")
        elif isinstance(event, MapComplete):
            await self._map_done(wf, event.total, event.done, event.dead)
        elif isinstance(event, ReduceCompleted):
            record = await self.state.get(wf)
            if record is not None:
                await self.finisher.completed(
                    wf, record.total or 0, record.done, record.dead, event.output
                )
        elif isinstance(event, ReduceFailed):
            await self.finisher.failed(wf, event.error)
        elif isinstance(event, AgentExited) and not event.restarted and event.remaining == 0:
            # The backend gave up restarting the last agent of a phase: nothing will move
            # this workflow on, so it fails with the reason instead of hanging.
            record = await self.state.get(wf)
            if record is not None and not record.phase.terminal:
                # The backend's reason when it has one (a Job that failed as a whole,
                # agents it would not start); else the local backend's crash loop.
                why = event.reason or (
                    f"kept crashing (last exit code {event.exit_code}); see the agent logs"
                )
                await self.finisher.failed(wf, f"{event.phase} agents {why}")
