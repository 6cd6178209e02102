"""The map phase: leasing items, running each attempt, heartbeats and the graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import deque
from typing import Any

import msgspec

from jetreduce.contract.events import (
    CircuitChanged,
    LeaseAges,
    QueueStatus,
    encode,
)
from jetreduce.contract.objects import item_object
from jetreduce.contract.records import Phase
from jetreduce.contract.workflow.model import RetryConfig, Step
from jetreduce.queues.base import Lease
from jetreduce.queues.factory import open_queue
from jetreduce.queues.resilient import ResilientQueue
from jetreduce.runtime.flag import Flag, wait_first
from jetreduce.runtime.publish import AckMux, publish_retrying
from jetreduce.runtime.state import StateStore
from jetreduce.runtime.telemetry import (
    bound,
    messaging,
    span,
)
from jetreduce.worker.breaker import CircuitBreaker
from jetreduce.worker.claimed import EXIT_SIGTERM
from jetreduce.worker.context import BATCH_WAIT_S, DEFAULT_LEASE_S
from jetreduce.worker.elastic import IdleWatch, Usage, prefetch, publish_bounded
from jetreduce.worker.outcome import (
    ERROR_TAIL,
    MERGE_CONFLICT,
    WORKTREE_ERROR,
    before_run,
    clip,
    decide,
    failure,
)
from jetreduce.worker.recording import ItemRecorder, attempts_ran
from jetreduce.worker.settle import Settler
from jetreduce.worker.stepflow import StepsResult
from jetreduce.worker.workspace import WorkspaceError

__all__ = ["MapRunner"]

log = logging.getLogger(__name__)


class MapRunner(ItemRecorder):
    """Map: lease as many items as the agent's budget allows (`budget`), run each attempt
    (`_attempt`: counted, run, decided) in its own task, or inline when the template is empty,
    keep leases alive, leave early when the queue ran dry (`elastic`), and on SIGTERM let
    in-flight items finish within the grace period before handing the rest back."""

    inflight: dict[asyncio.Task[None], Lease]
    ready: deque[Lease]
    """Leased, not started yet (the prefetch): never more than `prefetch` beyond the slots."""
    retry: RetryConfig
    max_attempts: int
    queued_attempts: int
    """The attempts the planner prepared the queue for (JetStream's ``max_deliver`` counts
    from it): `before_run`'s limit, the same on every backend whatever the policy."""
    breaker: CircuitBreaker | None
    heartbeat_every: float
    usage: Usage

    async def run_map(self) -> int:
        await self._watch_end(also_map_complete=True)
        record = await StateStore(self.ctx.js, self.s).get(self.wf)
        if record is None or record.phase.order > Phase.MAPPING.order:
            return 0
        self.usage = Usage(self.config.slots)
        self.total = record.total or 0
        self.queue = ResilientQueue(
            open_queue(self.ctx, self.wf, self.spec.options.queue),
            self.stop,
            self._announce_queue,
        )
        policy = self.spec.workflow.error_policy
        self.retry: RetryConfig = policy.retry
        self.max_attempts = self.spec.options.max_attempts or self.retry.max_attempts
        self.queued_attempts = self.max_attempts
        self.inflight: dict[asyncio.Task[None], Lease] = {}
        self.ready = deque()
        self.recording = {}
        self.slow = set()
        self.progress = Flag()
        self.on_failure = policy.on_item_failure
        if self.on_failure == "skip":
            self.max_attempts = 1  # a skipped item is not retried and not dead-lettered
        self.breaker = CircuitBreaker.from_config(policy.circuit_breaker)
        self.heartbeat_every = (self.spec.options.lease_s or DEFAULT_LEASE_S) / 3
        self.acks = await AckMux(self.ctx.nc).start()
        self.settler = Settler(self.queue, self._on_settled)
        beats = asyncio.create_task(self._heartbeats())
        draining = False
        drained = False
        try:
            drained = await self._loop()
            draining = True
            await self._drain()
        finally:
            beats.cancel()
            if not draining:
                for task in [*self.inflight, *self.slow]:
                    task.cancel()
            await self._give_back_ready()
            await self.queue.close()
            await self.acks.close()
            await asyncio.shield(self.workspaces.close())
            await self._report_usage(drained)
        if drained:
            return 0
        # Stopped by a signal before the phase ended (an eviction): not a success, so the Job
        # controller (or the local launcher) starts another agent in its place.
        return EXIT_SIGTERM if self.signalled and not self.phase_over.is_set() else 0

    async def _loop(self) -> bool:
        """Lease and run until stopped, the phase ends or (`elastic`) the queue ran dry; True
        when the agent leaves because it drained."""
        slots = self.config.slots
        budget = slots + prefetch(slots)
        inline = not self.spec.workflow.map.agent_template
        idle = IdleWatch(self.config.index, self.config.drain_idle_s)
        batched = False
        while not self.stop.is_set():
            while self.ready and len(self.inflight) < slots and not self.stop.is_set():
                lease = self.ready.popleft()
                if inline and not lease.item.item_stored:
                    try:  # nothing to wait for: no task, no switch
                        await self._run_item(lease)
                    except Exception as exc:  # as a task's failure: logged, lease expires
                        log.error("item failed: %r", exc)
                else:
                    task = asyncio.create_task(self._run_item(lease))
                    self.inflight[task] = lease
                    task.add_done_callback(self._forget)
            if self.stop.is_set():
                break
            held = self.held
            free = budget - held
            if free <= 0 or (self.ready and len(self.inflight) >= slots):
                # Every slot busy: wait for one to free up — or for a stop signal, which
                # must not wait for a long item to end.
                await self._wait_inflight(None)
                continue
            if held and free < budget // 4 and not batched:
                # Nearly full: a moment's wait lets several slots free up, so one pull
                # serves them all instead of one pull per finished item.
                batched = True
                await self._wait_inflight(BATCH_WAIT_S)
                continue
            batched = False
            if self.breaker is not None:
                before = self.breaker.state
                free = self.breaker.allowance(free)
                if self.breaker.state != before:  # open → half_open after its timeout
                    await self._announce_circuit(self.breaker.state)
                if free <= 0:  # open (or probes used up): dispatch pauses
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), 0.2)
                    continue
            leases = await self._lease(free)
            if leases is None:  # the phase ended while waiting: nothing is left to lease
                break
            if self.breaker is not None:
                self.breaker.started(len(leases))
            if self.stop.is_set():
                for lease in leases:  # raced the stop: give them back at once
                    await self.queue.retry(lease, 0.001)
                break
            self.ready.extend(leases)
            if idle.ran_dry(bool(leases) or self.held > 0) and await self._queue_dry():
                log.info("agent %s: the queue ran dry; leaving the phase", self.name)
                return True
        return False

    @property
    def held(self) -> int:
        """Leases this agent holds: running, waiting to start, or waiting for their ack."""
        return len(self.inflight) + len(self.ready) + len(self.recording) + len(self.slow)

    def _on_settled(self, lease: Lease) -> None:
        self._settled(lease)
        self.progress.set()

    async def _queue_dry(self) -> bool:
        """Nothing pending on the queue (delayed retries are in flight on JetStream and SQS
        and are left to agent 0; Redis counts them pending: they keep everyone)."""
        try:
            depth = await self.queue.depth()
        except Exception as exc:  # not a reason to leave: ask again on the next idle poll
            log.debug("depth unavailable: %s", exc)
            return False
        return depth.pending == 0

    async def _give_back_ready(self) -> None:
        """Leased items never started (stopped with a prefetch): back at once for others."""
        while self.ready:
            lease = self.ready.popleft()
            with contextlib.suppress(Exception):  # the lease expires anyway
                await self.queue.retry(lease, 0.001)

    async def _report_usage(self, drained: bool) -> None:
        report = self.usage.report(self.wf, self.name, self.config.index, drained)
        await publish_bounded(self.ctx.js, self.s.agent("usage", self.wf), encode(report))

    async def _lease(self, free: int) -> list[Lease] | None:
        """Up to ``free`` items (a long poll of a second), or None when the phase ends first:
        after ``map.complete`` no item is left, so the poll is abandoned instead of awaited
        (the agent leaves at once, and its slots are free for others sooner). A signal alone
        lets the poll finish, so nothing it fetched is stranded until its lease runs out."""
        polling = asyncio.ensure_future(self.queue.lease(free, wait_s=1.0))
        await wait_first([self.phase_over], [polling])
        if polling.done():
            return polling.result()
        polling.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await polling
        return None

    async def _wait_inflight(self, timeout_s: float | None) -> None:
        """Until a slot may have freed (an item ended, a result's ack went out), a stop, or
        ``timeout_s``."""
        self.progress.clear()
        await wait_first([self.stop, self.progress], [*self.inflight, *self.slow], timeout_s)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self.inflight.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("item task failed: %r", task.exception())

    async def _drain(self) -> None:
        """Let in-flight items finish, and their results be acked, within the grace period
        (unless the workflow ended), then kill what is left and hand those items back for
        another agent at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.grace_s
        while (self.inflight or self.recording or self.slow) and not self.abort.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self.progress.clear()
            await wait_first([self.abort, self.progress], [*self.inflight, *self.slow], remaining)
        leftovers = list(self.inflight.items())
        for task, _ in leftovers:
            task.cancel()  # run_process kills the step's process group on cancellation
        for task in list(self.slow):
            task.cancel()
        await asyncio.gather(*(t for t, _ in leftovers), *self.slow, return_exceptions=True)
        if not self.abort.is_set():
            for _, lease in leftovers:
                with contextlib.suppress(Exception):  # handing back: the lease expires anyway
                    await self.queue.retry(lease, 0.001)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_every)
            leases = [*self.inflight.values(), *self.ready, *self.recording.values()]
            for lease in leases:
                # the next beat retries; a lost lease shows at ack
                with contextlib.suppress(Exception):
                    await self.queue.heartbeat(lease)
            now = time.monotonic()
            report = LeaseAges(
                workflow_id=self.wf,
                agent=self.name,
                in_flight=len(leases),
                oldest_s=round(max((now - x.leased_at for x in leases), default=0.0), 3),
            )
            with contextlib.suppress(Exception):  # a metric: never worth failing for
                await self.ctx.nc.publish(self.s.telemetry_leases(self.wf), encode(report))

    async def _run_item(self, lease: Lease) -> None:
        """One attempt, traced under the plan (``workflow.planned``'s stored context), its
        log lines tagged with the item id (for the attempt only: inline attempts run in the
        map loop's own task)."""
        item_id = f"item_{lease.item.index}"
        if not self.trace:
            with bound(item_id=item_id):
                await self._attempt(lease)
            return
        attributes = {
            **messaging(self.s.work_of(self.wf), "process", f"{self.wf}/{lease.item.index}"),
            "jetreduce.workflow.id": self.wf,
            "jetreduce.item.id": item_id,
            "jetreduce.item.attempt": lease.attempt,
        }
        with (
            span(
                f"item {item_id}",
                parent=self.trace,
                kind="consumer",
                attributes=attributes,
                join_only=True,
            ) as current,
            bound(item_id=item_id),
        ):
            outcome = await self._attempt(lease)
            if current is not None:
                current.set_attribute("jetreduce.item.outcome", outcome)

    async def _attempt(self, lease: Lease) -> str:
        """Count the delivery, run the item once, decide and record what it came to:
        ``done``, ``retry`` or ``dead``."""
        crashed = before_run(lease.attempt, self.queued_attempts)
        if crashed is not None:  # its agents kept dying on it: never run it again
            await self._record_crashed(lease, crashed)
            return "dead"
        # The retry budget counts attempts that ran to a verdict, not deliveries (one handed
        # back unrun is none); lease.attempt, the delivery, is what events report.
        attempt = lease.attempt
        if attempt > 1:
            attempt = await attempts_ran(self.ctx, self.wf, lease.item.index, attempt - 1) + 1
        work = lease.item
        index = work.index
        item = work.item
        unreadable = None
        if work.item_stored:
            try:
                item = await self._stored_item(index)
            except Exception as exc:  # a failed attempt like any other: retried, then dead
                unreadable = f"item data unreadable from the object store: {exc}"
        m = self.spec.workflow.map
        start = time.monotonic()
        deadline = start + m.agent_timeout_s if m.agent_timeout_s else None
        if unreadable is not None:
            result = failure(unreadable)
        elif not m.agent_template and self.env_problem is None:
            result = StepsResult()  # nothing runs: no variables, no workspace
        else:
            variables = dict(self.vars_base)
            variables.update(
                item=item,
                item_id=f"item_{index}",
                item_index=index,
                item_total=self.total,
                item_json=json.dumps(item, separators=(",", ":")),
                **{"map.total": self.total, "worker.id": self.name},
            )
            result = await self._item_steps(index, m.agent_template, variables, deadline)
        duration = time.monotonic() - start
        await self._breaker_record(result.ok)
        self.usage.ran(time.monotonic() - lease.leased_at)
        outcome = decide(
            result,
            reason="" if result.ok else self._describe(m.agent_template, result),
            attempt=attempt,
            max_attempts=self.max_attempts,
            backoff=self._backoff,
        )
        await self._record(lease, outcome, result, duration)
        return type(outcome).__name__.lower()

    async def _item_steps(
        self,
        index: int,
        steps: list[Step],
        variables: dict[str, Any],
        deadline: float | None,
    ) -> StepsResult:
        """An item's steps in its workspace (`worker.workspace`); with worktrees, a successful
        item's commits are merged into the workflow branch before the item counts as done,
        and the workspace is released (removed, reset or kept) whatever happened."""
        if self.env_problem is not None:
            return failure(self.env_problem)
        if not steps:  # nothing runs: no workspace to make
            return await self._steps(steps, variables, deadline=deadline)
        try:
            ws = await self.workspaces.acquire(index)
        except WorkspaceError as exc:
            return failure(f"worktree: {exc}", WORKTREE_ERROR)
        merged = False
        try:
            result = await self._steps(steps, variables, deadline=deadline, cwd=ws.path)
            if result.ok and ws.root is not None:
                try:
                    await self.workspaces.merge(ws)
                    merged = True
                except WorkspaceError as exc:
                    text = str(exc)
                    if not text.startswith("merge conflict"):
                        text = f"merge conflict: {text}"
                    merge_failed = failure(self.masker.mask(text), MERGE_CONFLICT)
                    result.failed, result.reason = merge_failed.failed, ""
            return result
        finally:
            await asyncio.shield(self.workspaces.release(ws, merged=merged, index=index))

    async def _breaker_record(self, ok: bool) -> None:
        if self.breaker is None:
            return
        changed = self.breaker.record(ok)
        if changed is not None:
            await self._announce_circuit(changed)

    async def _announce_queue(self, state: str, error: str) -> None:
        url = self.spec.options.queue or "jetstream"
        status = QueueStatus(
            workflow_id=self.wf,
            state=state,
            agent=self.name,
            queue=url.split(":", 1)[0],
            error=clip(error, ERROR_TAIL),
        )
        await publish_retrying(self.ctx.js, self.s.agent("queue", self.wf), encode(status))

    async def _announce_circuit(self, changed: str) -> None:
        assert self.breaker is not None
        log.warning("agent %s: circuit %s", self.name, changed)
        with contextlib.suppress(Exception):  # a status report: never worth failing for
            await publish_retrying(
                self.ctx.js,
                self.s.agent("circuit", self.wf),
                encode(
                    CircuitChanged(
                        workflow_id=self.wf,
                        state=changed,
                        agent=self.name,
                        consecutive_failures=self.breaker.failures,
                    )
                ),
            )

    async def _stored_item(self, index: int) -> Any:
        store = await self.ctx.js.object_store(self.s.objects_bucket)
        obj = await store.get(item_object(self.wf, index))
        return msgspec.json.decode(obj.data or b"null")

    def _backoff(self, attempt: int) -> float:
        """The workflow's backoff (any kind, `RetryConfig.delay`) with ±20% jitter, so items
        that failed together do not all come back at the same instant."""
        return self.retry.delay(attempt) * random.uniform(0.8, 1.2)
