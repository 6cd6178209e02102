"""Reading what the streams store, as ``runtime/state.py`` is for the KV records.

:func:`read_subject` is the one way to read "every message stored on a subject": an ordered
consumer (ephemeral, flow-controlled, recreated by the client on a gap) read up to the
message whose metadata says nothing more is pending. It returns as soon as it has read to
the end, instead of waiting for a quiet period, and never waits on an empty subject: the
consumer's info says at once that there is nothing. The wait is bounded as a whole.

Object names live in ``contract/objects.py``; publishing in ``runtime/publish.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from jetreduce.contract.events import BadEvent, Event, decode

__all__ = ["READ_TIMEOUT_S", "read_events", "read_subject"]

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 10.0
"""Default bound (s) of a whole read: a subject holds a workflow's events of one kind."""


async def read_subject(
    js: JetStreamContext, stream: str, subject: str, *, timeout_s: float = READ_TIMEOUT_S
) -> list[Msg]:
    """Every message stored on ``subject`` (a wildcard is fine) in ``stream`` when called, in
    stream order; what is published during the read may or may not be included. [] for an
    empty subject or a stream that does not exist. Raises ``TimeoutError`` when the end is
    not reached within ``timeout_s``: a partial read is never passed off as the whole."""
    try:
        sub = await js.subscribe(
            subject, stream=stream, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
    except NotFoundError:
        return []  # no such stream (not declared yet): nothing stored
    try:
        info = await sub.consumer_info()
        # Everything stored when the consumer was made is either pending or delivered.
        delivered = info.delivered.consumer_seq if info.delivered is not None else 0
        if not info.num_pending and not delivered:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        out: list[Msg] = []
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"{stream} {subject}: not read to its end in {timeout_s:g}s")
            msg = await sub.next_msg(timeout=left)
            out.append(msg)
            if not msg.metadata.num_pending:
                return out
    finally:
        with contextlib.suppress(Exception):  # the connection is closing: nothing to undo
            await sub.unsubscribe()


async def read_events(
    js: JetStreamContext, stream: str, subject: str, *, timeout_s: float = READ_TIMEOUT_S
) -> list[Event]:
    """:func:`read_subject`, decoded. An unreadable payload (anyone allowed to publish on
    the subject may have stored one) is logged and skipped, never fatal to the reader."""
    events: list[Event] = []
    for msg in await read_subject(js, stream, subject, timeout_s=timeout_s):
        try:
            events.append(decode(msg.data))
        except BadEvent as exc:
            log.warning("%s: stored message %s skipped: %s", subject, _seq(msg), exc)
    return events


def _seq(msg: Msg) -> str:
    with contextlib.suppress(Exception):  # for a log line only
        return str(msg.metadata.sequence.stream)
    return "?"
