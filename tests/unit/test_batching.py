"""The call coalescer behind the SQS queue's batched deletes (``queues/batching.py``): batches
of at most ``max_batch``, each caller gets its own entry's outcome, a lone caller is sent at
once, late arrivals gather while a call is in flight, cancelled callers' entries are not sent.
The batch function here is a plain coroutine recording what it was given."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from jetreduce.queues.batching import Batcher

pytestmark = pytest.mark.anyio


class Recorder:
    """A batch function: records each batch, optionally holds calls until released, fails
    the entries named in ``bad`` (or the whole call when ``explode`` is set)."""

    def __init__(self, *, hold: bool = False, bad: frozenset[int] = frozenset()) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        self.bad = bad
        self.explode: Exception | None = None
        self.changed = asyncio.Condition()

    async def sent(self, n: int) -> None:
        """Until ``n`` batches went out (bounded)."""
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: len(self.batches) >= n), 1.0)

    async def __call__(self, entries: list[int]) -> Sequence[BaseException | None]:
        self.batches.append(list(entries))
        async with self.changed:
            self.changed.notify_all()
        await self.release.wait()
        if self.explode is not None:
            raise self.explode
        return [ValueError(f"bad {e}") if e in self.bad else None for e in entries]


async def test_a_lone_entry_goes_out_at_once() -> None:
    send = Recorder()
    batcher = Batcher(send, linger_s=10.0)  # the linger never applies with nothing in flight
    await asyncio.wait_for(batcher.submit(1), 1.0)
    assert send.batches == [[1]]


async def test_concurrent_entries_coalesce_into_batches_of_at_most_max_batch() -> None:
    send = Recorder(hold=True)
    batcher = Batcher(send, max_batch=10, linger_s=10.0, max_in_flight=4)
    first = asyncio.ensure_future(batcher.submit(0))  # in flight, held
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 26)]
    await asyncio.sleep(0.01)
    # 25 waiting behind the held call: two full batches went out, five wait for company.
    assert send.batches == [[0], list(range(1, 11)), list(range(11, 21))]
    assert batcher.waiting == 5
    send.release.set()
    await asyncio.wait_for(asyncio.gather(first, *rest), 1.0)
    assert send.batches[3] == list(range(21, 26))
    assert sorted(e for b in send.batches for e in b) == list(range(26))  # each sent once
    assert batcher.calls == 4


async def test_a_partial_batch_waits_at_most_the_linger() -> None:
    send = Recorder(hold=True)
    batcher = Batcher(send, linger_s=0.05, max_in_flight=2)
    stuck = asyncio.ensure_future(batcher.submit(0))  # held until the end
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    late = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
    await send.sent(2)
    waited = loop.time() - start
    assert send.batches == [[0], [1, 2]]
    assert 0.04 <= waited < 0.5, waited
    send.release.set()
    await asyncio.wait_for(asyncio.gather(stuck, *late), 1.0)


async def test_at_most_max_in_flight_calls() -> None:
    send = Recorder(hold=True)
    batcher = Batcher(send, max_batch=1, linger_s=0.0, max_in_flight=3)
    calls = [asyncio.ensure_future(batcher.submit(i)) for i in range(7)]
    await asyncio.sleep(0.02)
    assert len(send.batches) == 3 and batcher.in_flight == 3 and batcher.waiting == 4
    send.release.set()
    await asyncio.wait_for(asyncio.gather(*calls), 1.0)
    assert len(send.batches) == 7 and batcher.in_flight == 0


async def test_each_caller_gets_its_own_entrys_outcome() -> None:
    send = Recorder(hold=True, bad=frozenset({3, 5}))
    batcher = Batcher(send, linger_s=10.0)
    calls = [asyncio.ensure_future(batcher.submit(i)) for i in range(8)]
    await asyncio.sleep(0.01)
    send.release.set()
    outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 1.0)
    assert [i for i, o in enumerate(outcomes) if o is not None] == [3, 5]
    assert all(isinstance(outcomes[i], ValueError) for i in (3, 5))
    assert str(outcomes[5]) == "bad 5"


async def test_a_failed_call_fails_every_entry_of_its_batch_only() -> None:
    send = Recorder(hold=True)
    batcher = Batcher(send, linger_s=10.0)
    doomed = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
    await asyncio.sleep(0.01)  # [0] in flight, [1, 2] waiting
    send.explode = RuntimeError("endpoint gone")
    send.release.set()
    outcomes = await asyncio.wait_for(asyncio.gather(*doomed, return_exceptions=True), 1.0)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    send.explode = None
    await asyncio.wait_for(batcher.submit(9), 1.0)  # the next batch is unaffected
    assert send.batches == [[0], [1, 2], [9]]


async def test_a_cancelled_callers_entry_is_not_sent() -> None:
    send = Recorder(hold=True)
    batcher = Batcher(send, linger_s=10.0)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0)
    kept = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2, 3, 4)]
    await asyncio.sleep(0.01)
    kept[0].cancel()  # first in line
    kept[2].cancel()  # in the middle
    await asyncio.sleep(0)
    send.release.set()
    await asyncio.wait_for(asyncio.gather(first, kept[1], kept[3]), 1.0)
    assert send.batches == [[0], [2, 4]]
    assert kept[0].cancelled() and kept[2].cancelled()
    assert batcher.waiting == 0


async def test_a_caller_cancelled_in_flight_does_not_break_the_others() -> None:
    send = Recorder(hold=True, bad=frozenset({1}))
    batcher = Batcher(send, linger_s=0.01, eager=False)  # the three gather into one call
    calls = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
    await send.sent(1)
    assert send.batches == [[0, 1, 2]]
    calls[1].cancel()  # its entry is on its way: the failure is nobody's to collect
    send.release.set()
    await asyncio.wait_for(asyncio.gather(calls[0], calls[2]), 1.0)
    assert calls[1].cancelled()


async def test_without_eager_a_lone_entry_waits_the_linger() -> None:
    send = Recorder()
    batcher = Batcher(send, linger_s=0.05, eager=False)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.wait_for(batcher.submit(1), 1.0)
    assert loop.time() - start >= 0.04
    assert send.batches == [[1]]


async def test_drain_sends_what_waits_without_lingering() -> None:
    send = Recorder(hold=True)
    batcher = Batcher(send, linger_s=60.0, max_in_flight=1)
    calls = [asyncio.ensure_future(batcher.submit(i)) for i in range(4)]
    await asyncio.sleep(0.01)
    drained = asyncio.ensure_future(batcher.drain())
    await asyncio.sleep(0.01)
    assert not drained.done()  # the held call is still in flight
    send.release.set()
    await asyncio.wait_for(drained, 1.0)
    assert all(c.done() and c.exception() is None for c in calls)
    assert send.batches == [[0], [1, 2, 3]]


async def test_a_wrong_number_of_outcomes_fails_the_batch() -> None:
    async def short(entries: list[int]) -> list[BaseException | None]:
        return []

    batcher = Batcher(short, linger_s=10.0, max_in_flight=1)
    with pytest.raises(RuntimeError, match="outcomes"):
        await asyncio.wait_for(batcher.submit(1), 1.0)


def test_invalid_settings_are_refused() -> None:
    async def send(entries: list[int]) -> list[BaseException | None]:
        return [None] * len(entries)

    for kwargs in ({"max_batch": 0}, {"max_in_flight": 0}, {"linger_s": -1.0}):
        with pytest.raises(ValueError):
            Batcher(send, **kwargs)  # type: ignore[arg-type]
