"""Janitor service: see the package docstring."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from nats.aio.msg import Msg

from jetreduce.contract.events import (
    ItemDead,
    WorkflowCancelled,
    WorkflowCancelRequested,
    WorkflowTimedOut,
    WorkItem,
    decode,
    encode,
)
from jetreduce.contract.objects import DEAD_LETTER_KINDS, object_owner, whole_workflow_objects
from jetreduce.contract.records import Phase
from jetreduce.janitor.deadlines import Deadlines
from jetreduce.janitor.k8s_sweep import ORPHAN_SWEEP_S, OrphanSweeper, WorkflowObjects
from jetreduce.janitor.objects import ObjectIndex
from jetreduce.queues.base import ItemQueue
from jetreduce.queues.factory import exhausted_items, open_queue
from jetreduce.runtime.publish import is_stored, publish_once
from jetreduce.runtime.service import EventConsumer, Retry, ServiceContext
from jetreduce.runtime.state import StateStore

__all__ = ["Janitor"]

log = logging.getLogger(__name__)

TIMEOUT_SWEEP_S = 1.0


class Janitor:
    def __init__(
        self,
        ctx: ServiceContext,
        *,
        objects: WorkflowObjects | None = None,
        sweep_every_s: float = ORPHAN_SWEEP_S,
    ) -> None:
        """``objects``: the cluster objects of workflows (the kubernetes backend), swept for
        orphans on start and every ``sweep_every_s``; None with the local backend."""
        self.ctx = ctx
        self.s = ctx.subjects
        self.state = StateStore(ctx.js, ctx.subjects)
        self.sweeper = (
            None if objects is None else OrphanSweeper(self.state, objects, sweep_every_s)
        )
        self.objects = ObjectIndex(ctx.js, ctx.subjects.objects_bucket)

    async def run(self, stop: asyncio.Event) -> None:
        consumer = EventConsumer(
            self.ctx,
            stream=self.s.events_stream,
            durable="janitor",
            filters=[self.s.workflow("cancel", "*"), *self.s.workflow_ends("*")],
            handler=self.on_event,
        )
        # Items a queue stopped delivering (JetStream's max deliveries), behind the seam.
        exhausted = exhausted_items(self.ctx, self.bury_crashed)
        loops = [consumer.run(stop), exhausted.run(stop), self._timeouts(stop)]
        if self.sweeper is not None:
            loops.append(self.sweeper.run(stop))
        # The object index follows the store until the consumers are done: a cleanup still
        # in flight at shutdown needs it to answer (stopped first, it would wait in vain).
        following = asyncio.Event()
        index = asyncio.create_task(self.objects.run(following))
        try:
            await asyncio.gather(*loops)
        finally:
            following.set()
            await index

    async def _timeouts(self, stop: asyncio.Event) -> None:
        """End workflows that outlived their ``timeout_s`` (checked every second, against
        deadlines that follow the records through one watch: ``janitor/deadlines.py``)."""
        deadlines = Deadlines(self.state)
        following = asyncio.create_task(deadlines.follow(stop), name="janitor deadlines")
        try:
            while not stop.is_set():
                try:
                    for wf, limit in await deadlines.due(time.time()):
                        await self.time_out(wf, limit)
                except Exception:
                    log.exception("janitor: timeout sweep failed")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), TIMEOUT_SWEEP_S)
        finally:
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await following

    async def time_out(self, wf: str, limit: float) -> None:
        record = await self.state.transition(
            wf, Phase.TIMED_OUT, reason=f"timed out after {limit:g}s"
        )
        if record is None:
            return
        await publish_once(
            self.ctx.js,
            self.s.workflow("timed_out", wf),
            encode(WorkflowTimedOut(workflow_id=wf, timeout_s=limit)),
        )
        log.info("workflow %s timed out after %gs", wf, limit)

    async def bury_crashed(self, work: WorkItem, deliveries: int) -> None:
        """An item whose agents kept dying on it (the JetStream queue stopped delivering it):
        dead-letter it instead of leaving it invisible in the work stream forever."""
        wf, index = work.workflow_id, work.index
        dead = ItemDead(
            workflow_id=wf,
            index=index,
            item_id=f"item_{index}",
            error=f"agent died {deliveries} times while running this item",
            error_type="AgentCrashed",
            exit_code=None,
            stderr_tail="",
            attempts=deliveries,
        )
        stored = await publish_once(
            self.ctx.js,
            self.s.item_dead(wf, index),
            encode(dead),
            guard=self.s.item_terminal(wf, index),
        )
        if stored:
            dead.item = work.item
            await publish_once(self.ctx.js, self.s.dlq(wf, index), encode(dead))

    async def on_event(self, msg: Msg) -> None:
        # ``workflow.cancel.<A>`` carrying workflow B must cancel neither.
        event = decode(msg.data, subject=msg.subject)
        wf = event.workflow_id
        if isinstance(event, WorkflowCancelRequested):
            await self.cancel(wf, event.reason)
            return
        await self.clean(wf)

    async def cancel(self, wf: str, reason: str) -> None:
        record = await self.state.transition(wf, Phase.CANCELLED, reason=reason)
        if record is None:
            return  # unknown, or already finished: nothing to cancel
        await (await self._queue(wf)).purge()
        await publish_once(
            self.ctx.js,
            self.s.workflow("cancelled", wf),
            encode(WorkflowCancelled(workflow_id=wf, reason=reason)),
        )
        log.info("workflow %s cancelled: %s", wf, reason)

    async def _queue(self, wf: str) -> ItemQueue:
        spec = await self.state.get_spec(wf)
        return open_queue(self.ctx, wf, spec.options.queue if spec else None)

    async def _delete_item_objects(self, store: Any, wf: str) -> None:
        """Items too large for their message, outputs too large for their event and dead
        items' logs, as the object index knows them (the workflow's own objects only: no
        listing of the store). An item still in the dead-letter queue keeps its stored item
        and its log (``contract/objects.py``): a DLQ retry runs it again, ``dlq show``
        prints the log. When the index lags, the terminal event is redelivered."""
        try:
            names = await self.objects.names(wf)
        except TimeoutError:
            raise Retry(f"object index of {wf}: not caught up with the store yet") from None
        for name in sorted(names):
            owner = object_owner(name)
            if (
                owner is not None
                and owner[2] in DEAD_LETTER_KINDS
                and await is_stored(self.ctx.js, self.s.dlq_stream, self.s.dlq(wf, owner[1]))
            ):
                continue  # dead-lettered: kept
            with contextlib.suppress(Exception):  # gone already: nothing to delete
                await store.delete(name)

    async def clean(self, wf: str) -> None:
        await (await self._queue(wf)).purge()
        try:
            store = await self.ctx.js.object_store(self.s.objects_bucket)
        except Exception:
            return  # no object store (yet): nothing stored
        # The resolved input, and the submitter's upload of it if any (its name comes
        # from the id, so it goes without reading the possibly removed record).
        for name in whole_workflow_objects(wf):
            with contextlib.suppress(Exception):  # absent: nothing to delete
                await store.delete(name)
        await self._delete_item_objects(store, wf)
