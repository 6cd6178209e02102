"""How far a workflow's map is: counting its terminal items, publishing its progress, and
storing ``map.complete`` exactly once, when every item ``0..total-1`` is terminal and none is
still queued or leased.

Counting is not a side-effect counter (Celery's chord bug, peers.md §0.2): it is recomputed
from the durable results log as a server-side distinct-subject count, so a crash, a duplicate
delivery or a restart cannot make it drift. Its cost must not grow with the items per check
(issue 16): a check asks the queue's ``depth`` (O(1) on every backend) and one distinct count
of dead items; the exact count of terminal items (O(items) on the server) runs only when the
depth says the queue may be drained, or on its own schedule (``EXACT_*``); the item-by-item
count of indices ``0..total-1`` only when that says the map is done.

*When* a workflow is checked is the caller's: every tick (service.py) and, as its last
results arrive, at once (arrivals.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from nats.js.errors import NotFoundError

from jetreduce.aggregator.arrivals import Arrivals
from jetreduce.contract.events import BadEvent, MapComplete, Progress, decode_as, encode
from jetreduce.contract.records import WorkflowRecord
from jetreduce.contract.workflow.model import ErrorPolicy
from jetreduce.queues.base import ItemQueue, QueueDepth, QueueError
from jetreduce.queues.factory import open_queue
from jetreduce.runtime.counts import count_items_in_range, count_subjects
from jetreduce.runtime.publish import is_stored, publish_once, publish_retrying
from jetreduce.runtime.service import ServiceContext
from jetreduce.runtime.state import StateStore
from jetreduce.runtime.telemetry import (
    messaging,
    span,
    stored_trace,
    trace_headers,
    tracing_enabled,
)

__all__ = ["MapCounter", "Tracked", "policy_verdict"]

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0
THRESHOLD_MIN_ITEMS = 10
EXACT_EVERY_MIN_S = 2.0
EXACT_COST_FACTOR = 20.0
"""An exact count that took c seconds is repeated at most every 20·c seconds (≤ 5 % load)."""

Failed = Callable[[str, str], Awaitable[None]]
"""Fails a workflow with a reason (finishing.py)."""
Completed = Callable[[str, int, int, int], Awaitable[None]]
"""Told that this replica counted the map complete and ``map.complete`` is stored (workflow,
total, done, dead)."""


@dataclass
class Tracked:
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
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """One check at a time: the tick's and the arrivals' may meet."""


class MapCounter:
    """The mapping workflows this replica counts (``active``) and their checks."""

    def __init__(
        self, ctx: ServiceContext, state: StateStore, *, failed: Failed, completed: Completed
    ) -> None:
        self.ctx = ctx
        self.s = ctx.subjects
        self.state = state
        self.failed = failed
        self.completed = completed
        self.active: dict[str, Tracked] = {}
        self.arrivals = Arrivals(ctx.nc, ctx.subjects, self.check)

    async def count(self, subject_filter: str) -> int:
        """Distinct subjects matching the filter in RESULTS (runtime/counts.py)."""
        return await count_subjects(self.ctx.nc, self.s.results_stream, subject_filter)

    async def track(self, wf: str, total: int) -> None:
        spec = await self.state.get_spec(wf)
        policy = spec.workflow.error_policy if spec is not None else None
        queue = open_queue(self.ctx, wf, spec.options.queue if spec is not None else None)
        await self.untrack(wf)  # a reopened workflow: its old handle goes
        self.active[wf] = Tracked(total=total, queue=queue, policy=policy)
        await self.arrivals.watch(wf, total)

    async def untrack(self, wf: str) -> Tracked | None:
        """Stop counting ``wf``: its results are no longer watched and its queue handle (a
        client connection on Redis and SQS; never the items) is released."""
        await self.arrivals.unwatch(wf)
        tracked = self.active.pop(wf, None)
        if tracked is not None:
            with contextlib.suppress(QueueError):
                await tracked.queue.close()
        return tracked

    async def close(self) -> None:
        for wf in list(self.active):
            await self.untrack(wf)

    async def ended(self, wf: str) -> bool:
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
            await self.untrack(wf)
            return True
        return False

    async def check(self, wf: str) -> None:
        """One count of one workflow (see the module docstring), one at a time per workflow."""
        tracked = self.active.get(wf)
        if tracked is None:
            return
        async with tracked.lock:
            if self.active.get(wf) is tracked:  # not completed by the check it waited for
                await self._check(wf, tracked)

    async def _check(self, wf: str, tracked: Tracked) -> None:
        now = time.monotonic()
        depth = await self._depth(tracked)
        dead = await self.count(self.s.dead_of(wf))
        estimate = None if depth is None else tracked.total - depth.unfinished
        # The exact count (O(items)) only when the queue may be drained, or on its schedule
        # (every ``EXACT_EVERY_MIN_S`` at least, ≤ 5 % load): never on every check.
        may_be_drained = depth is not None and depth.idle
        if may_be_drained or now >= tracked.next_exact:
            started = time.monotonic()
            asked = self.arrivals.asking(wf)
            terminal = await self.count(self.s.terminal_of(wf))
            cost = time.monotonic() - started
            tracked.next_exact = now + max(EXACT_EVERY_MIN_S, cost * EXACT_COST_FACTOR)
            tracked.exact = max(tracked.exact, terminal)
            self.arrivals.counted(wf, asked, terminal)
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
            await self.failed(wf, verdict)
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
            terminal, dead = await self.in_range(wf, tracked.total)
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
            if await self._map_failed(wf):
                # An item failed with fail_workflow (its agent stored map.failed before the
                # item's item.dead): the workflow fails, the map does not complete.
                await self.failed(wf, "an item whose on_failure sets fail_workflow failed")
                return
            await self.complete_map(wf, tracked.total, tracked.total - dead, dead)
            return
        if done + dead != tracked.last_terminal or now - tracked.last_progress >= PROGRESS_EVERY_S:
            tracked.last_terminal = done + dead
            tracked.last_progress = now
            await self.publish_progress(wf, tracked, done, dead, "mapping", depth)

    async def in_range(self, wf: str, total: int) -> tuple[int, int]:
        """(terminal, dead) items of ``wf`` with an index in ``0..total-1`` (runtime/counts.py:
        O(items), so only when the counts say the map is done)."""
        return await count_items_in_range(
            self.ctx.nc, self.s.results_stream, self.s.terminal_of(wf), total
        )

    async def _map_failed(self, wf: str) -> bool:
        """Whether a ``map.failed`` is stored (agents publish it before the item's
        ``item.dead``, so it is there whenever that item counts as terminal)."""
        return await is_stored(self.ctx.js, self.s.events_stream, self.s.map("failed", wf))

    async def _depth(self, tracked: Tracked) -> QueueDepth | None:
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
        tracked: Tracked,
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
        """Store ``map.complete`` (create-only: one per workflow, whichever replica counted
        to the end first). The record's counts are written first: the reduce and the
        workflow's end read them."""
        tracked = await self.untrack(wf)
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
        stored = same = False
        with traced:
            for _ in range(2):  # again once, if a false one was in the way
                stored = await publish_once(
                    self.ctx.js,
                    subject,
                    encode(MapComplete(workflow_id=wf, total=total, done=done, dead=dead)),
                    headers=trace_headers(),
                )
                if stored:
                    break
                if not await self._replace_false_completion(wf, total, done, dead):
                    same = True  # another replica counted the same, first
                    break
        if stored:
            log.info("workflow %s: map complete (%d done, %d dead)", wf, done, dead)
        if stored or same:  # counted here: what follows need not wait for the event
            await self.completed(wf, total, done, dead)

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
    """The exact count, vouching for the ``map.complete`` about to be stored
    (``records.counted_complete``)."""
    if record.done == done and record.dead == dead and record.map_counted:
        return None
    record.done, record.dead, record.map_counted = done, dead, True
    return record
