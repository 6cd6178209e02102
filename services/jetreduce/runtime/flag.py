"""An :class:`asyncio.Event` that can also resolve plain futures.

Waiting for "whichever comes first" of several events the usual way,
``asyncio.wait({ensure_future(a.wait()), ensure_future(b.wait()), task})``, makes a task per
event, started and then cancelled, each a callback or two for the event loop. A map agent
with one slot did that five times per item (its pull's timed wait, its lease against
``map.complete``, its wait for the slot to free): without them it makes 16 event-loop
passes per item instead of 18, and 200 one-slot agents ran 3-10 % faster (issue 18).
:meth:`Flag.future` gives a plain future instead, which ``asyncio.wait`` watches with a
callback.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["Flag", "wait_first"]


class Flag(asyncio.Event):
    """An event whose :meth:`future` completes when it is set (at once if it is)."""

    def __init__(self) -> None:
        super().__init__()
        self._futures: set[asyncio.Future[None]] = set()

    def set(self) -> None:
        super().set()
        futures, self._futures = self._futures, set()
        for future in futures:
            if not future.done():
                future.set_result(None)

    def future(self) -> asyncio.Future[None]:
        """A future done once the flag is set; cancel it (or let it complete) when no longer
        wanted, so that it is dropped."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.is_set():
            future.set_result(None)
        else:
            self._futures.add(future)
            future.add_done_callback(self._futures.discard)
        return future


async def wait_first(
    flags: list[Flag],
    others: list[asyncio.Future[Any]] | None = None,
    timeout_s: float | None = None,
) -> None:
    """Until one of ``flags`` is set, one of ``others`` (tasks, futures) is done, or
    ``timeout_s`` passes: ``asyncio.wait(FIRST_COMPLETED)`` without a task per flag."""
    futures = [flag.future() for flag in flags]
    try:
        await asyncio.wait(
            [*futures, *(others or [])], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for future in futures:
            future.cancel()
