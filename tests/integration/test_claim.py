"""The setup/reduce claim (runtime/claim.py) against the real nats-server: one holder at a
time, and a successor takes it only when released, known dead or expired; a holder that lost
it knows. Then a phase run under it (worker/claimed.py): a holder whose claim is taken stops
its steps and publishes nothing; SIGTERM lets the steps finish within the grace period, past
it they stop and the claim is released for the next attempt; a phase decided meanwhile is not
run again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.runtime.claim import Claim, Taken
from jetreduce.runtime.connection import connect
from jetreduce.runtime.settings import NatsSettings
from jetreduce.worker.claimed import EXIT_SIGTERM, run_claimed

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


class Steps:
    """A phase body that runs ``seconds`` and records what happened to it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = asyncio.Event()
        self.finished = False
        self.cancelled = False

    async def __call__(self, taken: Taken) -> int:
        self.started.set()
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        self.finished = True
        return 0


async def nothing(_taken: Taken) -> None:
    return None


async def run(holder: Claim, steps: Steps, stop: asyncio.Event, grace_s: float = 5.0) -> int:
    return await run_claimed(
        holder,
        decided=undecided,
        body=steps,
        taken_hook=nothing,
        stop=stop,
        abort=asyncio.Event(),
        grace_s=grace_s,
    )


async def test_a_holder_whose_claim_is_taken_stops_its_steps(js: Any, prefix: str) -> None:
    holder = claim(js, prefix, ttl_s=0.9)  # renewed every 0.3 s
    steps = Steps(30)
    running = asyncio.ensure_future(run(holder, steps, asyncio.Event()))
    await asyncio.wait_for(steps.started.wait(), 5)
    # A successor elsewhere takes it (as after an expiry): the next renewal is refused.
    kv = await js.key_value(Subjects(prefix).claims_bucket)
    entry = await kv.get(holder.key)
    await kv.update(
        holder.key,
        b'{"holder":"x","host":"x","pid":1,"attempt":2,"expires_ts":0}',
        last=entry.revision,
    )
    assert await asyncio.wait_for(running, 5) == EXIT_SIGTERM
    assert steps.cancelled and not steps.finished


async def test_sigterm_lets_steps_finish_within_the_grace_period(js: Any, prefix: str) -> None:
    stop = asyncio.Event()
    steps = Steps(0.5)
    running = asyncio.ensure_future(run(claim(js, prefix), steps, stop))
    await asyncio.wait_for(steps.started.wait(), 5)
    stop.set()
    assert await asyncio.wait_for(running, 5) == 0
    assert steps.finished
    # Finished with an outcome: the claim is gone, a later run is attempt 1 again.
    assert await claim(js, prefix, host="elsewhere").acquire(undecided) == Taken(1)


async def test_past_the_grace_period_steps_stop_and_the_claim_is_released(
    js: Any, prefix: str
) -> None:
    stop = asyncio.Event()
    steps = Steps(30)
    holder = claim(js, prefix)
    running = asyncio.ensure_future(run(holder, steps, stop, grace_s=0.3))
    await asyncio.wait_for(steps.started.wait(), 5)
    stop.set()
    assert await asyncio.wait_for(running, 5) == EXIT_SIGTERM
    assert steps.cancelled
    taken = await asyncio.wait_for(claim(js, prefix, host="elsewhere").acquire(undecided), 2)
    assert taken == Taken(2, holder.holder, "released")


async def test_a_phase_decided_while_waiting_is_not_run(js: Any, prefix: str) -> None:
    first = claim(js, prefix)
    await first.acquire(undecided)
    outcome = asyncio.Event()

    async def decided() -> bool:
        return outcome.is_set()

    steps = Steps(0)
    waiting = asyncio.ensure_future(
        run_claimed(
            claim(js, prefix, host="elsewhere"),
            decided=decided,
            body=steps,
            taken_hook=nothing,
            stop=asyncio.Event(),
            abort=asyncio.Event(),
            grace_s=1,
        )
    )
    await asyncio.sleep(0.3)
    outcome.set()  # the holder published its outcome
    await first.finish()
    assert await asyncio.wait_for(waiting, 5) == 0
    assert not steps.started.is_set()


async def test_renewals_at_once_do_not_fence_their_own_holder(js: Any, prefix: str) -> None:
    """The holding loop and a check before an outcome may renew at the same moment: both
    must succeed (sent with one expected revision, the second would be refused)."""
    holder = claim(js, prefix)
    assert await holder.acquire(undecided) == Taken(1)
    assert await asyncio.gather(*(holder.renew() for _ in range(4))) == [True] * 4
    assert not holder.lost.is_set()
    other = claim(js, prefix, host="elsewhere")
    assert await asyncio.wait_for(other._try_take(), 5) is None  # still held


async def test_a_holder_gives_up_before_a_successor_may_take_over(js: Any, prefix: str) -> None:
    """Renewals that cannot get through stop the holder before its claim expires."""
    holder = claim(js, prefix, ttl_s=2.0)
    assert await holder.acquire(undecided) == Taken(1)
    holder._valid_until = time.monotonic() - 1  # its time to live is up
    assert not await holder.renew() and holder.lost.is_set()
