"""Publishing to JetStream the safe ways.

* :func:`publish_once` — create-only: the server stores the message only if nothing is stored
  yet on ``guard`` (default: the subject itself). Returns False when something already was,
  which callers treat as "already done" (research/jetstream.md §2: first write wins).
* :class:`AckPipeline` — bulk publishing with a bounded window of unacknowledged messages;
  never a synchronous publish per message in a loop.
* :class:`AckMux` — many concurrent publishes each awaited by its own caller (an agent's
  slots recording results), over one reply subscription; or, with :meth:`AckMux.send`,
  pipelined: the caller goes on and a callback gets the server's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from jetreduce.contract.errors import PermanentError, TemporaryError

__all__ = [
    "ALREADY_EXISTS_CODES",
    "NOT_ACKNOWLEDGED",
    "AckMux",
    "AckPipeline",
    "PublishFailed",
    "PublishRefused",
    "create_only_headers",
    "is_stored",
    "publish_once",
    "publish_retrying",
]

ALREADY_EXISTS_CODES = {10071, 10077}
"""Wrong last sequence (create-only guard) / per-subject limit: the message already exists."""

PUBLISH_TIMEOUT_S = 10.0
NOT_ACKNOWLEDGED = -408
"""What :meth:`AckMux.send`'s callback gets for a publish not acknowledged in time."""
NO_RESPONDERS = -503


class PublishFailed(TemporaryError, RuntimeError):
    """Publishes that were not acknowledged (a server or leader away): send them again."""


class PublishRefused(PermanentError, RuntimeError):
    """The server refused a publish for a reason other than a guard (sending it again is
    refused again)."""


async def publish_retrying(
    js: JetStreamContext,
    subject: str,
    payload: bytes,
    headers: dict[str, str] | None = None,
    *,
    attempts: int = 5,
) -> None:
    """Publish with a short retry on "no responders" (a stream leader election or a server
    starting), which nats-py does not retry by itself (research/jetstream.md §6)."""
    for attempt in range(attempts):
        try:
            await js.publish(subject, payload, headers=headers, timeout=PUBLISH_TIMEOUT_S)
            return
        except (NoStreamResponseError, NoRespondersError, NatsTimeout):
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.25 * (attempt + 1))


def create_only_headers(subject: str, guard: str | None = None) -> dict[str, str]:
    """Headers that make the server store a message only if nothing is stored yet on
    ``guard`` (a subject or wildcard; default ``subject``)."""
    headers = {"Nats-Expected-Last-Subject-Sequence": "0"}
    if guard is not None and guard != subject:
        headers["Nats-Expected-Last-Subject-Sequence-Subject"] = guard
    return headers


async def is_stored(js: JetStreamContext, stream: str, subject: str) -> bool:
    """Whether ``stream`` holds a message on ``subject`` (a once-only event happened)."""
    try:
        await js.get_last_msg(stream, subject)
    except NotFoundError:
        return False
    return True


async def publish_once(
    js: JetStreamContext,
    subject: str,
    payload: bytes,
    *,
    guard: str | None = None,
    headers: dict[str, str] | None = None,
) -> bool:
    """Store ``payload`` on ``subject`` unless a message exists on ``guard`` (a subject or a
    wildcard; defaults to ``subject``). True if this call stored it."""
    hdrs = {**(headers or {}), **create_only_headers(subject, guard)}
    try:
        await publish_retrying(js, subject, payload, hdrs)
    except APIError as exc:
        if exc.err_code in ALREADY_EXISTS_CODES:
            return False
        raise
    return True


class AckPipeline:
    """Pipelined JetStream publishing for bulk paths (enqueueing thousands of items).

    Messages go out as core publishes with a reply subject under one wildcard inbox; a single
    subscription matches the server's acknowledgements to what is in flight. Compared with one
    ``js.publish`` per message this skips a future, a request mux round and a PubAck object per
    message, and — unlike nats-py's ``publish_async`` — error acknowledgements are seen (a
    refused duplicate is counted, not left as a future that never resolves, nats.py#985).

    At most ``window`` messages are unacknowledged at once; a message not acknowledged within
    ``timeout_s`` (or answered "no responders" while a stream leader is elected) is published
    again, which is safe for the idempotent subjects this is used for.
    """

    def __init__(self, nc: Any, *, window: int = 4000, timeout_s: float = PUBLISH_TIMEOUT_S):
        self._nc = nc
        self._window = asyncio.Semaphore(window)
        self._timeout_s = timeout_s
        self._pending: dict[str, tuple[str, bytes, dict[str, str] | None, float]] = {}
        self._next = 0
        self._prefix = ""
        self._sub: Any = None
        self._drained = asyncio.Event()
        self._drained.set()
        self._resend: list[str] = []
        self.errors: list[str] = []
        self.published = 0
        self.rejected = 0

    async def __aenter__(self) -> AckPipeline:
        self._prefix = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_ack)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):  # cleanup: the connection may be closing
                await self._sub.unsubscribe()
            self._sub = None

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> None:
        await self._window.acquire()
        token = str(self._next)
        self._next += 1
        self._pending[token] = (subject, payload, headers, time.monotonic())
        self._drained.clear()
        await self._nc.publish(subject, payload, reply=f"{self._prefix}.{token}", headers=headers)

    async def _on_ack(self, msg: Any) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        entry = self._pending.get(token)
        if entry is None:
            return  # an ack for a message already re-sent and counted
        status = (msg.headers or {}).get("Status")
        if status == "503":  # no responders: the stream is not ready; try again shortly
            self._resend.append(token)
            return
        del self._pending[token]
        self._window.release()
        data = msg.data or b""
        if b'"error"' in data:
            try:
                code = int(json.loads(data)["error"].get("err_code", 0))
            except (ValueError, KeyError, TypeError, AttributeError):
                code = 0
            if code in ALREADY_EXISTS_CODES:
                self.rejected += 1
            else:
                self.errors.append(f"{entry[0]}: {data[:200]!r}")
        else:
            self.published += 1
        if not self._pending:
            self._drained.set()

    async def _resend_due(self) -> None:
        now = time.monotonic()
        due = [t for t, e in self._pending.items() if now - e[3] > self._timeout_s]
        due += self._resend
        self._resend = []
        for token in dict.fromkeys(due):
            entry = self._pending.get(token)
            if entry is None:
                continue
            subject, payload, headers, _ = entry
            self._pending[token] = (subject, payload, headers, now)
            await self._nc.publish(
                subject, payload, reply=f"{self._prefix}.{token}", headers=headers
            )

    async def flush(self, max_wait_s: float = 300.0) -> None:
        """Wait until every message is acknowledged (re-sending stragglers); raise if some
        were refused for a reason other than "already exists"."""
        deadline = time.monotonic() + max_wait_s
        while not self._drained.is_set():
            if time.monotonic() > deadline:
                raise PublishFailed(f"{len(self._pending)} publish(es) never acknowledged")
            await self._nc.flush()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drained.wait(), 0.25)
            await self._resend_due()
        if self.errors:
            first, count = self.errors[0], len(self.errors)
            self.errors = []
            raise PublishFailed(f"{count} publish(es) failed; first: {first}")


class AckMux:
    """Concurrent JetStream publishes, each awaited by its caller, sharing one reply inbox.

    ``js.publish`` costs a request future, a PubAck object and, for a refused create-only
    publish, an exception per message; in an agent recording thousands of results per second
    that was a tenth of its CPU. Here each publish is a core publish with a reply subject under
    one wildcard subscription, and the acknowledgement resolves the caller's future. A publish
    not acknowledged in time (or answered "no responders" during a leader election) is sent
    again: callers use it only for create-only subjects, where a repeat is refused, not stored.
    """

    def __init__(self, nc: Any, *, timeout_s: float = PUBLISH_TIMEOUT_S, attempts: int = 5):
        self._nc = nc
        self._timeout_s = timeout_s
        self._attempts = attempts
        self._waiting: dict[str, asyncio.Future[int]] = {}
        self._sent: dict[str, tuple[Callable[[int], None], float]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._next = 0
        self._prefix = ""
        self._sub: Any = None

    @property
    def unanswered(self) -> int:
        """Publishes sent with :meth:`send` whose answer has not come yet."""
        return len(self._sent)

    async def start(self) -> AckMux:
        self._prefix = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_ack)
        return self

    async def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        if self._sub is not None:
            with contextlib.suppress(Exception):  # cleanup: the connection may be closing
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_ack(self, msg: Any) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        code = _answer(msg)
        sent = self._sent.pop(token, None)
        if sent is not None:
            sent[0](code)
            return
        fut = self._waiting.get(token)
        if fut is not None and not fut.done():
            fut.set_result(code)

    async def send(
        self,
        subject: str,
        payload: bytes,
        on_answer: Callable[[int], None],
        *,
        guard: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Publish create-only without waiting: ``on_answer`` is called once with the
        server's answer: 0 stored, an ``err_code`` (one of :data:`ALREADY_EXISTS_CODES`: it
        already was), ``NO_RESPONDERS``, or ``NOT_ACKNOWLEDGED`` after the timeout. Nothing is
        sent again here: a caller that did not get 0 takes the awaited path
        (:meth:`publish_once`), which retries. Publishes of one loop iteration leave in one
        socket write; the timeout is swept by one timer, not one per publish."""
        token = str(self._next)
        self._next += 1
        self._sent[token] = (on_answer, time.monotonic() + self._timeout_s)
        hdrs = {**(headers or {}), **create_only_headers(subject, guard)}
        await self._nc.publish(subject, payload, reply=f"{self._prefix}.{token}", headers=hdrs)
        if self._sweep is None:
            loop = asyncio.get_running_loop()
            self._sweep = loop.call_later(self._timeout_s, self._expire)

    def _expire(self) -> None:
        self._sweep = None
        now = time.monotonic()
        overdue = [token for token, (_, due) in self._sent.items() if due <= now]
        for token in overdue:
            callback, _ = self._sent.pop(token)
            callback(NOT_ACKNOWLEDGED)
        if self._sent:
            first = min(due for _, due in self._sent.values())
            loop = asyncio.get_running_loop()
            self._sweep = loop.call_later(max(0.01, first - now), self._expire)

    async def publish_once(
        self,
        subject: str,
        payload: bytes,
        *,
        guard: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> bool:
        """As :func:`publish_once`: True if stored, False if something already was."""
        headers = {**(headers or {}), **create_only_headers(subject, guard)}
        for attempt in range(self._attempts):
            token = str(self._next)
            self._next += 1
            fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._waiting[token] = fut
            try:
                await self._nc.publish(
                    subject, payload, reply=f"{self._prefix}.{token}", headers=headers
                )
                code = await asyncio.wait_for(fut, self._timeout_s)
            except TimeoutError:
                continue
            finally:
                self._waiting.pop(token, None)
            if code == 0:
                return True
            if code in ALREADY_EXISTS_CODES:
                return False
            if code == NO_RESPONDERS:
                await asyncio.sleep(0.25 * (attempt + 1))
                continue
            raise PublishRefused(f"publish to {subject} refused (err_code {code})")
        raise TimeoutError(f"publish to {subject} not acknowledged after {self._attempts} tries")


def _answer(msg: Any) -> int:
    """A JetStream publish acknowledgement as a code: 0 stored, the ``err_code`` of an
    error (-1 when unreadable), ``NO_RESPONDERS`` for the 503 status."""
    if (msg.headers or {}).get("Status") == "503":
        return NO_RESPONDERS
    data = msg.data or b""
    if b'"error"' not in data:
        return 0
    try:
        return int(json.loads(data)["error"].get("err_code", 0)) or -1
    except (ValueError, KeyError, TypeError, AttributeError):
        return -1
