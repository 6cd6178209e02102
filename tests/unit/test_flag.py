"""``runtime/flag``: waiting on several events without a task per event (issue 18: tasks
made for every wait were a good share of a one-slot agent's event-loop passes per item)."""

from __future__ import annotations

import asyncio

import pytest

from jetreduce.runtime.flag import Flag, wait_first

pytestmark = pytest.mark.anyio


async def test_a_flag_resolves_its_futures_when_set_and_at_once_when_already_set() -> None:
    flag = Flag()
    pending = flag.future()
    assert not pending.done()
    flag.set()
    assert pending.done() and flag.is_set()
    assert flag.future().done()  # already set
    flag.clear()
    assert not flag.future().done() and not flag.is_set()


async def test_a_cancelled_future_is_dropped() -> None:
    flag = Flag()
    for _ in range(100):
        flag.future().cancel()
    await asyncio.sleep(0)  # done callbacks run on the next pass
    assert not flag._futures


async def test_wait_first_returns_on_a_flag_a_task_or_the_timeout_without_tasks_of_its_own() -> (
    None
):
    a, b = Flag(), Flag()
    loop = asyncio.get_running_loop()

    waiting = asyncio.ensure_future(wait_first([a, b], timeout_s=30))
    await asyncio.sleep(0)
    tasks = len(asyncio.all_tasks())
    b.set()
    await asyncio.wait_for(waiting, 5)
    assert len(asyncio.all_tasks()) == tasks - 1  # only `waiting` itself went away
    assert not a._futures and not b._futures  # nothing left registered

    other: asyncio.Future[None] = loop.create_future()
    loop.call_soon(other.set_result, None)
    await asyncio.wait_for(wait_first([a], [other], timeout_s=30), 5)
    assert other.done() and not a.is_set()

    started = loop.time()
    await wait_first([a], timeout_s=0.05)
    assert loop.time() - started >= 0.04 and not a.is_set()
