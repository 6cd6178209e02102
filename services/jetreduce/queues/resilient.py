"""An item queue that rides out an outage of its backend (Redis or the SQS endpoint gone).

Without it an agent dies on the first :class:`QueueError`; its launcher restarts it, it dies
again at once, and the crash-loop budget fails the workflow although nothing is wrong with
the work. Here a failing call opens a breaker: the outage is reported once (``on_change``
with ``"unavailable"`` and the error), calls are retried with a growing, jittered delay,
and the first one that succeeds closes it (``"available"``). Nothing is lost meanwhile:
the items stay on the backend, leases that expire during the outage are delivered again,
and terminal results are recorded on JetStream, first write wins.

A lost lease (``LeaseLost``: it expired and the item went to another consumer) is raised at
once: no retry can settle it, and the backend is fine. Once the agent is stopping, retries
end: ``lease`` returns nothing and the other calls raise,
since the backend will expire those leases anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from jetreduce.contract.events import WorkItem
from jetreduce.queues.base import (
    EnqueueResult,
    ItemQueue,
    Lease,
    LeaseLost,
    QueueDepth,
    QueueError,
)

__all__ = ["ResilientQueue"]

log = logging.getLogger(__name__)

T = TypeVar("T")
OnChange = Callable[[str, str], Awaitable[None]]
"""Called with ("unavailable", error) when an outage starts and ("available", "") at its end."""


class ResilientQueue:
    def __init__(
        self,
        queue: ItemQueue,
        stop: asyncio.Event,
        on_change: OnChange | None = None,
        *,
        first_delay_s: float = 0.5,
        max_delay_s: float = 10.0,
    ) -> None:
        self.inner = queue
        self.workflow_id = queue.workflow_id
        self.ack_concurrency = queue.ack_concurrency
        self.stop = stop
        self.on_change = on_change
        self.first_delay_s = first_delay_s
        self.max_delay_s = max_delay_s
        self.down = False

    async def _notify(self, state: str, error: str) -> None:
        if self.on_change is not None:
            with contextlib.suppress(Exception):  # NATS may be what is down
                await self.on_change(state, error)

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        delay = self.first_delay_s
        while True:
            try:
                result = await call()
            except LeaseLost:
                raise  # a fact about this lease, not the backend: retrying cannot help
            except QueueError as exc:
                if not self.down:
                    self.down = True
                    log.warning("item queue unavailable (%s): %s; backing off", what, exc)
                    await self._notify("unavailable", str(exc))
                if self.stop.is_set():
                    raise
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), delay * random.uniform(0.8, 1.2))
                delay = min(self.max_delay_s, delay * 2)
                continue
            if self.down:
                self.down = False
                log.warning("item queue available again")
                await self._notify("available", "")
            return result

    async def prepare(self, *, visibility_s: float, max_attempts: int, parallel: int) -> None:
        await self._call(
            "prepare",
            lambda: self.inner.prepare(
                visibility_s=visibility_s, max_attempts=max_attempts, parallel=parallel
            ),
        )

    async def enqueue(self, items: Iterable[WorkItem], *, lane: str = "p1") -> EnqueueResult:
        # Not retried here: an iterator cannot be replayed. Enqueue is idempotent, so the
        # caller (the planner, redelivered) enqueues again.
        return await self.inner.enqueue(items, lane=lane)

    async def lease(self, max_n: int, wait_s: float) -> list[Lease]:
        try:
            return await self._call("lease", lambda: self.inner.lease(max_n, wait_s))
        except QueueError:
            return []  # stopping

    async def heartbeat(self, lease: Lease) -> None:
        # One try: the next beat comes soon, and a lease lost in an outage is redelivered.
        try:
            await self.inner.heartbeat(lease)
        except QueueError as exc:
            log.debug("heartbeat failed: %s", exc)

    async def ack(self, lease: Lease) -> None:
        await self._call("ack", lambda: self.inner.ack(lease))

    async def retry(self, lease: Lease, delay_s: float) -> None:
        await self._call("retry", lambda: self.inner.retry(lease, delay_s))

    async def dead(self, lease: Lease, reason: str) -> None:
        await self._call("dead", lambda: self.inner.dead(lease, reason))

    async def depth(self) -> QueueDepth:
        # Not retried: its callers poll, and ask again on their next tick.
        return await self.inner.depth()

    async def purge(self) -> None:
        await self.inner.purge()

    async def close(self) -> None:
        await self.inner.close()
