"""Janitor service: see the package docstring."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.msg import Msg

from jetreduce.contract.events import WorkflowCancelled, WorkflowCancelRequested, decode, encode
from jetreduce.contract.records import Phase
from jetreduce.queues.base import ItemQueue
from jetreduce.queues.factory import open_queue
from jetreduce.runtime.publish import publish_once
from jetreduce.runtime.service import EventConsumer, ServiceContext
from jetreduce.runtime.state import StateStore

__all__ = ["Janitor"]

log = logging.getLogger(__name__)

_TERMINAL = ("completed", "failed", "cancelled", "timed_out")


class Janitor:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.s = ctx.subjects
        self.state = StateStore(ctx.js, ctx.subjects)

    async def run(self, stop: asyncio.Event) -> None:
        consumer = EventConsumer(
            self.ctx,
            stream=self.s.events_stream,
            durable="janitor",
            filters=[self.s.workflow("cancel", "*"), *[self.s.workflow(e, "*") for e in _TERMINAL]],
            handler=self.on_event,
        )
        await consumer.run(stop)

    async def on_event(self, msg: Msg) -> None:
        event = decode(msg.data)
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

    async def clean(self, wf: str) -> None:
        await (await self._queue(wf)).purge()
        with contextlib.suppress(Exception):
            store = await self.ctx.js.object_store(self.s.objects_bucket)
            await store.delete(f"input/{wf}")
