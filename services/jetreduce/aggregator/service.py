"""Aggregator service: see the package docstring."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from jetreduce.contract.events import (
    AgentExited,
    BadEvent,
    Event,
    MapComplete,
    MapFailed,
    Progress,
    ReduceCompleted,
    ReduceFailed,
    SetupFailed,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowPlanned,
    WorkflowReopened,
    decode,
    decode_as,
    encode,
)
from jetreduce.contract.records import Phase, WorkflowRecord, needs_reduce
from jetreduce.contract.workflow.model import ErrorPolicy
from jetreduce.queues.base import ItemQueue, QueueDepth, QueueError
from jetreduce.queues.factory import open_queue
from jetreduce.runtime.counts import count_items_in_range, count_subjects
from jetreduce.runtime.publish import is_stored, publish_once, publish_retrying
from jetreduce.runtime.service import EventConsumer, ServiceContext
from jetreduce.runtime.state import StateStore
from jetreduce.runtime.telemetry import (
    bound,
    messaging,
    span,
    stored_trace,
    trace_headers,
    tracing_enabled,
)

__all__ = ["Aggregator"]

log = logging.getLogger(__name__)

TICK_S = 0.25
"""How often active workflows are counted: one ``depth()`` of the item queue (O(1) on every
backend) and one distinct count of dead items each; the exact count of terminal items only
when the depth says the queue may be drained, or on its own schedule (``EXACT_*``)."""
PROGRESS_EVERY_S = 1.0
THRESHOLD_MIN_ITEMS = 10
EXACT_EVERY_MIN_S = 2.0
EXACT_COST_FACTOR = 20.0
"""An exact count that took c seconds is repeated at most every 20·c seconds (≤ 5 % load)."""
RESCAN_S = 2.0
"""How often the workflow records are read again to find mapping workflows this replica does
not count yet (as cheap as the janitor's timeout sweep, which reads them every second)."""


@dataclass
class _Tracked:
    total: int
    queue: ItemQueue
    """The workflow's item queue, whichever backend carries it: only its ``depth`` is asked."""
    policy: ErrorPolicy | None = None
    started: float = field(default_factory=time.monotonic)
    history: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=40))
    next_range: float = 0.0
    """When the item-by-item count may run again after one found items missing."""
    last_progress: float = 0.0
    last_terminal: int = -1
    exact: int = 0
    """The last exact count of terminal items."""
    exact_done: int = 0
    """Successful items as of the last exact count (never more than there were: dead items
    are counted after the terminal ones). Progress shows this, never an estimate."""
    next_exact: float = 0.0
    next_record_check: float = 0.0
    queue_down: bool = False
    """The last ``depth`` failed (logged once per outage, not every tick)."""


class Aggregator:
    def __init__(self, ctx: ServiceContext, *, rescan_s: float = RESCAN_S) -> None:
        self.ctx = ctx
        self.s = ctx.subjects
        self.state = StateStore(ctx.js, ctx.subjects)
        self.active: dict[str, _Tracked] = {}
        self.rescan_s = rescan_s

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
        await asyncio.gather(consumer.run(stop), self._ticker(stop), self._rescanner(stop))

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
        # Not one tracked since the read began (an event may have just planned or reopened it).
        for wf in [
            wf for wf, t in self.active.items() if wf not in mapping and t.started < read_at
        ]:
            await self._untrack(wf)
        for wf, total in mapping.items():
            if wf in self.active:
                continue
            if await is_stored(self.ctx.js, self.s.events_stream, self.s.map("complete", wf)):
                continue  # counted to the end already; the launcher moves it on
            await self.track(wf, total)

    async def _ticker(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for wf in list(self.active):
                try:
                    if await self._ended(wf):
                        continue
                    await self.check(wf)
                except Exception:
                    log.exception("aggregator: counting %s failed", wf)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK_S)

    async def _ended(self, wf: str) -> bool:
        """Whether ``wf`` was cancelled, timed out or failed elsewhere (its record says so,
        read about once a second): it then leaves the active set, so no progress (with an
        ETA) and no counting go on for it."""
        tracked = self.active.get(wf)
        now = time.monotonic()
        if tracked is None or now < tracked.next_record_check:
            return tracked is None
        tracked.next_record_check = now + PROGRESS_EVERY_S
        record = await self.state.get(wf)
        if record is None or record.phase.terminal:
            await self._untrack(wf)
            return True
        return False

    async def count(self, subject_filter: str) -> int:
        """Distinct subjects matching the filter in RESULTS (runtime/counts.py)."""
        return await count_subjects(self.ctx.nc, self.s.results_stream, subject_filter)

    async def track(self, wf: str, total: int) -> None:
        spec = await self.state.get_spec(wf)
        policy = spec.workflow.error_policy if spec is not None else None
        queue = open_queue(self.ctx, wf, spec.options.queue if spec is not None else None)
        await self._untrack(wf)  # a reopened workflow: its old handle goes
        self.active[wf] = _Tracked(total=total, queue=queue, policy=policy)

    async def _untrack(self, wf: str) -> _Tracked | None:
        """Stop counting ``wf`` and release its queue handle (a client connection on Redis
        and SQS; never the items)."""
        tracked = self.active.pop(wf, None)
        if tracked is not None:
            with contextlib.suppress(QueueError):
                await tracked.queue.close()
        return tracked

    async def check(self, wf: str) -> None:
        """One tick for one workflow. The queue's depth (O(1) to ask) estimates progress; the
        exact distinct-subject count (O(items) on the server) runs only when the estimate
        says the map may be done, or every ``exact_every_s``, which grows with its cost."""
        tracked = self.active.get(wf)
        if tracked is None:
            return
        now = time.monotonic()
        depth = await self._depth(tracked)
        dead = await self.count(self.s.dead_of(wf))
        estimate = None if depth is None else tracked.total - depth.unfinished
        # The exact count (O(items)) only when the queue may be drained, or on its schedule
        # (every ``EXACT_EVERY_MIN_S`` at least, ≤ 5 % load): never on every tick.
        may_be_drained = depth is not None and depth.idle
        if may_be_drained or now >= tracked.next_exact:
            started = time.monotonic()
            terminal = await self.count(self.s.terminal_of(wf))
            cost = time.monotonic() - started
            tracked.next_exact = now + max(EXACT_EVERY_MIN_S, cost * EXACT_COST_FACTOR)
            tracked.exact = max(tracked.exact, terminal)
            # Counted after the terminal ones, so at least as many as were dead then.
            dead = await self.count(self.s.dead_of(wf))
            tracked.exact_done = max(tracked.exact_done, terminal - dead)
        else:
            # The queue's depth says nothing true while items are still being enqueued (few
            # pending looks like many done): it only schedules the next exact count.
            terminal = tracked.exact
            if estimate is not None:
                terminal = max(terminal, min(estimate, tracked.total - 1))
        # What progress shows: exact counts only, each never less than before, so ``done``
        # never runs ahead of the results stored and never goes backwards.
        done = tracked.exact_done
        tracked.history.append((now, done + dead))
        verdict = policy_verdict(tracked.policy, terminal, dead)
        if verdict is not None:
            await self.publish_progress(wf, tracked, done, dead, "stopped", depth)
            await self.finish_failed(wf, verdict)
            return
        # Every item terminal, and none left queued or leased: a result stored for an item
        # that has not run (forged: worker/record.py replaces it when the item runs) must
        # not end the map before it does.
        # Unknown (the queue's backend is down): not idle, so the map waits for it.
        idle = depth is not None and depth.idle
        if terminal >= tracked.total and tracked.exact >= tracked.total and idle:
            # Counted once more, item by item: a result stored under an index the workflow
            # does not have (forged, >= total) must not stand in for one that is missing.
            if now < tracked.next_range:
                return
            started = time.monotonic()
            terminal, dead = await self._in_range(wf, tracked.total)
            if terminal < tracked.total:
                cost = time.monotonic() - started
                tracked.next_range = now + max(EXACT_EVERY_MIN_S, cost * EXACT_COST_FACTOR)
                log.warning(
                    "workflow %s: %d of %d items terminal (results outside 0..%d ignored)",
                    wf,
                    terminal,
                    tracked.total,
                    tracked.total - 1,
                )
                return
        if terminal >= tracked.total and tracked.exact >= tracked.total and idle:
            if await self._map_failed(wf):
                # An item failed with fail_workflow (its agent stored map.failed before the
                # item's item.dead): the workflow fails, the map does not complete.
                await self.finish_failed(wf, "an item whose on_failure sets fail_workflow failed")
                return
            await self.complete_map(wf, tracked.total, tracked.total - dead, dead)
            return
        if done + dead != tracked.last_terminal or now - tracked.last_progress >= PROGRESS_EVERY_S:
            tracked.last_terminal = done + dead
            tracked.last_progress = now
            await self.publish_progress(wf, tracked, done, dead, "mapping", depth)

    async def _in_range(self, wf: str, total: int) -> tuple[int, int]:
        """(terminal, dead) items of ``wf`` with an index in ``0..total-1`` (runtime/counts.py:
        O(items), so only when the counts say the map is done)."""
        return await count_items_in_range(
            self.ctx.nc, self.s.results_stream, self.s.terminal_of(wf), total
        )

    async def _map_failed(self, wf: str) -> bool:
        """Whether a ``map.failed`` is stored (agents publish it before the item's
        ``item.dead``, so it is there whenever that item counts as terminal)."""
        return await is_stored(self.ctx.js, self.s.events_stream, self.s.map("failed", wf))

    async def _depth(self, tracked: _Tracked) -> QueueDepth | None:
        """The workflow's queue depth (``ItemQueue.depth``: one round trip on any backend);
        None while its backend is unreachable (reported once per outage)."""
        try:
            depth = await tracked.queue.depth()
        except QueueError as exc:
            if not tracked.queue_down:
                log.warning("workflow %s: queue depth unknown: %s", tracked.queue.workflow_id, exc)
            tracked.queue_down = True
            return None
        tracked.queue_down = False
        return depth

    async def publish_progress(
        self,
        wf: str,
        tracked: _Tracked,
        done: int,
        dead: int,
        phase: str,
        depth: QueueDepth | None = None,
    ) -> None:
        terminal = done + dead
        rate = 0.0
        if len(tracked.history) >= 2:
            (t0, n0), (t1, n1) = tracked.history[0], tracked.history[-1]
            if t1 > t0:
                rate = max(0.0, (n1 - n0) / (t1 - t0))
        left = tracked.total - terminal
        eta = (left / rate) if rate > 0 else None
        pending, in_flight = (depth.pending, depth.in_flight) if depth else (0, 0)
        progress = Progress(
            workflow_id=wf,
            phase=phase,
            total=tracked.total,
            done=done,
            dead=dead,
            in_flight=in_flight,
            pending=pending,
            rate_per_s=round(rate, 2),
            eta_s=round(eta, 1) if eta is not None else None,
        )
        await publish_retrying(self.ctx.js, self.s.progress(wf), encode(progress))

    async def complete_map(self, wf: str, total: int, done: int, dead: int) -> None:
        tracked = await self._untrack(wf)
        if tracked is not None:
            await self.publish_progress(wf, tracked, done, dead, "map complete")
        await self.state.update(wf, lambda r: _set_counts(r, done, dead))
        subject = self.s.map("complete", wf)
        trace: dict[str, str] = {}
        if tracing_enabled():  # traced under the plan; the reduce agent continues this span
            planned = self.s.workflow("planned", wf)
            trace = await stored_trace(self.ctx.js, self.s.events_stream, planned)
        attributes = {
            **messaging(subject, "send"),
            "jetreduce.items.done": done,
            "jetreduce.items.dead": dead,
        }
        traced = span(
            "map complete", parent=trace, kind="producer", attributes=attributes, join_only=True
        )
        with traced:
            for _ in range(2):  # again once, if a false one was in the way
                stored = await publish_once(
                    self.ctx.js,
                    subject,
                    encode(MapComplete(workflow_id=wf, total=total, done=done, dead=dead)),
                    headers=trace_headers(),
                )
                if stored or not await self._replace_false_completion(wf, total, done, dead):
                    break
        if stored:
            log.info("workflow %s: map complete (%d done, %d dead)", wf, done, dead)

    async def _replace_false_completion(self, wf: str, total: int, done: int, dead: int) -> bool:
        """A ``map.complete`` stored before ours with other counts was forged (the launcher
        removes those it sees, but may not have yet): remove it so ours can be stored."""
        try:
            raw = await self.ctx.js.get_last_msg(self.s.events_stream, self.s.map("complete", wf))
            found = decode_as(raw.data or b"", MapComplete)
            if (found.total, found.done, found.dead) == (total, done, dead):
                return False
        except NotFoundError:
            return True  # removed meanwhile
        except BadEvent:
            pass
        log.error("workflow %s: a false map.complete was stored; replacing it", wf)
        if raw.seq is not None:
            with contextlib.suppress(NotFoundError):
                await self.ctx.js.delete_msg(self.s.events_stream, raw.seq)
        return True

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
            if record is not None and not record.phase.terminal and wf not in self.active:
                await self.track(wf, event.total)
                await self.check(wf)
        elif isinstance(event, WorkflowReopened):
            record = await self.state.get(wf)
            if record is not None and record.total is not None:
                await self.track(wf, record.total)
        elif isinstance(event, SetupFailed):
            await self.finish_failed(wf, f"setup failed: {event.error}")
        elif isinstance(event, MapFailed):
            record = await self.state.get(wf)
            if record is not None and not record.phase.terminal:
                reason = f"{event.item_id} failed and its on_failure sets fail_workflow"
                await self.finish_failed(wf, f"{reason}: {event.error}")
        elif isinstance(event, MapComplete):
            spec = await self.state.get_spec(wf)
            # An empty map needs no reduce whatever the spec (even one that cannot be read).
            if event.total == 0 or (spec is not None and not needs_reduce(spec, event.total)):
                await self.finish_completed(wf, event.total, event.done, event.dead, "")
        elif isinstance(event, ReduceCompleted):
            record = await self.state.get(wf)
            if record is not None:
                await self.finish_completed(
                    wf, record.total or 0, record.done, record.dead, event.output
                )
        elif isinstance(event, ReduceFailed):
            await self.finish_failed(wf, event.error)
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
                await self.finish_failed(wf, f"{event.phase} agents {why}")

    async def _ended_as(self, wf: str, phase: Phase, **fields: Any) -> WorkflowRecord | None:
        """The record if the workflow ended (now, or on an earlier delivery of this event)
        as ``phase``; None if it ended otherwise, so only one terminal event is published."""
        await self.state.transition(wf, phase, **fields)
        record = await self.state.get(wf)
        return record if record is not None and record.phase == phase else None

    async def finish_completed(
        self, wf: str, total: int, done: int, dead: int, reduce_output: str
    ) -> None:
        record = await self._ended_as(wf, Phase.COMPLETED, reduce_output=reduce_output)
        if record is None:
            return  # it ended otherwise first (failed by map.failed, cancelled, timed out)
        created = record.created_ts
        await publish_once(
            self.ctx.js,
            self.s.workflow("completed", wf),
            encode(
                WorkflowCompleted(
                    workflow_id=wf,
                    total=total,
                    done=done,
                    dead=dead,
                    duration_s=round(time.time() - created, 3),
                    reduce_output=reduce_output,
                )
            ),
            headers=trace_headers(),
        )

    async def finish_failed(self, wf: str, reason: str) -> None:
        await self._untrack(wf)
        if await self._ended_as(wf, Phase.FAILED, reason=reason) is None:
            return
        await publish_once(
            self.ctx.js,
            self.s.workflow("failed", wf),
            encode(WorkflowFailed(workflow_id=wf, reason=reason)),
            headers=trace_headers(),
        )


def policy_verdict(policy: ErrorPolicy | None, terminal: int, dead: int) -> str | None:
    """Why the error policy stops the workflow now, or None to go on (Prodigy's documented
    semantics: ``stop`` / ``continue_on_failure: false`` stop at the first dead item,
    ``max_failures`` at that many, ``failure_threshold`` once the rate exceeds it after at
    least ``THRESHOLD_MIN_ITEMS`` items)."""
    if policy is None or dead == 0:
        return None
    if policy.on_item_failure == "stop" or not policy.continue_on_failure:
        return f"error policy: stopped at the first failed item ({dead} failed)"
    if policy.max_failures is not None and dead >= policy.max_failures:
        return f"error policy: {dead} items failed (max_failures {policy.max_failures})"
    if (
        policy.failure_threshold is not None
        and terminal >= THRESHOLD_MIN_ITEMS
        and dead / terminal > policy.failure_threshold
    ):
        return (
            f"error policy: failure rate {dead / terminal:.0%} over {terminal} items exceeds "
            f"failure_threshold {policy.failure_threshold:.0%}"
        )
    return None


def _set_counts(record: WorkflowRecord, done: int, dead: int) -> WorkflowRecord | None:
    if record.done == done and record.dead == dead:
        return None
    record.done, record.dead = done, dead
    return record
