"""The default item queue: the JetStream WorkQueue stream ``WORK``, one durable pull consumer
per workflow (``work-<wf>``, filter ``work.*.<wf>.*``).

One subject per item plus ``discard_new_per_subject`` makes enqueue idempotent (a pending
duplicate is refused with err 10077). The consumer's ``ack_wait`` is the lease; ``in_progress``
is the heartbeat; ``nak(delay)`` the delayed retry; ``term`` removes a dead item.

Every nats failure leaves this module as :class:`QueueError` (the package promises callers see
nothing else, and ``ResilientQueue`` rides out only those). ``LeaseLost`` is raised for a
verdict on a lease this object already settled: nats-py refuses it, however often it is tried.
A lease that merely expired cannot be told apart here: JetStream acks are fire-and-forget, and
the server ignores an ack for a delivery it has already handed to another consumer.

Max deliveries live here too (:class:`ExhaustedItems`): the consumer stops delivering an item
after ``max_attempts + UNVERDICTED_DELIVERIES`` deliveries and the server says so only in an
advisory; this module reads it back into the item, so nothing above the seam knows advisories,
stream sequences or the work stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import MsgAlreadyAckdError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from jetreduce.contract.events import BadEvent, WorkItem, decode_as, encode
from jetreduce.contract.subjects import Subjects
from jetreduce.queues.base import (
    UNVERDICTED_DELIVERIES,
    EnqueueResult,
    Lease,
    LeaseLost,
    QueueDepth,
    QueueError,
)
from jetreduce.queues.jetstream_pull import Puller
from jetreduce.runtime.publish import AckPipeline
from jetreduce.runtime.service import EventConsumer, ServiceContext

__all__ = ["Bury", "ExhaustedItems", "JetStreamQueue"]

log = logging.getLogger(__name__)


ENQUEUE_WINDOW = 512
"""Unacknowledged enqueue publishes at once. Measured here (100k items, file storage): a few
hundred in flight keeps the server busy; thousands only queue up in the client and slow it
(256: ~31k/s, 1000: ~24k/s, 16000: ~18k/s)."""


@contextlib.asynccontextmanager
async def _translated(what: str) -> AsyncIterator[None]:
    """Above ``queues/`` nothing knows nats: its failures become :class:`QueueError`."""
    try:
        yield
    except MsgAlreadyAckdError as exc:
        raise LeaseLost(f"jetstream {what}: the lease was already settled") from exc
    except (NatsError, OSError, RuntimeError) as exc:
        # RuntimeError: AckPipeline's "publish refused"; OSError covers nats' TimeoutError.
        raise QueueError(f"jetstream {what} failed: {exc}") from exc


class JetStreamQueue:
    def __init__(self, ctx: ServiceContext, workflow_id: str) -> None:
        self.ctx = ctx
        self.workflow_id = workflow_id
        self.subjects: Subjects = ctx.subjects
        self._durable = self.subjects.work_consumer(workflow_id)
        self._puller: Puller | None = None
        self._puller_lock = asyncio.Lock()

    async def prepare(self, *, visibility_s: float, max_attempts: int, parallel: int) -> None:
        config = ConsumerConfig(
            durable_name=self._durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=self.subjects.work_of(self.workflow_id),
            ack_wait=visibility_s,
            # Retries are nak(delay)s and count as deliveries; a few more cover agents that
            # crash mid-item. Past this the server gives up and the janitor dead-letters it.
            max_deliver=max_attempts + UNVERDICTED_DELIVERIES,
            max_ack_pending=max(1000, parallel * 4),
            max_waiting=4096,
        )
        async with _translated("prepare"):
            try:
                await self.ctx.js.consumer_info(self.subjects.work_stream, self._durable)
            except NotFoundError:
                await self.ctx.js.add_consumer(self.subjects.work_stream, config)

    async def enqueue(self, items: Iterable[WorkItem], *, lane: str = "p1") -> EnqueueResult:
        async with (
            _translated("enqueue"),
            AckPipeline(self.ctx.nc, window=ENQUEUE_WINDOW) as pipe,
        ):
            for item in items:
                subject = self.subjects.work(lane, self.workflow_id, item.index)
                await pipe.publish(subject, encode(item))
            await pipe.flush()
        return EnqueueResult(added=pipe.published, duplicates=pipe.rejected)

    async def _pull(self) -> Puller:
        async with self._puller_lock:
            if self._puller is None:
                api = getattr(self.ctx.js, "_prefix", "$JS.API")
                next_subject = (
                    f"{api}.CONSUMER.MSG.NEXT.{self.subjects.work_stream}.{self._durable}"
                )
                puller = Puller(self.ctx.nc, next_subject)
                await puller.start()
                self._puller = puller
            return self._puller

    async def lease(self, max_n: int, wait_s: float) -> list[Lease]:
        """Up to ``max_n`` items; the pull requests never ask for more than ``max_n`` beyond
        what earlier ones may still bring (``jetstream_pull``): a lease is never stranded in
        a client buffer behind a busy slot."""
        async with _translated("lease"):
            puller = await self._pull()
            msgs = await puller.take(max_n, wait_s)
            leases = []
            for msg in msgs:
                try:
                    item = decode_as(msg.data, WorkItem)
                except BadEvent:
                    await msg.term()  # not ours to run: never redeliver garbage
                    continue
                leases.append(Lease(item=item, attempt=msg.metadata.num_delivered, token=msg))
            return leases

    ack_concurrency = 1
    """An ack is a fire-and-forget message: one caller at a time keeps up."""

    async def heartbeat(self, lease: Lease) -> None:
        async with _translated("heartbeat"):
            await lease.token.in_progress()

    async def ack(self, lease: Lease) -> None:
        async with _translated("ack"):
            await lease.token.ack()

    async def retry(self, lease: Lease, delay_s: float) -> None:
        async with _translated("retry"):
            await lease.token.nak(delay=max(0.001, delay_s))

    async def dead(self, lease: Lease, reason: str) -> None:
        async with _translated("dead"):
            await lease.token.term()

    async def depth(self) -> QueueDepth:
        """The work consumer's own counters, one ``CONSUMER.INFO`` (O(1) on the server):
        ``num_pending`` (not delivered yet) and ``num_ack_pending`` (delivered and not acked:
        leased, or nak'd and waiting out its retry delay). No consumer yet, or purged: empty."""
        async with _translated("depth"):
            try:
                info = await self.ctx.js.consumer_info(self.subjects.work_stream, self._durable)
            except NotFoundError:
                return QueueDepth(pending=0, in_flight=0)
        return QueueDepth(pending=info.num_pending or 0, in_flight=info.num_ack_pending or 0)

    async def purge(self) -> None:
        async with _translated("purge"):
            with contextlib.suppress(NotFoundError):
                await self.ctx.js.delete_consumer(self.subjects.work_stream, self._durable)
            await self.ctx.js.purge_stream(
                self.subjects.work_stream, subject=self.subjects.work_of(self.workflow_id)
            )

    async def close(self) -> None:
        """Stop pulling; items delivered and not yet leased go back at once (not after their
        ``ack_wait``): a stopping agent strands nothing."""
        if self._puller is not None:
            left = await self._puller.close()
            self._puller = None
            for msg in left:
                with contextlib.suppress(Exception):  # the lease expires anyway
                    await msg.nak()


Bury = Callable[[WorkItem, int], Awaitable[None]]
"""Records the verdict on an item the server stopped delivering, given the item and how many
times it was delivered (the caller's concern: events, the dead-letter queue)."""


class ExhaustedItems:
    """The JetStream side of max deliveries: the server stops delivering an item after the
    consumer's ``max_deliver`` (an agent died on it every time, research/jetstream.md §6) and
    only publishes an advisory, captured in the advisories stream. This reads each advisory
    back into its work item, hands it to ``bury`` (the janitor records it dead) and then
    removes the message, so it does not stay invisible in the work stream forever.

    ``bury`` runs before the message goes: a crash in between redelivers the advisory, and
    ``bury`` must then be idempotent (the janitor's writes are guarded by the item's subject).
    """

    DURABLE = "janitor-advisories"
    """The durable consumer's name (kept from when the janitor read advisories itself)."""

    def __init__(self, ctx: ServiceContext, bury: Bury) -> None:
        self.ctx = ctx
        self.subjects = ctx.subjects
        self.bury = bury

    async def run(self, stop: asyncio.Event) -> None:
        consumer = EventConsumer(
            self.ctx,
            stream=self.subjects.advisories_stream,
            durable=self.DURABLE,
            filters=[self.subjects.max_deliveries_advisories],
            handler=self.on_advisory,
        )
        await consumer.run(stop)

    async def on_advisory(self, msg: Msg) -> None:
        try:
            advisory = json.loads(msg.data)
            seq = int(advisory["stream_seq"])
            deliveries = int(advisory.get("deliveries", 0))
        except (ValueError, KeyError, TypeError):
            log.error("unreadable max-deliveries advisory dropped")
            return
        work_stream = self.subjects.work_stream
        try:
            raw = await self.ctx.js.get_msg(work_stream, seq)
        except NotFoundError:
            return  # already handled (a redelivered advisory) or purged
        try:
            work = decode_as(raw.data or b"", WorkItem)
        except BadEvent:
            await self.ctx.js.delete_msg(work_stream, seq)
            return
        await self.bury(work, deliveries)
        with contextlib.suppress(NotFoundError):
            await self.ctx.js.delete_msg(work_stream, seq)
