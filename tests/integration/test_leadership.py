"""The leader's lease (runtime/leadership.py) against the real nats-server: one leader at a
time; a standby takes over at once when the leader releases the lease, and after its expiry
(bounded) when the leader vanished; a leader that cannot renew (a frozen process, SIGSTOP)
stops acting before its successor starts, and stands by once it runs again."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.runtime.connection import connect
from jetreduce.runtime.leadership import Leadership
from jetreduce.runtime.orphans import die_with_parent
from jetreduce.runtime.settings import NatsSettings
from support import env_without_jetreduce, wait_for

pytestmark = pytest.mark.anyio

KEY = "leader.test"


@pytest.fixture
async def js(nats_url: str, prefix: str) -> AsyncIterator[Any]:
    nc = await connect(NatsSettings(url=nats_url, prefix=prefix), forever=False)
    js = nc.jetstream()
    await declare(js, Subjects(prefix))
    try:
        yield js
    finally:
        await nc.close()


def lease(js: Any, prefix: str, host: str, ttl_s: float = 10.0) -> Leadership:
    """A replica on ``host`` (distinct hosts: a standby cannot see the leader's process and
    must wait for the lease to expire, as pods on different nodes do)."""
    return Leadership(
        js,
        Subjects(prefix).claims_bucket,
        KEY,
        name="test",
        ttl_s=ttl_s,
        poll_s=0.05,
        holder=f"{host}/replica",
        host=host,
    )


class Actor:
    """A ``lead`` coroutine that acts (records the time) every 20 ms while it may."""

    def __init__(self, leadership: Leadership, acts: list[tuple[str, float]]) -> None:
        self.leadership = leadership
        self.acts = acts

    async def __call__(self, term: asyncio.Event) -> None:
        while not term.is_set():
            if self.leadership.may_act():
                self.acts.append((self.leadership.holder, time.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(term.wait(), 0.02)


async def test_one_leader_at_a_time_and_release_hands_over_at_once(js: Any, prefix: str) -> None:
    acts: list[tuple[str, float]] = []
    replicas = [lease(js, prefix, host) for host in ("a", "b", "c")]
    stops = [asyncio.Event() for _ in replicas]
    tasks = [
        asyncio.create_task(r.run(stop, Actor(r, acts)))
        for r, stop in zip(replicas, stops, strict=True)
    ]
    try:
        await wait_for(lambda: any(r.leading for r in replicas), 5)
        await asyncio.sleep(0.5)  # let all three compete for a while
        assert sum(r.leading for r in replicas) == 1
        assert {holder for holder, _ in acts} == {next(r for r in replicas if r.leading).holder}

        # A leader stopping (SIGTERM) releases the lease: a standby leads at once, not after
        # the 10 s time to live.
        first = next(i for i, r in enumerate(replicas) if r.leading)
        stopped_at = time.monotonic()
        stops[first].set()
        await asyncio.wait_for(tasks[first], 5)
        await wait_for(lambda: any(r.leading for r in replicas), 3)
        assert time.monotonic() - stopped_at < 2.0
        assert sum(r.leading for r in replicas) == 1
        # Acts by one holder at a time: the old leader's last act precedes the new one's first.
        await wait_for(lambda: len({h for h, _ in acts}) == 2, 3)
        old, new = replicas[first].holder, next(r for r in replicas if r.leading).holder
        by_holder = {h: [at for hh, at in acts if hh == h] for h in (old, new)}
        assert max(by_holder[old]) < min(by_holder[new])
    finally:
        for stop in stops:
            stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)


async def test_a_vanished_leader_is_replaced_after_the_lease_expires(js: Any, prefix: str) -> None:
    ttl = 2.0
    gone, standby = lease(js, prefix, "gone", ttl), lease(js, prefix, "standby", ttl)
    stop = asyncio.Event()
    acts: list[tuple[str, float]] = []
    vanished = asyncio.create_task(gone.run(stop, Actor(gone, acts)))
    await wait_for(lambda: gone.leading, 5)
    waiting = asyncio.create_task(standby.run(stop, Actor(standby, acts)))
    try:
        await asyncio.sleep(0.3)
        assert not standby.leading
        # The leader vanishes without a word (its host is gone): no release, no renewal.
        vanished.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await vanished
        gone_at = time.monotonic()
        await wait_for(lambda: standby.leading, ttl + 3)
        took = time.monotonic() - gone_at
        # Bounded by the time to live (plus a poll); and not before the lease could expire
        # (the last renewal was at most a third of it before the leader vanished).
        assert ttl / 3 <= took <= ttl + 1.0, took
    finally:
        stop.set()
        await asyncio.wait_for(waiting, 10)


PAUSED_LEADER = """
import asyncio, logging, sys, time
from jetreduce.runtime.connection import connect
from jetreduce.runtime.leadership import Leadership
from jetreduce.runtime.settings import NatsSettings
from jetreduce.contract.subjects import Subjects

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
url, prefix, key, acts = sys.argv[1:5]

async def main() -> None:
    nc = await connect(NatsSettings(url=url, prefix=prefix), forever=False)
    leadership = Leadership(
        nc.jetstream(), Subjects(prefix).claims_bucket, key, name="paused", ttl_s=2.0,
        poll_s=0.05,
    )

    async def lead(term: asyncio.Event) -> None:
        with open(acts, "a") as out:
            while not term.is_set():
                if leadership.may_act():
                    out.write(f"{time.time()}\\n")
                    out.flush()
                await asyncio.sleep(0.02)

    await leadership.run(asyncio.Event(), lead)

asyncio.run(main())
"""


async def test_a_paused_leader_stops_acting_before_its_successor_starts(
    js: Any, nats_url: str, prefix: str, tmp_path: Path
) -> None:
    """SIGSTOP the leading process for longer than its lease lasts: the successor (another
    host) takes over once it expired; resumed, the old leader does not act again (its clock
    says its time ran out, whatever its renewing task has not yet noticed) and stands by."""
    script, acts = tmp_path / "paused.py", tmp_path / "acts"
    script.write_text(PAUSED_LEADER)
    acts.touch()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        nats_url,
        prefix,
        KEY,
        str(acts),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env_without_jetreduce(),
        preexec_fn=die_with_parent,
    )
    output: list[str] = []

    async def read() -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            output.append(line.decode().rstrip())

    reader = asyncio.create_task(read())
    successor = lease(js, prefix, "successor", ttl_s=2.0)
    successor_acts: list[tuple[str, float]] = []
    stop = asyncio.Event()
    standing: asyncio.Task[None] | None = None
    try:
        await wait_for(lambda: acts.read_text().count("\n") >= 5, 20)
        standing = asyncio.create_task(successor.run(stop, Actor(successor, successor_acts)))
        os.kill(proc.pid, signal.SIGSTOP)
        paused_at = time.time()
        await wait_for(lambda: successor.leading, 5)
        took_over = time.time()
        assert took_over - paused_at <= 3.0
        await wait_for(lambda: successor_acts, 2)
        await asyncio.sleep(0.5)
        os.kill(proc.pid, signal.SIGCONT)
        await wait_for(lambda: any("standing by" in line for line in output), 10)
        assert any("stepping down" in line for line in output), output

        last_old = max(float(line) for line in acts.read_text().split())
        first_new = min(at for _, at in successor_acts)
        assert last_old < first_new, (last_old, first_new)
        assert last_old <= paused_at + 0.1  # nothing after it was resumed
        assert successor.leading, "the resumed process took the lease back"
    finally:
        stop.set()
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        await asyncio.wait_for(proc.wait(), 10)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        if standing is not None:
            await asyncio.wait_for(standing, 10)
