"""How a workflow ends: its record moves to a terminal phase, then the matching terminal event
(``workflow.completed`` / ``workflow.failed``) is published, once.

The record is the arbiter: a workflow cancelled, timed out or failed first is not completed
after (``_ended_as``), and the event is create-only, so a redelivered event or a second
replica publishes nothing twice. ``workflow.completed`` carries the map agents' utilisation
(usage.py), which may mean waiting briefly for their last reports; that wait comes before the
record moves, so a workflow that ends otherwise meanwhile is not completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from jetreduce.aggregator.usage import USAGE_WAIT_S, map_usage
from jetreduce.contract.events import WorkflowCompleted, WorkflowFailed, encode
from jetreduce.contract.records import Phase, WorkflowRecord
from jetreduce.runtime.publish import is_stored, publish_once
from jetreduce.runtime.service import ServiceContext
from jetreduce.runtime.state import StateStore
from jetreduce.runtime.telemetry import trace_headers

__all__ = ["Finisher"]

log = logging.getLogger(__name__)


class Finisher:
    """Publishes a workflow's terminal event (``completed`` joins one already under way)."""

    def __init__(
        self,
        ctx: ServiceContext,
        state: StateStore,
        *,
        untrack: Callable[[str], Awaitable[object]],
        usage_wait_s: float = USAGE_WAIT_S,
    ) -> None:
        self.ctx = ctx
        self.s = ctx.subjects
        self.state = state
        self.untrack = untrack
        self.usage_wait_s = usage_wait_s
        self._completing: dict[str, asyncio.Task[None]] = {}

    async def completed(
        self, wf: str, total: int, done: int, dead: int, reduce_output: str | None = None
    ) -> None:
        """Complete ``wf`` (idempotent). Called for the same workflow from the event that
        says so and, sooner, by the replica that stored ``map.complete``: the second caller
        waits for the first's result instead of reading the reports again.

        ``reduce_output`` None: there is no reduce, so the map agents may still be leaving.
        Either way, reports still missing are awaited (usage.py, bounded): the launcher
        starts the reduce without waiting for the map agents to go, so after a short reduce
        one may still be on its way. When all are in, nothing is waited for."""
        task = self._completing.get(wf)
        if task is None:
            task = asyncio.create_task(
                self._complete(wf, total, done, dead, reduce_output), name=f"complete-{wf}"
            )
            self._completing[wf] = task
            task.add_done_callback(lambda t: self._forget(wf, t))
        await asyncio.shield(task)  # one caller stopping does not stop it for the other

    def _forget(self, wf: str, task: asyncio.Task[None]) -> None:
        if self._completing.get(wf) is task:
            del self._completing[wf]

    async def close(self) -> None:
        tasks = list(self._completing.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):  # cancelled or already failed
                await task

    async def _complete(
        self, wf: str, total: int, done: int, dead: int, reduce_output: str | None
    ) -> None:
        record = await self.state.get(wf)
        if record is None:
            return  # no such workflow (deleted): nothing to end
        if record.phase.terminal:
            if record.phase != Phase.COMPLETED:
                return  # it ended otherwise first (failed by map.failed, cancelled, timed out)
            if await is_stored(self.ctx.js, self.s.events_stream, self.s.workflow("completed", wf)):
                return  # completed before (a redelivered event): nothing to wait for
        usage = await map_usage(self.ctx.js, self.s, wf, wait_s=self.usage_wait_s)
        reduce_output = reduce_output or ""
        record = await self._ended_as(wf, Phase.COMPLETED, reduce_output=reduce_output)
        if record is None:
            return
        await publish_once(
            self.ctx.js,
            self.s.workflow("completed", wf),
            encode(
                WorkflowCompleted(
                    workflow_id=wf,
                    total=total,
                    done=done,
                    dead=dead,
                    duration_s=round(time.time() - record.created_ts, 3),
                    reduce_output=reduce_output,
                    utilisation=usage.utilisation,
                    busy_slot_s=round(usage.busy_slot_s, 3),
                    held_slot_s=round(usage.held_slot_s, 3),
                )
            ),
            headers=trace_headers(),
        )

    async def failed(self, wf: str, reason: str) -> None:
        await self.untrack(wf)
        if await self._ended_as(wf, Phase.FAILED, reason=reason) is None:
            return
        await publish_once(
            self.ctx.js,
            self.s.workflow("failed", wf),
            encode(WorkflowFailed(workflow_id=wf, reason=reason)),
            headers=trace_headers(),
        )

    async def _ended_as(self, wf: str, phase: Phase, **fields: Any) -> WorkflowRecord | None:
        """The record if the workflow ended (now, or on an earlier delivery of this event)
        as ``phase``; None if it ended otherwise, so only one terminal event is published."""
        await self.state.transition(wf, phase, **fields)
        record = await self.state.get(wf)
        return record if record is not None and record.phase == phase else None
