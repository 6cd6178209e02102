"""At most one agent runs a workflow's setup or reduce steps at a time.

Such a phase is run by one agent, but a launcher that restarts (or a second replica, or a
Job controller replacing a pod) may start another while the first still runs: its steps
(which push, merge, post…) must then not run twice at once. The agent that runs them holds a
*claim*, a key of the claims bucket, taken create-only or by a revision-checked update and
renewed by the holder at a third of its time to live, each renewal checked against the
revision it last wrote. A successor takes the claim only when

* its holder released it (it stopped on SIGTERM without an outcome),
* its holder is known dead (same host, and that process is gone: the local backend), or
* it expired (not renewed for ``ttl_s``: the holder's host or pod is gone, or cut off).

A holder that cannot renew in time (a partition, a server outage longer than the time to
live) or finds the claim taken treats itself as fenced: it stops its steps and publishes no
outcome. Each take counts an attempt, so a re-run after a crash is known and announced
(``reduce.restarted``), and the steps see ``${reduce.attempt}``.

Expiry compares wall clocks of different hosts: the time to live must dwarf their skew.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from jetreduce.contract.records import PhaseClaim

__all__ = ["CLAIM_TTL_S", "Claim", "Taken", "process_boot"]

log = logging.getLogger(__name__)

CLAIM_TTL_S = 15.0
"""Default time to live of a claim (``JETREDUCE_CLAIM_TTL_S``): how long a successor waits
for a holder that vanished without trace (its host is gone). Renewed every third of it."""

SAFETY_S = 1.0
"""A holder gives the claim up this long before it would expire (a quarter of a shorter
time to live): the margin between its clock running out and a successor's (same TTL,
counted from the last write)."""

POLL_S = 0.5
"""How often a waiting successor looks at the claim (and at the phase's outcome)."""

_claims = msgspec.json.Decoder(PhaseClaim)


def process_boot(pid: int) -> str:
    """The start time of process ``pid`` (field 22 of ``/proc/<pid>/stat``), "" if unknown:
    with the pid it names one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else ""


def _known_dead(claim: PhaseClaim, host: str) -> bool:
    """The holder ran on this host and its process is gone (or is another one now)."""
    if claim.host != host or claim.pid <= 0:
        return False
    if claim.pid == os.getpid():
        return False
    try:
        os.kill(claim.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return bool(claim.boot) and process_boot(claim.pid) != claim.boot


@dataclass(frozen=True)
class Taken:
    """A claim won: which attempt this is and whom it was taken from (None: the first)."""

    attempt: int
    previous: str | None = None
    reason: str = ""


class Claim:
    """One agent's claim of one phase of one workflow (``key`` in ``bucket``)."""

    def __init__(
        self,
        js: JetStreamContext,
        bucket: str,
        key: str,
        *,
        ttl_s: float = CLAIM_TTL_S,
        host: str | None = None,
        pid: int | None = None,
        holder: str | None = None,
        safety_s: float | None = None,
    ) -> None:
        """``holder``: the name written in the claim (default ``host/pid``; two holders in
        one process need distinct ones). ``safety_s``: how long before its expiry a holder
        that could not renew gives the claim up (default :data:`SAFETY_S`, at most a
        quarter of ``ttl_s``): a holder with more to undo when it loses (a launcher stopping
        its agents) asks for more."""
        self._js = js
        self._bucket = bucket
        self.key = key
        self.ttl_s = ttl_s
        self.host = host or socket.gethostname()
        self.pid = os.getpid() if pid is None else pid
        self.holder = holder or f"{self.host}/{self.pid}"
        self.lost = asyncio.Event()
        """Set when this holder may no longer run the phase (taken, or not renewed in time)."""
        self._kv: KeyValue | None = None
        self._revision = 0
        self._attempt = 0
        self._valid_until = 0.0
        if safety_s is not None and not 0 <= safety_s < ttl_s / 2:
            raise ValueError(f"safety_s must be under half of ttl_s, got {safety_s}")
        self._safety_s = min(SAFETY_S, ttl_s / 4) if safety_s is None else safety_s
        self._renewing = asyncio.Lock()
        """One renewal at a time: two sent with the same expected revision would have the
        second refused, and the holder would take itself for fenced."""
        """Monotonic time until which the last successful write keeps the claim ours."""

    def left(self) -> float:
        """Seconds this holder may still act on the claim (its last successful write, less
        the safety margin); 0 once lost. Read from the monotonic clock, not from the
        renewing task: a process that was paused (SIGSTOP) sees at once that its time ran
        out, before its renewal has been tried."""
        if self.lost.is_set() or self._attempt == 0:
            return 0.0
        return max(0.0, self._valid_until - self._safety_s - time.monotonic())

    async def _bucket_kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self._js.key_value(self._bucket)
        return self._kv

    def _record(self, attempt: int, *, released: bool = False) -> bytes:
        return msgspec.json.encode(
            PhaseClaim(
                holder=self.holder,
                host=self.host,
                pid=self.pid,
                boot=process_boot(self.pid),
                attempt=attempt,
                expires_ts=0.0 if released else time.time() + self.ttl_s,
                released=released,
            )
        )

    async def acquire(
        self, decided: Callable[[], Awaitable[bool]], poll_s: float = POLL_S
    ) -> Taken | None:
        """Wait until this agent holds the claim; None once ``decided()`` (the phase has an
        outcome: nothing is left to run). Transient errors (a server restarting) are
        waited out."""
        while True:
            try:
                if await decided():
                    return None
                taken = await self._try_take()
                if taken is not None:
                    return taken
            except KeyWrongLastSequenceError:
                continue  # another agent wrote it first: look again at once
            except Exception as exc:
                log.warning("claim %s: %r; trying again", self.key, exc)
            await asyncio.sleep(poll_s)

    async def _try_take(self) -> Taken | None:
        kv = await self._bucket_kv()
        started = time.monotonic()
        try:
            entry = await kv.get(self.key)
        except KeyNotFoundError:
            entry = None
        if entry is None or not entry.value:
            self._revision = await kv.create(self.key, self._record(1))
            self._won(1, started)
            return Taken(1)
        current = _claims.decode(entry.value)
        if current.released:
            reason = "released"
        elif _known_dead(current, self.host):
            reason = "dead"
        elif current.expires_ts < time.time():
            reason = "expired"
        else:
            return None
        attempt = current.attempt + 1
        self._revision = await kv.update(self.key, self._record(attempt), last=entry.revision)
        self._won(attempt, started)
        return Taken(attempt, current.holder, reason)

    def _won(self, attempt: int, started: float) -> None:
        self._attempt = attempt
        self._valid_until = started + self.ttl_s
        self.lost.clear()

    async def hold(self, stop: asyncio.Event) -> None:
        """Renew the claim every third of its time to live until ``stop``; on losing it (a
        renewal refused, or none succeeded before it would expire) set :attr:`lost` and
        return."""
        every = self.ttl_s / 3
        while not stop.is_set():
            # Wake in time to give up before a successor may take it (failed renewals keep
            # it only while its time to live lasts).
            wait = max(0.0, min(every, self._valid_until - self._safety_s - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            if stop.is_set():
                return
            if not await self.renew():
                return

    async def renew(self) -> bool:
        """One revision-checked renewal; False (and :attr:`lost` set) if the claim is no
        longer ours. An error leaves it ours while its time to live lasts."""
        async with self._renewing:
            if self.lost.is_set():
                return False
            started = time.monotonic()
            try:
                # Bounded by what is left of the claim: a write stuck in a partition must not
                # outlast it (a successor may take the claim once it has expired).
                left = self._valid_until - self._safety_s - started
                if left <= 0:
                    raise TimeoutError("no time left to renew")
                kv = await self._bucket_kv()
                self._revision = await asyncio.wait_for(
                    kv.update(self.key, self._record(self._attempt), last=self._revision), left
                )
                self._valid_until = started + self.ttl_s
                return True
            except KeyWrongLastSequenceError:
                log.error("claim %s: taken by another agent; this one stops", self.key)
            except Exception as exc:
                if time.monotonic() < self._valid_until - self._safety_s:
                    log.warning("claim %s: renewal failed (%r); still held", self.key, exc)
                    return True
                log.error("claim %s: not renewed in time (%r); this one stops", self.key, exc)
            self.lost.set()
            return False

    async def finish(self) -> None:
        """Remove the claim once the phase has its outcome (revision-checked: only if still
        ours), so that a later run of the phase (a workflow reopened by a DLQ retry) starts
        again at attempt 1. Left in place if this fails: the next run then counts on."""
        with contextlib.suppress(Exception):  # best effort: see the docstring
            kv = await self._bucket_kv()
            await kv.delete(self.key, last=self._revision)

    async def release(self) -> None:
        """Hand the claim back without an outcome, so a successor takes it at once."""
        with contextlib.suppress(Exception):  # best effort: the claim expires anyway
            kv = await self._bucket_kv()
            await kv.update(self.key, self._record(self._attempt, released=True), self._revision)
