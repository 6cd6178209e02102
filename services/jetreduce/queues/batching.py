"""Coalescing single calls into batch calls (SQS's ``DeleteMessageBatch`` and the like).

A :class:`Batcher` takes entries one at a time from concurrent callers and hands them to a
batch function, up to ``max_batch`` at a time. Every caller awaits the outcome of its own
entry: it returns once the batch call reported that entry done, and raises the entry's own
error (or the whole call's error) otherwise. An entry is sent at most once.

When a partial batch goes out:

* at once when no batch call is in flight (``eager``): a lone caller waits for nothing but
  its own call, so coalescing costs no latency when there is nothing to coalesce with;
* otherwise when ``max_batch`` entries are waiting, or when the oldest one has waited
  ``linger_s`` — entries that arrive while a call is in flight gather into the next one;
* never more than ``max_in_flight`` calls at once; a finished call sends what has gathered.

A caller cancelled before its entry went out takes the entry with it; one cancelled after
leaves the call to finish (its outcome is dropped). :meth:`drain` sends everything waiting at
once and returns when no call is left in flight.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["BatchFn", "Batcher"]

E = TypeVar("E")

BatchFn = Callable[[list[E]], Awaitable[Sequence[BaseException | None]]]
"""Sends a batch; returns one outcome per entry, in order: None (done) or the entry's error.
Raising fails every entry of the batch with that error."""


@dataclass
class _Waiting(Generic[E]):
    entry: E
    future: asyncio.Future[None]
    since: float


class Batcher(Generic[E]):
    """Coalesces :meth:`submit` calls into calls of ``send`` (see the module docstring)."""

    def __init__(
        self,
        send: BatchFn[E],
        *,
        max_batch: int = 10,
        linger_s: float = 0.02,
        max_in_flight: int = 4,
        eager: bool = True,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1 or linger_s < 0:
            raise ValueError("max_batch and max_in_flight must be >= 1, linger_s >= 0")
        self._send = send
        self.max_batch = max_batch
        self.linger_s = linger_s
        self.max_in_flight = max_in_flight
        self.eager = eager
        self._waiting: deque[_Waiting[E]] = deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._draining = False
        self.calls = 0
        """Batch calls made so far (for tests and measurements)."""

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiting if not w.future.done())

    async def submit(self, entry: E) -> None:
        """Queue ``entry`` for the next batch and wait for its own outcome."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(entry, loop.create_future(), loop.time())
        self._waiting.append(waiting)
        self._pump()
        await waiting.future  # cancelling the caller cancels the future: the entry is dropped

    async def drain(self) -> None:
        """Send whatever is waiting now (no lingering) and wait for every call in flight."""
        self._draining = True
        try:
            self._pump()
            while self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
                self._pump()
        finally:
            self._draining = False

    # -- internals --------------------------------------------------------------------------
    def _take(self) -> list[_Waiting[E]]:
        batch: list[_Waiting[E]] = []
        while self._waiting and len(batch) < self.max_batch:
            waiting = self._waiting.popleft()
            if not waiting.future.done():  # a cancelled caller's entry is not sent
                batch.append(waiting)
        return batch

    def _pump(self) -> None:
        """Start every batch call that is due; arm the linger timer for the rest."""
        loop = asyncio.get_running_loop()
        while self._waiting and self._waiting[0].future.done():
            self._waiting.popleft()
        while self._waiting and self._in_flight < self.max_in_flight:
            full = len(self._waiting) >= self.max_batch
            idle = self.eager and self._in_flight == 0
            due = loop.time() - self._waiting[0].since >= self.linger_s
            if not (full or idle or due or self._draining):
                break
            batch = self._take()
            if not batch:
                continue
            self._in_flight += 1
            self.calls += 1
            task = loop.create_task(self._flush(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._waiting and self._in_flight < self.max_in_flight:
            delay = max(0.0, self._waiting[0].since + self.linger_s - loop.time())
            self._timer = loop.call_later(delay, self._on_timer)
        # At max_in_flight no timer is needed: the next call to finish pumps again.

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    async def _flush(self, batch: list[_Waiting[E]]) -> None:
        try:
            try:
                outcomes = list(await self._send([w.entry for w in batch]))
                if len(outcomes) != len(batch):
                    raise RuntimeError(
                        f"batch function gave {len(outcomes)} outcomes for {len(batch)} entries"
                    )
            except asyncio.CancelledError:
                for w in batch:
                    w.future.cancel()
                raise
            except Exception as exc:  # every entry fails with the call's error
                outcomes = [exc] * len(batch)
            for w, outcome in zip(batch, outcomes, strict=True):
                if w.future.done():  # its caller was cancelled meanwhile
                    continue
                if outcome is None:
                    w.future.set_result(None)
                else:
                    w.future.set_exception(outcome)
        finally:
            self._in_flight -= 1
            self._pump()
