"""The service loop: a durable pull consumer on the events stream feeding idempotent handlers.

Delivery is at-least-once, so every handler must be safe to run twice. A handler that raises
:class:`Retry` (or any unexpected exception) gets the event redelivered after a delay — never
a hot loop; a malformed event is terminated at once with its reason logged, so one bad message
cannot wedge a service (invariant 5).

A poison message that is well formed but makes the handler fail every time is retried until
its last allowed delivery (``max_deliver``) and then terminated with an error log, rather than
left to the server's silent give-up: the log line is what tells an operator which event was
dropped. Acknowledging is best effort: if the connection is gone the server redelivers after
``ack_wait``, and the loop must not die of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError, ServiceUnavailableError

from jetreduce.contract.errors import TemporaryError
from jetreduce.contract.events import BadEvent
from jetreduce.contract.subjects import Subjects

__all__ = ["EventConsumer", "Handler", "Retry", "ServiceContext"]

log = logging.getLogger(__name__)

TRANSIENT = (NatsTimeout, asyncio.TimeoutError, ServiceUnavailableError, NoRespondersError)
"""What a JetStream API call raises while the cluster has no leader for it."""

Handler = Callable[[Msg], Awaitable[None]]


class Retry(TemporaryError):
    """Raise from a handler to have the event redelivered after ``delay_s``."""

    def __init__(self, reason: str, delay_s: float = 2.0) -> None:
        super().__init__(reason)
        self.delay_s = delay_s


@dataclass
class ServiceContext:
    """What a service gets handed: a connection and the names. Services construct nothing."""

    nc: Client
    js: JetStreamContext
    subjects: Subjects


class EventConsumer:
    """One durable consumer (``durable``) on ``stream`` filtered to ``filters``."""

    poll_s = 0.5
    """How long one pull waits for events before the next (a stop does not wait for it)."""

    def __init__(
        self,
        ctx: ServiceContext,
        *,
        stream: str,
        durable: str,
        filters: list[str],
        handler: Handler,
        ack_wait_s: float = 60.0,
        max_deliver: int = 20,
        batch: int = 64,
        deliver_new: bool = False,
    ) -> None:
        self.ctx = ctx
        self.stream = stream
        self.durable = durable
        self.filters = filters
        self.handler = handler
        self.ack_wait_s = ack_wait_s
        self.max_deliver = max_deliver
        self.batch = batch
        self.deliver_new = deliver_new

    async def ensure(self) -> None:
        config = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_s,
            max_deliver=self.max_deliver,
            max_ack_pending=10_000,
            deliver_policy=DeliverPolicy.NEW if self.deliver_new else DeliverPolicy.ALL,
            filter_subjects=self.filters if len(self.filters) > 1 else None,
            filter_subject=self.filters[0] if len(self.filters) == 1 else None,
        )
        try:
            await self.ctx.js.consumer_info(self.stream, self.durable)
        except NotFoundError:
            await self.ctx.js.add_consumer(self.stream, config)

    async def run(self, stop: asyncio.Event) -> None:
        while True:
            try:
                await self.ensure()
                sub = await self.ctx.js.pull_subscribe_bind(self.durable, stream=self.stream)
                break
            except TRANSIENT as exc:
                # A cluster electing a leader (4-9 s after one dies) answers nothing: a
                # replica that starts then must wait, not die (issue 19: the survivor of two
                # died so, and the workflow hung).
                log.warning("%s: consumer not reachable yet (%r); retrying", self.durable, exc)
                await _sleep_or_stop(stop, 1.0)
                if stop.is_set():
                    return
        try:
            while not stop.is_set():
                try:
                    msgs = await _fetch_or_stop(sub, self.batch, stop, self.poll_s)
                except (TimeoutError, NatsTimeout):
                    continue
                except Exception as exc:  # consumer deleted, connection lost: back off
                    log.warning("%s: fetch failed (%r); retrying", self.durable, exc)
                    await _sleep_or_stop(stop, 1.0)
                    with contextlib.suppress(Exception):  # the fetch loop retries; logged above
                        await self.ensure()
                    continue
                for msg in msgs:
                    await self._handle(msg)
        finally:
            with contextlib.suppress(Exception):  # cleanup: the connection may be closing
                await sub.unsubscribe()

    async def _handle(self, msg: Msg) -> None:
        try:
            await self._dispatch(msg)
        except Exception as exc:  # ack/nak/term on a lost connection: redelivered later
            log.warning("%s: could not settle %s (%r)", self.durable, msg.subject, exc)

    async def _dispatch(self, msg: Msg) -> None:
        try:
            await self.handler(msg)
        except BadEvent as exc:
            log.error("%s: dropping malformed event on %s: %s", self.durable, msg.subject, exc)
            await msg.term()
            return
        except Retry as exc:
            if self._last_delivery(msg):
                log.error(
                    "%s: giving up on %s after %d deliveries: %s",
                    self.durable,
                    msg.subject,
                    self.max_deliver,
                    exc,
                )
                await msg.term()
                return
            log.info("%s: will retry %s in %.1fs: %s", self.durable, msg.subject, exc.delay_s, exc)
            await msg.nak(delay=exc.delay_s)
            return
        except Exception:
            if self._last_delivery(msg):
                log.exception(
                    "%s: handler failed on %s for the %dth time; dropping it",
                    self.durable,
                    msg.subject,
                    self.max_deliver,
                )
                await msg.term()
                return
            log.exception("%s: handler failed on %s; redelivering", self.durable, msg.subject)
            await msg.nak(delay=2.0)
            return
        await msg.ack()

    def _last_delivery(self, msg: Msg) -> bool:
        """True when the server will not deliver ``msg`` again after this attempt."""
        try:
            delivered = msg.metadata.num_delivered
        except Exception:  # not a JetStream message: nothing will redeliver it either
            return True
        return self.max_deliver > 0 and delivered is not None and delivered >= self.max_deliver


async def _fetch_or_stop(
    sub: JetStreamContext.PullSubscription, batch: int, stop: asyncio.Event, poll_s: float
) -> list[Msg]:
    """One long poll, abandoned when ``stop`` is set: a service stops at
    once instead of at the end of its poll (``jetreduce run`` waited up to 0.5 s per
    service after the workflow ended). Nothing is lost: the unsubscribe that follows removes
    the poll's interest, so the server drops it, and a message it sent in that instant is
    redelivered after ``ack_wait``. Messages that arrived with the stop are still handled."""
    fetching = asyncio.ensure_future(sub.fetch(batch, timeout=poll_s))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({fetching, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if fetching.done():
        return fetching.result()
    fetching.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):  # abandoned: see above
        await fetching
    return []


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
