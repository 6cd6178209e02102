"""The setup/reduce claim (runtime/claim.py) against the real nats-server: one holder at a
time, and a successor takes it only when released, known dead or expired; a holder that lost
it knows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.runtime.claim import Claim, Taken
from jetreduce.runtime.connection import connect
from jetreduce.runtime.settings import NatsSettings

pytestmark = pytest.mark.anyio


@pytest.fixture
async def js(nats_url: str, prefix: str) -> AsyncIterator[Any]:
    nc = await connect(NatsSettings(url=nats_url, prefix=prefix), forever=False)
    js = nc.jetstream()
    await declare(js, Subjects(prefix))
    try:
        yield js
    finally:
        await nc.close()


def claim(js: Any, prefix: str, **kw: Any) -> Claim:
    s = Subjects(prefix)
    return Claim(js, s.claims_bucket, s.claim_key("reduce", "wf"), **kw)


async def undecided() -> bool:
    return False


async def test_one_holder_at_a_time_and_release(js: Any, prefix: str) -> None:
    first = claim(js, prefix)
    assert await first.acquire(undecided) == Taken(1)
    second = claim(js, prefix, host="elsewhere")
    waiting = asyncio.ensure_future(second.acquire(undecided, poll_s=0.05))
    await asyncio.sleep(0.5)
    assert not waiting.done(), "a live, unexpired claim was taken"
    await first.release()
    taken = await asyncio.wait_for(waiting, 5)
    assert taken == Taken(2, first.holder, "released")
    assert not await first.renew() and first.lost.is_set()


async def test_expired_claim_is_taken_and_the_old_holder_is_fenced(js: Any, prefix: str) -> None:
    first = claim(js, prefix, ttl_s=1.0)
    assert await first.acquire(undecided) == Taken(1)
    # Another host cannot see whether the holder lives: it waits for the expiry.
    second = claim(js, prefix, host="elsewhere", ttl_s=1.0)
    taken = await asyncio.wait_for(second.acquire(undecided, poll_s=0.05), 5)
    assert taken == Taken(2, first.holder, "expired")
    assert not await first.renew(), "a holder whose claim was taken may not go on"


async def test_known_dead_holder_is_replaced_at_once(js: Any, prefix: str) -> None:
    proc = await asyncio.create_subprocess_exec("true")
    await proc.wait()
    dead = claim(js, prefix, pid=proc.pid)
    assert await dead.acquire(undecided) == Taken(1)
    taken = await asyncio.wait_for(claim(js, prefix).acquire(undecided), 2)
    assert taken == Taken(2, dead.holder, "dead")


async def test_nothing_to_do_once_decided(js: Any, prefix: str) -> None:
    first = claim(js, prefix)
    await first.acquire(undecided)

    async def decided() -> bool:
        return True

    assert await claim(js, prefix, host="elsewhere").acquire(decided) is None
    await first.finish()  # after an outcome: a later run starts at attempt 1 again
    assert await claim(js, prefix, host="elsewhere").acquire(undecided) == Taken(1)
