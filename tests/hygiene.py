"""Leak checks run around every test: a test that leaves a process (agent, server, service,
step) or an asyncio task running fails, and what it left is killed so that the next test
starts clean.

Processes are found two ways, because either alone misses some: the descendants of this
pytest process (a child that kept running), and every process that carries this run's
``JRTEST_LEAK_TOKEN`` in its environment (an orphan whose parent was killed is
re-parented to init, but it inherited the token). Under ``pytest-xdist`` each worker sets a
token of its own, so workers never see each other's processes.

Tasks: the anyio pytest plugin runs each async test in an ``asyncio.Runner``, whose
``close()`` silently cancels whatever is still pending. The wrapper below records those
tasks first; the per-test check fails the test that left them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TOKEN_VAR = "JRTEST_LEAK_TOKEN"  # not JETREDUCE_*: tests strip those from child envs
# One per process: xdist workers import this module themselves and override the inherited one.
TOKEN = secrets.token_hex(8)
os.environ[TOKEN_VAR] = TOKEN
_MARK = f"{TOKEN_VAR}={TOKEN}".encode()

# How long a process may take to exit after the test's teardown signalled it (agents finish
# their current write, servers flush): a bound, not a sleep; the check returns at once when
# everything is gone.
GRACE_S = 10.0

ProcKey = tuple[int, int]  # (pid, start time in clock ticks): pids are reused


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of ``pid``, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after the last ")".
    fields = raw[raw.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1]), int(fields[19])


def _carries_token(pid: int) -> bool:
    try:
        return _MARK in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def forks() -> int:
    """Processes created on this machine since boot: while it stands still, nothing new
    can be running, and the scan below (milliseconds) is skipped. Most tests fork nothing."""
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"processes "):
                return int(line.split()[1])
    return -1


def ours() -> dict[ProcKey, int]:
    """Live processes of this pytest process: descendants and token carriers, by key."""
    me = os.getpid()
    table: dict[int, tuple[str, int, int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (pid := int(entry.name)) != me:
            stat = _stat(pid)
            if stat is not None:
                table[pid] = stat
    found: dict[ProcKey, int] = {}
    for pid, (state, _ppid, start) in table.items():
        if state in ("Z", "X"):
            continue
        ancestor, hops = pid, 0
        descendant = False
        while ancestor in table and hops < 64:
            ancestor = table[ancestor][1]
            hops += 1
            if ancestor == me:
                descendant = True
                break
        if descendant or _carries_token(pid):
            found[(pid, start)] = pid
    return found


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:160]


_snapshot: tuple[int, dict[ProcKey, int]] = (-2, {})


def snapshot(fresh: bool = False) -> tuple[int, dict[ProcKey, int]]:
    """(fork count, our processes), scanned again only if anything forked since the last
    (nothing new can have started then) or ``fresh`` (to see what has exited since)."""
    global _snapshot
    count = forks()
    if fresh or count != _snapshot[0]:
        _snapshot = (count, ours())
    return _snapshot


def leaked_since(
    before: tuple[int, dict[ProcKey, int]], grace_s: float = GRACE_S
) -> list[str]:
    """Processes alive now that were not before, after waiting (bounded) for them to exit;
    each one found is SIGKILLed and described."""
    if forks() == before[0]:
        return []
    deadline = time.monotonic() + grace_s
    while True:
        new = {
            key: pid
            for key, pid in snapshot(fresh=True)[1].items()
            if key not in before[1] and not _belongs_to_long_lived(pid)
        }
        if not new or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    described = [f"pid {pid}: {_cmdline(pid)}" for pid in new.values()]
    for pid in new.values():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return described


_long_lived: set[ProcKey] = set()
"""Processes that fixtures of a wider scope than the test started (a session's redis-server,
started lazily by the first test that asks): theirs to stop, not a leak of that test."""


def _belongs_to_long_lived(pid: int) -> bool:
    """``pid`` is long-lived, or a descendant of one (a kept services process's agents and
    helpers are its business: it stops them)."""
    hops = 0
    while pid > 1 and hops < 64:
        stat = _stat(pid)
        if stat is None:
            return False
        if (pid, stat[2]) in _long_lived:
            return True
        pid, hops = stat[1], hops + 1
    return False


def keep(pid: int) -> None:
    """Exempt ``pid`` from the check: a long-lived server that a test restarted."""
    stat = _stat(pid)
    if stat is not None:
        _long_lived.add((pid, stat[2]))


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any]) -> Iterator[None]:
    if fixturedef.scope == "function":
        yield
        return
    before = snapshot()[1]
    yield
    _long_lived.update(key for key in snapshot()[1] if key not in before)


# --- asyncio tasks ------------------------------------------------------------------------

_leaked_tasks: list[str] = []
_original_close = asyncio.Runner.close


def _is_runner_machinery(task: asyncio.Task[Any]) -> bool:
    name = getattr(task.get_coro(), "__qualname__", "")
    return "TestRunner." in name


def _recording_close(self: asyncio.Runner) -> None:
    loop = getattr(self, "_loop", None)
    if loop is not None and not loop.is_closed():
        for task in asyncio.all_tasks(loop):
            # A task already told to cancel (a client's close() does that to its readers)
            # ends at the loop's next turn: not a leak.
            if not task.done() and not task.cancelling() and not _is_runner_machinery(task):
                _leaked_tasks.append(repr(task)[:300])
    _original_close(self)


asyncio.Runner.close = _recording_close  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails the test that leaves a process or an asyncio task running (after its teardown).

    ``@pytest.mark.leaks_ok`` exempts a test that hands a process to a later one on purpose
    (none does today)."""
    if request.node.get_closest_marker("leaks_ok"):
        yield
        return
    before = snapshot()
    del _leaked_tasks[:]
    yield
    # This fixture is set up before the test's function-scoped fixtures, so it is torn down
    # after them: what they stop is gone by now.
    processes = leaked_since(before)
    tasks = list(_leaked_tasks)
    del _leaked_tasks[:]
    problems = [f"process left running: {p}" for p in processes]
    problems += [f"asyncio task left running: {t}" for t in tasks]
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
