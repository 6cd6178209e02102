"""Agents wait for their step processes through pidfds on Python 3.11 (cli/agent_main.py),
not with a thread per step: that thread's start and wait were ~40 % of the agents' samples
in the shell load test."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12+ chooses pidfds by itself")
def test_an_agent_waits_for_its_steps_through_pidfds() -> None:
    code = (
        "import asyncio, warnings\n"
        "from jetreduce.cli.agent_main import _watch_steps_by_pidfd\n"
        "_watch_steps_by_pidfd()\n"
        "watcher = asyncio.get_event_loop_policy().get_child_watcher()\n"
        "assert isinstance(watcher, asyncio.PidfdChildWatcher), watcher\n"
        "async def step():\n"
        "    p = await asyncio.create_subprocess_exec('sh', '-c', 'exit 7')\n"
        "    return await p.wait()\n"
        "assert asyncio.run(step()) == 7\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
