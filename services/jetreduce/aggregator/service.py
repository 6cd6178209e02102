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
from jetreduce.contract.records import Phase, WorkflowRecord, needs_reduce
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
        self._ending: dict[str, asyncio.Task[None]] = {}
        """Workflows whose map completed being ended (``_end_map``)."""

    @property
    def active(self) -> dict[str, Tracked]:
        """The workflows this replica counts, by id."""
        return self.counter.active

    async def _untrack(self, wf: str) -> None:
        await self.counter.untrack(wf)

    @property
    def filters(self) -> list[str]:
        """The events the aggregator's durable consumer (``aggregator``) takes."""
        return [
            self.s.workflow("planned", "*"),
            self.s.workflow("reopened", "*"),
            self.s.setup("failed", "*"),
            self.s.map("complete", "*"),
            self.s.map("failed", "*"),
            self.s.reduce("completed", "*"),
            self.s.reduce("failed", "*"),
            self.s.agent("exited", "*"),
        ]

    async def run(self, stop: asyncio.Event) -> None:
        consumer = EventConsumer(
            self.ctx,
            stream=self.s.events_stream,
            durable="aggregator",
            filters=self.filters,
            handler=self.on_event,
        )
        try:
            await asyncio.gather(consumer.run(stop), self._ticker(stop), self._rescanner(stop))
        finally:
            tasks = list(self._ending.values())
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
        mapping: dict[str, WorkflowRecord] = {}
        for record in await self.state.list():
            if record.phase == Phase.MAPPING and record.total is not None:
                mapping[record.workflow_id] = record
        active = self.counter.active
        # Not one tracked since the read began (an event may have just planned or reopened it).
        for wf in [wf for wf, t in active.items() if wf not in mapping and t.started < read_at]:
            await self.counter.untrack(wf)
        for wf, record in mapping.items():
            total = record.total or 0
            if wf in active:
                continue
            if await self._stored(self.s.map("complete", wf)):
                # Counted to the end already: the launcher moves it on to its reduce; one
                # without a reduce ends (sooner than its map.complete delivered again, if
                # the replica ending it died).
                self._end_map(wf, total, record.done, record.dead, counted=False)
                continue
            await self.counter.track(wf, total)
            # Counted at once, as on workflow.planned: its results may all be in already
            # (the replica that had the event is gone or busy), and arrivals wake a count
            # only once one exact count has set their estimate.
            try:
                await self.counter.check(wf)
            except Exception:  # the tick counts it again; the other workflows go on
                log.exception("aggregator: counting %s failed", wf)

    async def _stored(self, subject: str) -> bool:
        return await is_stored(self.ctx.js, self.s.events_stream, subject)

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
        """This replica counted the map complete: a workflow without a reduce ends now, not
        when ``map.complete`` comes back through the consumer (whose handler then joins)."""
        self._end_map(wf, total, done, dead, counted=True)

    def _end_map(
        self, wf: str, total: int, done: int, dead: int, *, counted: bool
    ) -> asyncio.Task[None]:
        """End ``wf`` if its map was all it had, in a task of its own (one per workflow:
        a second caller gets the first's). Ending may wait for the map agents' usage
        reports (usage.py); started as the map completes, that wait is mostly over by the
        time the event reaches the consumer, whose handler awaits the task, so that a
        replica that dies meanwhile leaves the event to be delivered again."""
        task = self._ending.get(wf)
        if task is None:
            ending = self._map_done(wf, total, done, dead, counted=counted)
            task = asyncio.create_task(ending, name=f"end-{wf}")
            self._ending[wf] = task
            task.add_done_callback(lambda t: self._ended(wf, t))
        return task

    def _ended(self, wf: str, task: asyncio.Task[None]) -> None:
        if self._ending.get(wf) is task:
            del self._ending[wf]
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "workflow %s: ending it failed (its map.complete is handled again)",
                wf,
                exc_info=task.exception(),
            )

    async def _map_done(self, wf: str, total: int, done: int, dead: int, *, counted: bool) -> None:
        """End a workflow without a reduce. ``counted``: this replica's count found the map
        complete; else the stored ``map.complete`` says so, which anyone allowed to publish
        may have forged: the workflow then ends only if its counts add up to its planned
        total and the server holds that many terminal results (the launcher's rule)."""
        spec = await self.state.get_spec(wf)
        # An empty map needs no reduce whatever the spec (even one that cannot be read).
        if not (total == 0 or (spec is not None and not needs_reduce(spec, total))):
            return  # the launcher starts its reduce
        if not counted:
            record = await self.state.get(wf)
            if record is None or record.phase not in (Phase.MAPPING, Phase.COMPLETED):
                return  # ended otherwise
            completed = self.s.workflow("completed", wf)
            if record.phase == Phase.COMPLETED and await self._stored(completed):
                return  # ended by this replica's count or another's: nothing to count
            terminal = await self.counter.count(self.s.terminal_of(wf))
            if not (record.total == total == terminal and done + dead == total):
                log.error(
                    "workflow %s: map.complete not acted on (says %d of %d, planned %s, "
                    "%d terminal)",
                    wf,
                    done + dead,
                    total,
                    record.total,
                    terminal,
                )
                return
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
            ending = self._end_map(wf, event.total, event.done, event.dead, counted=False)
            await asyncio.shield(ending)  # this handler stopping does not stop it
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
