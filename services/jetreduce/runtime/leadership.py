"""One acting replica of a service at a time: a leader's lease, held as a claim.

Services whose replicas share durable consumers (planner, aggregator, janitor) need no
leader: each event reaches one of them and every handler is idempotent. A service that
*decides from a view of the whole installation* (the launcher: which workflows get agent
slots under ``--max-slots``, which Jobs to poll, relaunch and report) must decide in one
place, or two replicas both start a phase's agents and together exceed the cap.

The lease is a :class:`~jetreduce.runtime.claim.Claim` (create-only, revision-checked
renewals, taken over when released, expired or, on the same host, when its holder's process
is gone), on one key of the claims bucket. So:

* **One leader at a time.** A candidate takes the key only when it is free; a renewal is a
  revision-checked update, so a leader whose key was taken learns it at its next renewal.
* **Take-over is bounded.** A standby looks every ``poll_s``. It takes the lease at once
  when the leader released it (SIGTERM, a rolling update) or, on the same host, when the
  leader's process is gone (SIGKILL: ``services up`` twice on one machine); otherwise once
  it expired: at most ``ttl_s + poll_s`` after the leader's last renewal (pods on other
  nodes; a partitioned or frozen leader).
* **A leader that cannot renew stops acting before a successor may start.** Renewals come
  every third of ``ttl_s``; :meth:`Leadership.may_act` is true only while the last
  successful renewal is younger than ``ttl_s - safety_s`` (monotonic clock), and the acting
  code asks it before every action. When that time runs out the term ends (the ``lead``
  coroutine is told to stop) ``safety_s`` before the lease expires for the others: that
  margin is the leader's to undo what must not outlive it (the launcher stops its local
  agents). A paused process (SIGSTOP) resumes with ``may_act()`` already false.

Expiry compares wall clocks of different hosts (the claim's ``expires_ts``): the margin
``safety_s`` must dwarf their skew.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from nats.js import JetStreamContext

from jetreduce.contract.errors import TemporaryError
from jetreduce.runtime.claim import Claim

__all__ = ["LEASE_POLL_S", "LEASE_SAFETY_S", "LEASE_TTL_S", "Leadership", "NotLeader"]

log = logging.getLogger(__name__)

LEASE_TTL_S = 10.0
"""How long a leader's lease lasts without renewal (renewed every third of it)."""

LEASE_SAFETY_S = 3.0
"""A leader that could not renew stops acting this long before its lease expires."""

LEASE_POLL_S = 0.5
"""How often a standby looks at the lease."""

Lead = Callable[[asyncio.Event], Coroutine[Any, Any, None]]
"""The leader's work: runs until the event (the end of its term) is set, then cleans up."""


def process_host() -> str:
    """The hostname and this process's PID namespace: the claim takes a lease from a holder
    on the same "host" whose pid is gone, and two containers may share a hostname (host
    networking) without seeing each other's processes: each would think the other dead."""
    name = socket.gethostname()
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return name
    return f"{name}~{ns.removeprefix('pid:[').removesuffix(']')}"


class NotLeader(TemporaryError):
    """Raised by :meth:`Leadership.check` in a replica that may not act now."""


class Leadership:
    """The lease ``key`` of ``bucket`` for one replica of service ``name``."""

    def __init__(
        self,
        js: JetStreamContext,
        bucket: str,
        key: str,
        *,
        name: str,
        ttl_s: float = LEASE_TTL_S,
        safety_s: float | None = None,
        poll_s: float = LEASE_POLL_S,
        holder: str | None = None,
        host: str | None = None,
    ) -> None:
        safety = min(LEASE_SAFETY_S, ttl_s / 4) if safety_s is None else safety_s
        host = host or process_host()
        self.name = name
        self.poll_s = poll_s
        self.claim = Claim(js, bucket, key, ttl_s=ttl_s, safety_s=safety, holder=holder, host=host)
        self._term: asyncio.Event | None = None
        """Set when the current term ends (None: not leading)."""
        self.terms = 0
        """Terms won by this replica so far."""

    @property
    def holder(self) -> str:
        return self.claim.holder

    @property
    def leading(self) -> bool:
        """In a term, and the lease still ours by our own clock."""
        return self._term is not None and not self._term.is_set() and self.claim.left() > 0

    def may_act(self) -> bool:
        """Ask before every action: False in a standby, and in a leader whose lease may be
        someone else's soon (the fence)."""
        return self.leading

    def check(self) -> None:
        """:meth:`may_act`, raising :class:`NotLeader` when not."""
        if not self.may_act():
            raise NotLeader(f"{self.name}: not the leader")

    def describe(self) -> str:
        """One line for health endpoints and logs."""
        if self.leading:
            return f"{self.name}: leading ({self.holder}, lease {self.claim.left():.1f}s left)"
        return f"{self.name}: standing by ({self.holder})"

    async def run(self, stop: asyncio.Event, lead: Lead) -> None:
        """Until ``stop``: wait to win the lease, then run ``lead(term)`` while it is held.
        A term ends on ``stop`` (the lease is then released, once ``lead`` has returned, so
        a standby takes over at once) or when the lease is lost (``lead`` is told to stop;
        this replica stands by again). ``lead`` returning or raising on its own ends the
        term and is returned or raised (the host then stops the service)."""

        async def decided() -> bool:
            return stop.is_set()

        while not stop.is_set():
            taken = await self.claim.acquire(decided, self.poll_s)
            if taken is None:
                return
            self.terms += 1
            if taken.previous is None:
                log.info("%s: leading (%s)", self.name, self.holder)
            else:
                log.info(
                    "%s: leading (%s), taken over from %s (%s)",
                    self.name,
                    self.holder,
                    taken.previous,
                    taken.reason,
                )
            if await self._term_of(stop, lead):
                return

    async def _term_of(self, stop: asyncio.Event, lead: Lead) -> bool:
        """One term; True if it ended because ``stop`` is set."""
        term = asyncio.Event()
        renewing = asyncio.Event()
        """Set once ``lead`` has cleaned up: renewals go on until then (a shutdown that
        stops agents for longer than the lease lasts must not let a successor start)."""
        self._term = term
        holding = asyncio.create_task(self.claim.hold(renewing), name=f"{self.name} lease")
        acting = asyncio.create_task(lead(term), name=f"{self.name} leader")
        lost = asyncio.create_task(self.claim.lost.wait())
        stopped = asyncio.create_task(stop.wait())
        expired = asyncio.create_task(self._expiry())
        try:
            done, _ = await asyncio.wait(
                {acting, lost, stopped, expired}, return_when=asyncio.FIRST_COMPLETED
            )
            on_its_own = acting in done
            if not on_its_own and not stop.is_set():
                log.warning(
                    "%s: lease lost (not renewed in time, or taken); stepping down", self.name
                )
            term.set()
            with contextlib.suppress(Exception):  # its own error is raised below
                await acting  # its own error is raised below
        finally:
            term.set()
            renewing.set()
            for task in (acting, lost, stopped, expired):
                task.cancel()  # no-op on those done
            with contextlib.suppress(asyncio.CancelledError):
                await holding
            self._term = None
        if stop.is_set():
            await self.claim.release()  # revision-checked: only if still ours
            log.info("%s: lease released (%s)", self.name, self.holder)
        if acting.exception() is not None:
            raise acting.exception()  # type: ignore[misc]
        if stop.is_set():
            return True
        if on_its_own:
            raise RuntimeError(f"{self.name}: the leader's work ended on its own")
        log.info("%s: standing by (%s)", self.name, self.holder)
        return False

    async def _expiry(self) -> None:
        """Return once this term's time has run out by the local clock (the renewing task
        may be stuck in a write, or the process was paused): the fence does not wait for it."""
        while True:
            left = self.claim.left()
            if left <= 0:
                return
            await asyncio.sleep(min(left, self.poll_s))
