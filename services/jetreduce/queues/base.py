"""The item-queue contract (DESIGN §7). Every backend passes the same conformance tests.

Guarantees each implementation gives:

* ``enqueue`` is idempotent per (workflow, item index): an item already pending is not queued
  again (it counts as a duplicate). Calls are batched/pipelined inside the backend.
* ``lease`` returns at most ``max_n`` items and waits at most ``wait_s`` for the first one.
  Nothing is leased beyond what callers asked for: items delivered to the client and not yet
  returned (a backend's read-ahead) never exceed the largest ``max_n`` of a pending call, so
  a caller that asks for its free slots never holds items no slot works on.
  A leased item is invisible to other consumers until acked, retried, declared dead, or its
  lease expires (``visibility_s`` without a heartbeat) — then it is delivered again.
* ``heartbeat`` extends a lease; ``retry`` makes the item visible again after ``delay_s``
  (never at once: no hot loops); ``dead`` removes it for good; ``ack`` removes it after success.
* ``Lease.attempt`` counts deliveries, starting at 1.
* ``depth`` counts the items not finished yet (see :class:`QueueDepth`) in a call whose cost
  does not grow with the number of items: callers poll it (the aggregator, every tick).
* Every failure of the backend surfaces as :class:`QueueError` (``LeaseLost`` for a lease that
  is no longer the caller's); no client library's exception crosses this seam.

A delivery past ``max_attempts + UNVERDICTED_DELIVERIES`` is never run: JetStream's consumer
stops delivering there (``max_deliver``; ``jetstream.ExhaustedItems`` reads the server's
advisory back into the item, and the janitor dead-letters it), and on the other backends
the agent dead-letters it when it leases it (``worker/outcome.py``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from jetreduce.contract.errors import TemporaryError
from jetreduce.contract.events import WorkItem

__all__ = [
    "UNVERDICTED_DELIVERIES",
    "EnqueueResult",
    "ItemQueue",
    "Lease",
    "LeaseLost",
    "QueueDepth",
    "QueueError",
]

UNVERDICTED_DELIVERIES = 3
"""Deliveries of an item beyond its ``max_attempts`` that may end without a verdict: an agent
that died on it, or handed it back on SIGTERM. Retries count as deliveries on every backend."""


class QueueError(TemporaryError):
    """A backend failed (connection lost, refused…); the cause is chained."""


class LeaseLost(QueueError):
    """The lease is no longer this consumer's (it expired and the item went to another), so
    acking, retrying or burying it cannot succeed however often it is tried. Not an outage."""


@dataclass
class Lease:
    item: WorkItem
    attempt: int
    token: Any = field(repr=False, default=None)
    """Backend handle (a JetStream message, a Redis stream id, an SQS receipt handle)."""
    leased_at: float = field(default_factory=time.monotonic, repr=False)
    """When this agent got it (monotonic clock): the lease age the metrics report."""


@dataclass
class EnqueueResult:
    added: int = 0
    duplicates: int = 0


@dataclass
class QueueDepth:
    """The items of the workflow that are queued and not finished (acked or dead), in two
    parts: ``pending`` waits for a delivery, ``in_flight`` is delivered and not settled.

    Both are counted because the sum is what callers decide on: the aggregator treats the
    queue as possibly drained only at ``idle`` (nothing pending *and* nothing leased), and
    runs its O(items) exact count of results only then; progress reports both parts.

    Where an item waiting out a retry delay falls differs by backend (JetStream and SQS keep
    it in flight: its delivery is not settled; Redis counts it pending: it left the stream),
    so only the sum and ``idle`` mean the same everywhere. An item JetStream stopped delivering
    (max deliveries) is in neither. SQS's counts are approximate (eventually consistent):
    ``idle`` there means "probably drained", never more than a hint to count exactly.
    """

    pending: int
    in_flight: int

    @property
    def unfinished(self) -> int:
        return self.pending + self.in_flight

    @property
    def idle(self) -> bool:
        """Nothing pending and nothing leased: the map may be done (count to be sure)."""
        return self.unfinished == 0


class ItemQueue(Protocol):
    workflow_id: str
    ack_concurrency: int
    """How many ``ack`` calls a caller settling many leases should keep in flight at once:
    1 where an ack is a fire-and-forget message (JetStream: awaiting one costs nothing), more
    where each is a round trip (Redis) or is coalesced with concurrent ones (SQS's batches)."""

    async def prepare(self, *, visibility_s: float, max_attempts: int, parallel: int) -> None:
        """Create what the workflow's queue needs (idempotent)."""

    async def enqueue(self, items: Iterable[WorkItem], *, lane: str = "p1") -> EnqueueResult: ...

    async def lease(self, max_n: int, wait_s: float) -> list[Lease]: ...

    async def heartbeat(self, lease: Lease) -> None: ...

    async def ack(self, lease: Lease) -> None: ...

    async def retry(self, lease: Lease, delay_s: float) -> None: ...

    async def dead(self, lease: Lease, reason: str) -> None: ...

    async def depth(self) -> QueueDepth:
        """The workflow's unfinished items (:class:`QueueDepth`); one round trip whatever
        their number. An unprepared (or purged) queue is empty, not an error."""

    async def purge(self) -> None:
        """Drop every queued item of the workflow and what ``prepare`` created."""

    async def close(self) -> None:
        """Release client resources (never the queued items)."""
