"""What agents leave behind in their sessions is swept in shared passes over /proc
(``runtime/orphans.SessionSweeper``): one pass per agent exit cost the launcher's process a
second of CPU when 200 agents left at ``map.complete`` (issue 18). Real processes: each
session's leader (the agent) has ended and been reaped, its two children (steps) live on."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from jetreduce.runtime.orphans import SessionSweeper
from support import wait_for

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc"),
]


def members(sid: int) -> set[int]:
    """Processes of session ``sid`` (zombies aside: they are dead already)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if fields[3] == str(sid) and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def _kill(sid: int) -> None:
    for pid in members(sid):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def ended() -> Iterator[list[int]]:
    """Four sessions whose leader ended (reaped) and left two children that would sleep
    for a minute: what an agent killed mid-item leaves."""
    sids = []
    for _ in range(4):
        leader = subprocess.Popen(
            ["sh", "-c", "sleep 60 & sleep 60 & exit 0"], start_new_session=True
        )
        assert leader.wait(10) == 0
        sids.append(leader.pid)
    yield sids
    for sid in sids:
        _kill(sid)


async def _left(sids: list[int]) -> None:
    await wait_for(lambda: all(len(members(sid)) == 2 for sid in sids), 10)


async def test_sessions_ending_together_are_swept_in_one_pass(ended: list[int]) -> None:
    await _left(ended)
    sweeper = SessionSweeper()
    await asyncio.gather(*(sweeper.sweep(sid, leader=False) for sid in ended))
    assert sweeper.passes == 1
    # A SIGKILL lands a moment after kill() returns.
    await wait_for(lambda: all(not members(sid) for sid in ended), 10)


async def test_a_session_ending_during_a_pass_is_swept_by_the_next(ended: list[int]) -> None:
    await _left(ended)
    sweeper = SessionSweeper()
    first = asyncio.ensure_future(sweeper.sweep(ended[0], leader=False))
    await asyncio.sleep(0)  # the first pass is under way
    later = [sweeper.sweep(sid, leader=False) for sid in ended[1:]]
    await asyncio.gather(first, *later)
    assert sweeper.passes == 2
    await wait_for(lambda: all(not members(sid) for sid in ended), 10)


async def test_a_cancelled_caller_does_not_stop_its_pass(ended: list[int]) -> None:
    await _left(ended)
    sweeper = SessionSweeper()
    waiting = asyncio.ensure_future(sweeper.sweep(ended[0], leader=False))
    await asyncio.sleep(0)
    waiting.cancel()
    await wait_for(lambda: not members(ended[0]), 10)
    assert len(members(ended[1])) == 2  # only the session asked for


@pytest.fixture
def live() -> Iterator[int]:
    """A session whose leader runs, with two children."""
    leader = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
    yield leader.pid
    _kill(leader.pid)
    leader.wait(10)


async def test_a_session_id_in_use_again_is_left_alone(live: int) -> None:
    """An ended agent's id may go to a new process once nothing of its session is left;
    if that process leads a session of its own (another agent), the sweep must not kill its
    steps. A live leader stands for it here."""
    await wait_for(lambda: len(members(live)) == 3, 10)
    sweeper = SessionSweeper()
    await sweeper.sweep(live, leader=False)
    assert sweeper.passes == 1
    assert len(members(live)) == 3
