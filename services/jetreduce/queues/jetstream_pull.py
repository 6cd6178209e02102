"""Pull requests to a JetStream consumer with exact accounting of what they may still bring.

nats-py's ``fetch`` times out on the client 100 µs after the server's ``expires``. On a busy
machine the request reaches the server later than that, so the client gives up while the
server still holds the request; the agent then sends another one, and the server fills
both: an item lands in the subscription's queue while the agent's one slot runs the other.
With 1,000 one-slot agents that was ~1,958 items leased for 1,000 slots (issue 18), each
stranded extra one waiting for its agent to finish the item before it.

Here every pull request has its own reply subject (``<inbox>.<n>`` under one wildcard
subscription), so the closing status of each request (``408`` expired, ``409`` refused,
``404``) names it; a delivery (which keeps its own subject) fills the oldest open request,
as the server serves them. A request's *credit* (``batch`` minus what it delivered) is
counted until the server closes it, not until a client-side timer fires, and
a new request only asks for what the caller's budget allows beyond the credit still out:

    buffered + credit out  <=  the largest ``max_n`` the caller passed

so a one-slot agent never holds more than one item. A request whose closing status is lost
(a reconnect) is forgotten ``LOST_AFTER_S`` after its expiry. Messages arrive through a
subscription callback (no task per ``next_msg``), and a request that arrives while items
are pending is filled at once, so the fast path costs one pull message per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from nats.errors import ConnectionClosedError

from jetreduce.runtime.flag import Flag, wait_first

__all__ = ["LOST_AFTER_S", "Puller"]

LOST_AFTER_S = 2.0
"""A request with no closing status this long after its expiry is taken as gone (its status
was lost with a connection); anything it still brings lands in the buffer all the same."""
MIN_EXPIRES_S = 0.05


@dataclass
class _Request:
    remaining: int
    forget_at: float


class Puller:
    """Pull requests on ``next_subject`` (``$JS.API.CONSUMER.MSG.NEXT.<stream>.<durable>``)
    whose deliveries go to a local buffer; see the module docstring for the bound."""

    def __init__(self, nc: Any, next_subject: str) -> None:
        self._nc = nc
        self._next_subject = next_subject
        self._prefix = ""
        self._sub: Any = None
        self._open: dict[str, _Request] = {}
        self._serial = 0
        self.buffer: deque[Any] = deque()
        self._changed = Flag()
        self.requests = 0
        """Pull requests sent (for tests and measurements)."""

    async def start(self) -> None:
        if self._sub is None:
            self._prefix = self._nc.new_inbox()
            self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_msg)

    @property
    def credit(self) -> int:
        """Messages the open requests may still bring."""
        now = time.monotonic()
        lost = [token for token, req in self._open.items() if req.forget_at < now]
        for token in lost:
            del self._open[token]
        return sum(req.remaining for req in self._open.values())

    async def _on_msg(self, msg: Any) -> None:
        headers = msg.headers
        status = headers.get("Status") if headers else None
        if status is None:
            # A delivery keeps its own subject, not the request's: it fills the oldest open
            # request, as the server serves one client's requests in the order they came.
            for token, request in self._open.items():
                request.remaining -= 1
                if request.remaining <= 0:
                    del self._open[token]
                break
            self.buffer.append(msg)
            self._changed.set()
        elif status != "100" and self._open.pop(msg.subject.rsplit(".", 1)[-1], None):
            self._changed.set()  # 100 is an idle heartbeat; every other status closes one

    async def take(self, max_n: int, wait_s: float) -> list[Any]:
        """Up to ``max_n`` delivered messages, waiting at most ``wait_s`` for the first;
        a pull is sent only for what ``max_n`` leaves beyond the buffer and the credit out."""
        if max_n <= 0:
            return []
        if self._nc.is_closed:  # nothing will come: say so, as a fetch would
            raise ConnectionClosedError
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, wait_s)
        while True:
            if self.buffer:
                if len(self.buffer) < max_n and self._open:
                    await asyncio.sleep(0)  # the rest of a burst being read right now
                count = min(max_n, len(self.buffer))
                return [self.buffer.popleft() for _ in range(count)]
            remaining = deadline - loop.time()
            want = max_n - self.credit
            if want > 0:  # a poll (no time left) too: what it brings is taken next time
                await self._request(want, max(remaining, MIN_EXPIRES_S))
            if remaining <= 0:
                return []
            self._changed.clear()
            await wait_first([self._changed], timeout_s=remaining)  # no task per wait

    async def _request(self, batch: int, expires_s: float) -> None:
        self._serial += 1
        token = str(self._serial)
        self._open[token] = _Request(batch, time.monotonic() + expires_s + LOST_AFTER_S)
        body = json.dumps({"batch": batch, "expires": int(expires_s * 1e9)}).encode()
        self.requests += 1
        await self._nc.publish(self._next_subject, body, reply=f"{self._prefix}.{token}")

    async def close(self) -> list[Any]:
        """Stop receiving (the server drops a waiting request without interest); the
        messages delivered and not taken are returned, for the caller to hand back."""
        if self._sub is not None:
            with contextlib.suppress(Exception):  # cleanup: the connection may be closing
                await self._sub.unsubscribe()
            self._sub = None
        self._open.clear()
        left = list(self.buffer)
        self.buffer.clear()
        return left
