"""Recording what an item's attempt came to (`worker/outcome.py`'s `Done`, `Retry`, `Dead`):
the events, the object-store logs and outputs, the DLQ entry and the queue's ack, retry or
dead. The decision is made before, apart from these calls.

A success is recorded pipelined: ``item.done`` is published create-only without waiting
(`AckMux.send`), the attempt ends, and the lease is acked (`settle.Settler`) when the server
answers that the result is stored. Any other answer (already stored, no responders, no
answer in time) takes the awaited path, `record.record_result`, exactly as before: the
create-only guard, the check of what is stored and the ack after it. Until its ack the item
counts in ``recording`` and keeps its slot (and its heartbeats): an agent never holds more
leases than its budget, whatever is still on the wire."""

from __future__ import annotations

import asyncio
import logging

from nats.js.errors import NotFoundError

from jetreduce.contract.events import (
    DURATION_HEADER,
    ItemDead,
    ItemDone,
    ItemFailed,
    MapFailed,
    encode,
)
from jetreduce.contract.objects import log_object, output_object
from jetreduce.queues.base import Lease
from jetreduce.queues.resilient import ResilientQueue
from jetreduce.runtime.counts import count_messages
from jetreduce.runtime.publish import AckMux, publish_once, publish_retrying
from jetreduce.runtime.service import ServiceContext
from jetreduce.worker.context import AgentBase
from jetreduce.worker.outcome import (
    EVENT_TEXT_LIMIT,
    Dead,
    Done,
    Outcome,
    Retry,
    clip,
    error_tail,
)
from jetreduce.worker.record import record_result
from jetreduce.worker.settle import Settler
from jetreduce.worker.stepflow import StepsResult
from jetreduce.worker.steps import StepOutcome

__all__ = ["ItemRecorder", "attempts_ran", "dead_stands"]

log = logging.getLogger(__name__)


class ItemRecorder(AgentBase):
    """Recording an attempt's `Outcome`: ``item.done`` (create-only) and the ack; or
    ``item.failed`` and a delayed retry; or ``item.failed``, the failure log, ``map.failed``
    when the workflow must fail, ``item.dead``, the DLQ entry and the queue's dead."""

    queue: ResilientQueue
    acks: AckMux
    on_failure: str
    settler: Settler
    recording: dict[int, Lease]
    """Leases whose result is on its way (by ``id``): they hold their slot until acked."""
    slow: set[asyncio.Task[None]]
    """Results that took the awaited path after a pipelined publish was not stored."""

    async def _record(
        self, lease: Lease, outcome: Outcome, result: StepsResult, duration: float
    ) -> None:
        if isinstance(outcome, Done):
            await self._record_done(lease, result, duration)
            return
        index = lease.item.index
        failed = result.failed
        assert failed is not None  # decide() gives Done for a result without a failure
        reason = outcome.reason if isinstance(outcome, Dead) else ""
        error = reason or self._describe(self.spec.workflow.map.agent_template, result)
        tail = error_tail(failed)
        delay = outcome.delay_s if isinstance(outcome, Retry) else None
        await publish_retrying(
            self.ctx.js,
            self.s.item_failed(self.wf, index),
            encode(
                ItemFailed(
                    workflow_id=self.wf,
                    index=index,
                    item_id=f"item_{index}",
                    attempt=lease.attempt,
                    error=error,
                    exit_code=failed.exit_code,
                    stderr_tail=tail,
                    retry_in_s=delay,
                )
            ),
        )
        if delay is not None:
            log.info("attempt %d failed, retry in %.1fs: %s", lease.attempt, delay, error)
            await self.queue.retry(lease, delay)
            return
        assert isinstance(outcome, Dead)
        log_object = await self._store_log(
            index, lease.attempt, [r.outcome for r in result.records] or result.outcomes, failed
        )
        if outcome.fail_workflow:
            # Before the item is recorded dead: once every item is terminal the aggregator
            # completes the map unless it finds this, so it must never come second (or be
            # lost with an agent that dies between the two).
            failed_map = MapFailed(
                workflow_id=self.wf, index=index, item_id=f"item_{index}", error=error
            )
            await publish_retrying(self.ctx.js, self.s.map("failed", self.wf), encode(failed_map))
        dead = ItemDead(
            workflow_id=self.wf,
            index=index,
            item_id=f"item_{index}",
            error=error,
            error_type=outcome.kind,
            log_object=log_object,
            exit_code=failed.exit_code,
            stderr_tail=tail,
            attempts=lease.attempt,
            duration_s=duration,
            agent=self.name,
        )
        await self._bury(lease, dead, {DURATION_HEADER: f"{duration:.6f}"})

    async def _record_done(self, lease: Lease, result: StepsResult, duration: float) -> None:
        index = lease.item.index
        outcomes = result.outcomes
        output = "\n".join(o.stdout.rstrip("\n") for o in outcomes if o.stdout)
        done = ItemDone(
            workflow_id=self.wf,
            index=index,
            item_id=f"item_{index}",
            output=clip(output),
            exit_code=outcomes[-1].exit_code if outcomes else 0,
            duration_s=duration,
            attempts=lease.attempt,
            agent=self.name,
            output_stored=len(output.encode()) > EVENT_TEXT_LIMIT,
        )
        headers = {DURATION_HEADER: f"{duration:.6f}"}
        if done.output_stored:  # its output is stored only once the result is known to be
            await self._record_done_awaited(lease, done, headers, output)
            return
        key = id(lease)
        self.recording[key] = lease

        def on_answer(code: int) -> None:
            if code == 0:
                self.settler.ack(lease)
                return
            task = asyncio.get_running_loop().create_task(
                self._record_done_awaited(lease, done, headers, "")
            )
            self.slow.add(task)
            task.add_done_callback(self._slow_done)

        await self.acks.send(
            self.s.item_done(self.wf, index),
            encode(done),
            on_answer,
            guard=self.s.item_terminal(self.wf, index),
            headers=headers,
        )

    def _slow_done(self, task: asyncio.Task[None]) -> None:
        self.slow.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("recording a result failed: %r", task.exception())

    def _settled(self, lease: Lease) -> None:
        """The settler acked ``lease`` (or gave up): its slot is free."""
        self.recording.pop(id(lease), None)

    async def _record_done_awaited(
        self, lease: Lease, done: ItemDone, headers: dict[str, str], output: str
    ) -> None:
        """The awaited path: `record_result` (guard, check, retries), then the ack."""
        self.recording[id(lease)] = lease
        try:
            won = await record_result(self.acks, self.ctx.js, self.s, done, headers)
            if won and done.output_stored:
                # Written only by the attempt whose result is recorded (a redelivered twin
                # must not overwrite it); reduce falls back to the tail if this fails.
                await self._store_big_output(done.index, output)
        except BaseException:
            self.recording.pop(id(lease), None)  # not stored: the lease expires, redelivered
            raise
        self.settler.ack(lease)

    async def _record_crashed(self, lease: Lease, outcome: Dead) -> None:
        """A delivery `before_run` refused: the verdict the janitor gives on JetStream (no
        agent named: it is about the item, so a late twin's result never replaces it)."""
        index = lease.item.index
        dead = ItemDead(
            workflow_id=self.wf,
            index=index,
            item_id=f"item_{index}",
            error=outcome.reason,
            error_type=outcome.kind,
            exit_code=None,
            stderr_tail="",
            attempts=lease.attempt - 1,
        )
        await self._bury(lease, dead, {})

    async def _bury(self, lease: Lease, dead: ItemDead, headers: dict[str, str]) -> None:
        """Record ``dead`` (create-only), add its DLQ entry (unless the policy is ``skip``)
        and take the item off the queue."""
        work = lease.item
        stored = await record_result(self.acks, self.ctx.js, self.s, dead, headers)
        if not stored:
            # An earlier delivery's agent recorded the item dead and was killed before its
            # DLQ entry (chaos seed 4): the entry is owed all the same. It is create-only,
            # so one already there is kept.
            stored = await dead_stands(self.ctx, self.wf, work.index)
        if stored and self.on_failure != "skip":
            # A stored item stays in the store (the DLQ retry finds it there), not in the entry.
            dead.item = None if work.item_stored else work.item
            await publish_once(self.ctx.js, self.s.dlq(self.wf, work.index), encode(dead))
        await self.queue.dead(lease, dead.error)
        log.warning("dead after %d attempt(s): %s", dead.attempts, dead.error)

    async def _store_big_output(self, index: int, output: str) -> None:
        """Keep an output too large for its event whole in the object store (the event
        carries its tail). A failure to store keeps just the tail."""
        try:
            store = await self.ctx.js.object_store(self.s.objects_bucket)
            await store.put(output_object(self.wf, index), output.encode())
        except Exception as exc:
            log.warning("output of item %d kept as its tail only: %s", index, exc)

    async def _store_log(
        self, index: int, attempt: int, outcomes: list[StepOutcome], failed: StepOutcome
    ) -> str | None:
        """Keep the failed attempt's output (bounded tails) for `jetreduce dlq show`."""
        name = log_object(self.wf, index)
        parts = []
        for number, o in enumerate(outcomes, 1):
            parts.append(f"--- step {number}: exit {o.exit_code}{' (timed out)' * o.timed_out}")
            parts.append(f"stdout:\n{o.stdout}\nstderr:\n{o.stderr}")
        body = f"attempt {attempt}\n" + "\n".join(parts)
        try:
            store = await self.ctx.js.object_store(self.s.objects_bucket)
            await store.put(name, body.encode())
        except Exception:
            log.warning("agent: could not store the log of item %d", index)
            return None
        return name


async def attempts_ran(ctx: ServiceContext, wf: str, index: int, deliveries: int) -> int:
    """Attempts of item ``index`` that ran to a failure (its stored ``item.failed`` events),
    at most ``deliveries`` (those before this one): what the retry budget counts. A delivery
    that ended without a verdict (handed back unrun by an agent that stopped or drained, or
    interrupted by its agent's death or eviction) is no attempt, as Kubernetes does not count
    disruptions; counting deliveries made such an item run one retry fewer than its
    ``max_attempts``.
    Deliveries still bound an item whose agents keep dying (``outcome.before_run``). Unknown
    (the server did not answer): ``deliveries``, as before."""
    subject = ctx.subjects.item_failed(wf, index)
    try:
        failed = await count_messages(ctx.nc, ctx.subjects.events_stream, subject)
    except Exception as exc:  # the conservative count: the item runs no extra attempt
        log.debug("attempts of item %d unknown: %r", index, exc)
        return deliveries
    return min(failed, deliveries)


async def dead_stands(ctx: ServiceContext, wf: str, index: int) -> bool:
    """Whether item ``index``'s stored terminal result is an ``item.dead`` (whoever wrote
    it). Any other error is raised: the item then stays leased (not taken off the queue)
    and its redelivery asks again, so no DLQ entry is lost to an unanswered read."""
    try:
        await ctx.js.get_last_msg(ctx.subjects.results_stream, ctx.subjects.item_dead(wf, index))
    except NotFoundError:
        return False
    return True
