"""Publishing to JetStream the safe ways.

* :func:`publish_once` — create-only: the server stores the message only if nothing is stored
  yet on ``guard`` (default: the subject itself). Returns False when something already was,
  which callers treat as "already done" (research/jetstream.md §2: first write wins).
* :class:`Pipeline` — many publishes in flight with a bounded window, each bounded by a
  timeout; never a synchronous publish per message in a loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.errors import APIError, NoStreamResponseError

__all__ = ["ALREADY_EXISTS_CODES", "Pipeline", "publish_once", "publish_retrying"]

ALREADY_EXISTS_CODES = {10071, 10077}
"""Wrong last sequence (create-only guard) / per-subject limit: the message already exists."""

PUBLISH_TIMEOUT_S = 10.0


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
    hdrs = dict(headers or {})
    hdrs["Nats-Expected-Last-Subject-Sequence"] = "0"
    if guard is not None and guard != subject:
        hdrs["Nats-Expected-Last-Subject-Sequence-Subject"] = guard
    try:
        await publish_retrying(js, subject, payload, hdrs)
    except APIError as exc:
        if exc.err_code in ALREADY_EXISTS_CODES:
            return False
        raise
    return True


class Pipeline:
    """Keeps up to ``window`` publishes in flight; :meth:`flush` waits for all of them.

    ``on_error`` decides per failed publish: return normally to ignore it (for example an
    "already exists" answer on an idempotent enqueue) or raise to abort. Failures are collected
    in order of completion and re-raised by :meth:`flush` when ``on_error`` is not given.
    """

    def __init__(
        self,
        js: JetStreamContext,
        *,
        window: int = 2000,
        on_error: Callable[[str, BaseException], Awaitable[None] | None] | None = None,
    ) -> None:
        self._js = js
        self._sem = asyncio.Semaphore(window)
        self._tasks: set[asyncio.Task[None]] = set()
        self._errors: list[BaseException] = []
        self._on_error = on_error
        self.published = 0
        self.rejected = 0

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> None:
        await self._sem.acquire()
        task = asyncio.create_task(self._one(subject, payload, headers))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _one(self, subject: str, payload: bytes, headers: dict[str, str] | None) -> None:
        try:
            await publish_retrying(self._js, subject, payload, headers)
            self.published += 1
        except APIError as exc:
            if exc.err_code in ALREADY_EXISTS_CODES:
                self.rejected += 1
            else:
                await self._fail(subject, exc)
        except Exception as exc:
            await self._fail(subject, exc)
        finally:
            self._sem.release()

    async def _fail(self, subject: str, exc: BaseException) -> None:
        if self._on_error is None:
            self._errors.append(exc)
            return
        result = self._on_error(subject, exc)
        if result is not None:
            await result

    async def flush(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._errors:
            first = self._errors[0]
            count = len(self._errors)
            self._errors.clear()
            raise RuntimeError(f"{count} publish(es) failed; first: {first}") from first
