"""The local backend's restart rules (launcher/local.py): an agent killed from outside is
always replaced and never uses up its budget; an agent that fails by itself, quickly, again
and again, is given up after ``max_restarts``.

The agents here are plain shell processes (the backend's ``command``): what is under test is
the supervision of real child processes, not the worker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import pytest

from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.records import StoredSpec
from jetreduce.lang.parse import parse_workflow
from jetreduce.launcher.local import LocalBackend
from jetreduce.runtime.settings import NatsSettings
from support import wait_for

pytestmark = pytest.mark.anyio

Exit = tuple[int, int, bool, int]
"""(agent index, exit code, restarted, remaining) as reported to the launcher."""


def spec(workdir: Path) -> StoredSpec:
    parsed = parse_workflow(
        "name: t\nmap:\n  input: x.json\n  agent_template:\n    - shell: 'true'\n"
    )
    return StoredSpec(workflow=parsed.workflow, options=SubmitOptions(workdir=str(workdir)))


def backend(command: tuple[str, ...], exits: list[Exit], max_restarts: int) -> LocalBackend:
    async def on_exit(wf: str, phase: str, index: int, code: int, restart: bool, left: int) -> None:
        exits.append((index, code, restart, left))

    return LocalBackend(
        NatsSettings(url="nats://127.0.0.1:1"),
        max_processes=1,
        max_restarts=max_restarts,
        on_exit=on_exit,
        command=command,
    )


def agent_pid(b: LocalBackend) -> int | None:
    (run,) = b._agents[("wf", "map")]
    proc = run.proc
    return proc.pid if proc is not None and proc.returncode is None else None


async def test_killed_agents_are_replaced_past_the_budget(tmp_path: Path) -> None:
    exits: list[Exit] = []
    b = backend(("sleep", "60"), exits, max_restarts=1)
    try:
        assert await b.launch("wf", "map", [1], spec(tmp_path)) == 1
        for kill in range(4):  # four quick kills, against a budget of one restart
            pid = await wait_for(lambda: agent_pid(b), timeout_s=10)
            os.kill(pid, signal.SIGKILL if kill % 2 else signal.SIGTERM)
            await wait_for(lambda n=kill: len(exits) > n, timeout_s=10)
        assert exits == [
            (0, -signal.SIGTERM, True, 1),
            (0, -signal.SIGKILL, True, 1),
            (0, -signal.SIGTERM, True, 1),
            (0, -signal.SIGKILL, True, 1),
        ]
        assert await wait_for(lambda: agent_pid(b), timeout_s=10)
        assert b.running("wf", "map")
    finally:
        await b.stop_all(grace_s=5)
    assert not b.running("wf", "map")


async def test_an_agent_that_cannot_start_is_given_up(tmp_path: Path) -> None:
    exits: list[Exit] = []
    b = backend(("sh", "-c", "exit 3"), exits, max_restarts=2)
    try:
        await b.launch("wf", "map", [1], spec(tmp_path))
        # restarts after 0.5 s and 1 s, then the third failure in a row is the last
        await wait_for(lambda: len(exits) == 3, timeout_s=15)
        await wait_for(lambda: not b.running("wf", "map"), timeout_s=5)
        assert exits == [(0, 3, True, 1), (0, 3, True, 1), (0, 3, False, 0)]
    finally:
        await b.stop_all(grace_s=5)


async def test_an_agent_killed_at_every_start_ends_too(tmp_path: Path) -> None:
    """Killed from outside within seconds of every start (an OOM at load): replaced
    ``max_restarts * QUICK_KILLS_PER_RESTART`` times, then given up, not forever."""
    exits: list[Exit] = []
    b = backend(("sh", "-c", "kill -KILL $$"), exits, max_restarts=1)
    try:
        await b.launch("wf", "map", [1], spec(tmp_path))
        await wait_for(lambda: not b.running("wf", "map"), timeout_s=30)
    finally:
        await b.stop_all(grace_s=5)
    assert [e[2] for e in exits] == [True] * 4 + [False]
    assert {e[1] for e in exits} == {-signal.SIGKILL}


async def test_a_crash_by_its_own_signal_uses_the_crash_budget(tmp_path: Path) -> None:
    exits: list[Exit] = []
    b = backend(("sh", "-c", "kill -SEGV $$"), exits, max_restarts=1)
    try:
        await b.launch("wf", "map", [1], spec(tmp_path))
        await wait_for(lambda: not b.running("wf", "map"), timeout_s=15)
    finally:
        await b.stop_all(grace_s=5)
    assert exits == [(0, -signal.SIGSEGV, True, 1), (0, -signal.SIGSEGV, False, 0)]


async def test_a_stop_cancelled_midway_leaves_its_agents_to_stop_all(tmp_path: Path) -> None:
    """The launcher's term can end while one of its handlers is inside ``stop(wf)``, which
    is then cancelled: the agents it had taken out of the running set must still be
    stopped by ``stop_all`` (fresh clone run 7: a supervising task and its agent outlived
    the services)."""
    exits: list[Exit] = []
    # An agent that ignores SIGTERM: stop(wf) waits its whole grace for it. It says when it
    # does (a SIGTERM before the trap would end it: fresh clone 13).
    ready = tmp_path / "trapped"
    b = backend(("sh", "-c", f"trap '' TERM; touch {ready}; sleep 60"), exits, max_restarts=1)
    assert await b.launch("wf", "map", [1], spec(tmp_path)) == 1
    pid = await wait_for(lambda: agent_pid(b), timeout_s=10)
    await wait_for(ready.exists, timeout_s=10)
    (run,) = b._agents[("wf", "map")]
    stopping = asyncio.create_task(b.stop("wf", grace_s=30))
    await wait_for(lambda: run.stopping, timeout_s=5)
    stopping.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await stopping
    assert run.task is not None and not run.task.done()
    await b.stop_all(grace_s=0.5)
    assert run.task.done()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


AGENT_WITH_A_CHILD = """
import os, signal, subprocess, sys, time
marker = sys.argv[1]
child = subprocess.Popen([sys.executable, "-c", '''
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: (open(sys.argv[1], "w").write("TERM"), sys.exit(0)))
time.sleep(60)
''', marker])  # left in the agent's process group, as a child just forked is
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
open(marker + ".ready", "w").close()
time.sleep(60)
"""


async def test_a_stop_asks_the_agent_alone_not_what_is_still_in_its_group(tmp_path: Path) -> None:
    """A stop's SIGTERM goes to the agent, which stops its steps itself. Sent to the agent's
    process group it also reached a child the agent had just forked, before the child moved
    to a group of its own: that child died of it as it exec'd (a map agent's `git branch -D`
    as it cleaned up on map.complete, fresh clone 28). A child kept in the group stands for
    that moment here: it must not get the SIGTERM."""
    marker = tmp_path / "child-got-term"
    script = tmp_path / "agent.py"
    script.write_text(AGENT_WITH_A_CHILD)
    exits: list[Exit] = []
    b = backend((sys.executable, str(script), str(marker)), exits, max_restarts=0)
    try:
        assert await b.launch("wf", "map", [1], spec(tmp_path)) == 1
        await wait_for(lambda: Path(f"{marker}.ready").exists(), timeout_s=20)
        await b.stop("wf", "map", grace_s=10)
    finally:
        await b.stop_all(grace_s=5)
    assert not marker.exists()
