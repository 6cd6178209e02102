"""The leak check of every test (tests/hygiene.py) finds what a test leaves running."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import hygiene


def test_a_child_left_running_is_reported_and_killed() -> None:
    before = hygiene.snapshot()
    child = subprocess.Popen(["sleep", "30"])
    try:
        leaked = hygiene.leaked_since(before, grace_s=0.2)
        assert len(leaked) == 1 and f"pid {child.pid}: sleep 30" in leaked[0]
        assert child.wait(5) == -9  # killed by the check
    finally:
        child.kill()
        child.wait()


def test_a_child_that_exits_in_time_is_not_a_leak() -> None:
    before = hygiene.snapshot()
    child = subprocess.Popen(["sleep", "0.1"])
    assert hygiene.leaked_since(before, grace_s=5) == []
    child.wait()


def test_an_orphan_is_found_by_the_token_it_inherited() -> None:
    """A grandchild whose parent exited is re-parented to init: not a descendant any more."""
    before = hygiene.snapshot()
    quiet = "stdout=s.DEVNULL, stderr=s.DEVNULL"
    code = f"import subprocess as s; print(s.Popen(['sleep', '30'], {quiet}).pid)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    orphan = int(out.stdout)
    leaked = hygiene.leaked_since(before, grace_s=0.2)
    assert any(line.startswith(f"pid {orphan}:") for line in leaked), leaked


def test_a_task_left_pending_when_the_loop_closes_is_recorded() -> None:
    async def forgotten() -> None:
        await asyncio.sleep(30)

    async def main() -> None:
        asyncio.get_running_loop().create_task(forgotten(), name="forgotten-task")

    with asyncio.Runner() as runner:
        runner.run(main())
    recorded = list(hygiene._leaked_tasks)
    del hygiene._leaked_tasks[:]  # handled here: not this test's leak
    assert any("forgotten-task" in r for r in recorded), recorded
