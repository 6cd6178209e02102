"""When to count: a workflow's results arriving wake its count, so ``map.complete`` follows the
last item's result within milliseconds instead of at the next tick (issue 17: the 0.25 s tick
was ~175 ms of a 4-item workflow's 1.34 s).

Each counted workflow has a core NATS subscription on its terminal item subjects
(``item.<done|dead>.<wf>.<index>``). An arrival is only a hint, never a count: a core
subscriber sees every publish, including a duplicate the stream refused and a forged index,
may see one before the stream has stored it, and misses what is published while it
reconnects. So arrivals never complete anything; they decide *when* the exact count (the
server's, counting indices ``0..total-1``: counting.py) runs:

* each distinct index below ``total`` is remembered (one bit), so a duplicate or a forged
  index ``>= total`` adds nothing;
* the estimate is the last exact count plus the indices first seen since that count was
  asked for; only when it reaches ``total`` (the count *could* be complete) is the workflow
  checked after 1 ms, then again after 2, 4 … 128 ms while the last results are being stored
  and their items acked (a result is stored before its item is acked, and the map completes
  only on an idle queue). A burst of arrivals while a check is under way is coalesced into
  the next one: 100k results cause no server count until the estimate reaches the total.
* the tick (service.py) still counts every workflow: it covers whatever the subscription
  missed, so at worst completion waits for the tick, as before.

Every aggregator replica watches every counted workflow; ``map.complete`` is create-only, so
whichever replica counts to the end first stores it and the others' attempts are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg

from jetreduce.contract.subjects import Subjects
from jetreduce.runtime.counts import item_index

__all__ = ["SOON_DELAYS_S", "Arrivals", "Watched"]

log = logging.getLogger(__name__)

SOON_DELAYS_S = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128)
"""Checks after the estimate reaches the total: almost at once, then while the last results are
stored and their items acked (about a tick in all; after that the tick counts as before)."""

SUBSCRIBE_TIMEOUT_S = 2.0


@dataclass
class Watched:
    """What arrived for one workflow since its subscription began."""

    total: int
    seen: bytearray = field(init=False)
    """One bit per index ``0..total-1`` first seen arriving."""
    seen_n: int = 0
    offset: int | None = None
    """Last exact count minus ``seen_n`` when that count was asked for: the estimate is
    ``seen_n + offset``. None until the first exact count after subscribing."""
    sub: Any = None
    soon: asyncio.Task[None] | None = None
    again: bool = False
    """New indices arrived while a check ran: start the delays over."""

    def __post_init__(self) -> None:
        self.seen = bytearray((self.total + 7) // 8)

    def estimate(self) -> int | None:
        """Terminal items the arrivals suggest (at least as many as there are, less what the
        subscription missed); None before the first exact count."""
        return None if self.offset is None else self.seen_n + self.offset

    def add(self, index: int) -> bool:
        """Remember ``index``; True if it is a new index of this workflow."""
        if not 0 <= index < self.total:
            return False
        byte, bit = divmod(index, 8)
        if self.seen[byte] >> bit & 1:
            return False
        self.seen[byte] |= 1 << bit
        self.seen_n += 1
        return True


class Arrivals:
    """The subscriptions of the counted workflows and the checks their arrivals trigger."""

    def __init__(self, nc: Any, subjects: Subjects, check: Callable[[str], Awaitable[None]]):
        self.nc = nc
        self.s = subjects
        self.check = check
        self.watched: dict[str, Watched] = {}

    async def watch(self, wf: str, total: int) -> None:
        """Subscribe to ``wf``'s results (before its first exact count, so that what is
        stored after that count began is seen). A failure leaves the tick to count."""
        await self.unwatch(wf)
        watched = Watched(total)
        self.watched[wf] = watched

        async def on_result(msg: Msg) -> None:
            self._on_result(wf, watched, msg)

        try:
            watched.sub = await self.nc.subscribe(self.s.terminal_of(wf), cb=on_result)
            await self.nc.flush(timeout=SUBSCRIBE_TIMEOUT_S)  # the server has it
        except Exception as exc:
            log.warning("workflow %s: results not watched (%r); counted every tick", wf, exc)

    async def unwatch(self, wf: str) -> None:
        watched = self.watched.pop(wf, None)
        if watched is None:
            return
        if watched.soon is not None and watched.soon is not asyncio.current_task():
            watched.soon.cancel()
        if watched.sub is not None:
            with contextlib.suppress(Exception):  # the connection may be closing
                await watched.sub.unsubscribe()

    async def close(self) -> None:
        for wf in list(self.watched):
            await self.unwatch(wf)

    def asking(self, wf: str) -> int:
        """Call as an exact count of ``wf`` is asked for; pass the value to :meth:`counted`."""
        watched = self.watched.get(wf)
        return watched.seen_n if watched is not None else 0

    def counted(self, wf: str, asked: int, terminal: int) -> None:
        """An exact count asked for at ``asked`` found ``terminal`` items: the estimate
        starts from it. If that brings it to the total, check soon (the count may have
        missed the last results, or their items were not acked yet)."""
        watched = self.watched.get(wf)
        if watched is None:
            return
        before = watched.estimate()
        watched.offset = terminal - asked
        after = watched.estimate()
        if (
            after is not None
            and after >= watched.total
            and (before is None or before < watched.total)
        ):
            self._soon(wf, watched)

    def _on_result(self, wf: str, watched: Watched, msg: Msg) -> None:
        tokens = msg.subject.rsplit(".", 3)
        index = item_index(tokens[3]) if len(tokens) == 4 else None
        if index is None or tokens[1] not in ("done", "dead"):
            return  # item.failed (an attempt), or not an item's result
        if not watched.add(index):
            return
        estimate = watched.estimate()
        if estimate is not None and estimate >= watched.total:
            self._soon(wf, watched)

    def _soon(self, wf: str, watched: Watched) -> None:
        if watched.soon is not None and not watched.soon.done():
            watched.again = True
            return
        watched.soon = asyncio.create_task(self._checks(wf, watched), name=f"soon-{wf}")

    async def _checks(self, wf: str, watched: Watched) -> None:
        step = 0
        while step < len(SOON_DELAYS_S):
            await asyncio.sleep(SOON_DELAYS_S[step])
            if self.watched.get(wf) is not watched:
                return  # completed, failed or no longer counted here
            watched.again = False
            try:
                await self.check(wf)
            except Exception:
                log.exception("aggregator: counting %s failed", wf)
                return  # the tick counts it again
            step = 0 if watched.again else step + 1
