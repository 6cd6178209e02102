"""Acking leases whose results are stored, off the item path.

An item's result is published pipelined (`AckMux.send`); its lease may be acked only once the
server answered that the result is stored (exactly-once: an item acked before its result is
stored would be lost with the agent). The answer arrives in a subscription callback, which
must not wait for the queue, so it hands the lease to a :class:`Settler`: one task per burst
of answers (not one per item) acks them, as many at once as the backend wants
(``ItemQueue.ack_concurrency``: JetStream's fire-and-forget acks one after another, so a
burst leaves in one socket write; Redis and SQS calls overlapped).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from jetreduce.queues.base import Lease, LeaseLost
from jetreduce.queues.resilient import ResilientQueue

__all__ = ["Settler"]

log = logging.getLogger(__name__)


class Settler:
    def __init__(self, queue: ResilientQueue, on_settled: Callable[[Lease], None]) -> None:
        self.queue = queue
        self.on_settled = on_settled
        """Called once per lease after its ack (or its failure, logged): the slot is free."""
        self._due: deque[Lease] = deque()
        self._task: asyncio.Task[None] | None = None

    def ack(self, lease: Lease) -> None:
        """Ack ``lease`` soon (its result is stored)."""
        self._due.append(lease)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="settler")

    async def _run(self) -> None:
        try:
            width = max(1, self.queue.ack_concurrency)
            while self._due:
                batch = [self._due.popleft() for _ in range(min(width, len(self._due)))]
                if width == 1:
                    for lease in batch:
                        await self._one(lease)
                else:
                    await asyncio.gather(*(self._one(lease) for lease in batch))
        finally:
            self._task = None

    async def _one(self, lease: Lease) -> None:
        try:
            await self.queue.ack(lease)
        except LeaseLost:
            # Its lease expired while it ran and another agent has it: that delivery's
            # result is refused (first write wins), this one stands.
            log.warning("item %d: lease lost before its ack", lease.item.index)
        except Exception as exc:  # stopping, or the backend gone: the lease expires
            log.warning("item %d: not acked (%s); it is delivered again", lease.item.index, exc)
        finally:
            self.on_settled(lease)

    async def wait(self) -> None:
        """Until every lease handed over so far is acked (or failed)."""
        while self._task is not None:
            await asyncio.shield(self._task)
