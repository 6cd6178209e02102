"""What agents leave behind in their sessions is swept in shared passes over /proc
(``runtime/orphans.SessionSweeper``): one pass per agent exit cost the launcher's process a
second of CPU when 200 agents left at ``map.complete`` (issue 18). Real processes."""

from __future__ import annotations

import asyncio
import os
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


@pytest.fixture
def sessions() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Four session leaders, each with two children that would sleep for a minute."""
    procs = [
        subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
        for _ in range(4)
    ]
    yield procs
    for proc in procs:
        for pid in members(proc.pid):
            os.kill(pid, 9)
        proc.wait(10)


async def _started(procs: list[subprocess.Popen[bytes]]) -> None:
    await wait_for(lambda: all(len(members(p.pid)) == 3 for p in procs), 10)


async def test_sessions_ending_together_are_swept_in_one_pass(
    sessions: list[subprocess.Popen[bytes]],
) -> None:
    await _started(sessions)
    sweeper = SessionSweeper()
    await asyncio.gather(*(sweeper.sweep(p.pid, leader=False) for p in sessions))
    assert sweeper.passes == 1
    # The children die (a SIGKILL lands a moment after kill() returns); the leaders are
    # left (leader=False): each is still there until its `wait` returns.
    await wait_for(lambda: all(members(p.pid) <= {p.pid} for p in sessions), 10)
    # Its children killed, each leader's `wait` returns: it ends by itself.
    for proc in sessions:
        assert await asyncio.to_thread(proc.wait, 10) == 0


async def test_a_session_ending_during_a_pass_is_swept_by_the_next(
    sessions: list[subprocess.Popen[bytes]],
) -> None:
    await _started(sessions)
    sweeper = SessionSweeper()
    first = asyncio.ensure_future(sweeper.sweep(sessions[0].pid))
    await asyncio.sleep(0)  # the first pass is under way
    later = [sweeper.sweep(p.pid) for p in sessions[1:]]
    await asyncio.gather(first, *later)
    assert sweeper.passes == 2
    await wait_for(lambda: all(not members(p.pid) for p in sessions), 10)  # leaders too


async def test_a_cancelled_caller_does_not_stop_its_pass(
    sessions: list[subprocess.Popen[bytes]],
) -> None:
    await _started(sessions)
    sweeper = SessionSweeper()
    waiting = asyncio.ensure_future(sweeper.sweep(sessions[0].pid))
    await asyncio.sleep(0)
    waiting.cancel()
    await wait_for(lambda: not members(sessions[0].pid), 10)
    assert len(members(sessions[1].pid)) == 3  # only the session asked for
