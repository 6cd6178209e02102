"""The dead-letter queue as an operator uses it: list, show, retry (re-opening a finished
workflow so reduce runs again), purge."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import dlq, next_completion, services, stored_events
from jetreduce.cli.watch import Watcher
from jetreduce.contract import events as ev

pytestmark = pytest.mark.anyio

WORKFLOW = """
name: flaky
map:
  input: "echo '[{\\"n\\": 1}, {\\"n\\": 2}, {\\"n\\": 3}]'"
  agent_template:
    - shell: "test ${item.n} -ne 2 || test -f fixed"
    - shell: "echo n=${item.n}"
reduce:
  - shell: "echo ok=${map.successful} dead=${map.failed}"
"""


async def test_dead_item_retried_after_a_fix_reopens_and_reduces_again(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    async with services(nats_url, prefix, tmp_path) as h:
        first = await h.run(WORKFLOW, workdir, max_attempts=2, workflow_id="flaky-1")
        assert isinstance(first, ev.WorkflowCompleted), h.agent_logs()
        assert (first.done, first.dead) == (2, 1)
        assert first.reduce_output == "ok=2 dead=1"

        listed = await dlq(h, "list", "flaky-1")
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.count("\n") == 1
        assert "item_1" in listed.stdout and "CommandFailed" in listed.stdout
        assert "attempts=2" in listed.stdout

        shown = await dlq(h, "show", "flaky-1", "item_1")
        assert shown.returncode == 0, shown.stderr
        assert '"n": 2' in shown.stdout  # the item's data
        assert "exited with code 1" in shown.stdout
        assert "--- log (logs/flaky-1/1)" in shown.stdout

        (workdir / "fixed").touch()
        watcher = Watcher(h.nc, h.subjects, "flaky-1", show_events=False, tty=False)
        await watcher.start()
        retried = await dlq(h, "retry", "flaky-1", "--filter", "n == 2")
        assert retried.returncode == 0, retried.stderr
        assert "1 item(s)" in retried.stdout
        try:
            second = await next_completion(watcher)
        finally:
            await watcher.stop()
        assert (second.done, second.dead) == (3, 0)
        assert second.reduce_output == "ok=3 dead=0"
        assert (await dlq(h, "list", "flaky-1")).stdout == ""
        nothing = await dlq(h, "retry", "flaky-1")
        assert nothing.returncode == 1 and "no matching" in nothing.stderr


async def test_purge_forgets_dead_items(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(WORKFLOW, workdir, max_attempts=1, workflow_id="flaky-2")
        assert isinstance(done, ev.WorkflowCompleted) and done.dead == 1
        purged = await dlq(h, "purge", "flaky-2")
        assert purged.returncode == 0, purged.stderr
        assert (await dlq(h, "list", "flaky-2")).stdout == ""
        missing = await dlq(h, "show", "flaky-2", "item_1")
        assert missing.returncode == 1


async def test_circuit_breaker_pauses_dispatch_and_announces_each_transition(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    text = """
name: breaker
map:
  input: "seq 0 7"
  max_parallel: 1
  agent_template:
    - shell: "test ${item} -ge 4"
error_policy:
  circuit_breaker:
    failure_threshold: 3
    success_threshold: 1
    timeout: 1s
    half_open_requests: 1
"""
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(text, workdir, max_attempts=1, workflow_id="breaker-1")
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        assert (done.done, done.dead) == (4, 4)
        changes = [
            e
            for e in await stored_events(h.nc, h.subjects, h.subjects.agent("circuit", "breaker-1"))
            if isinstance(e, ev.CircuitChanged)
        ]
    # Items 0-2 fail: open. After 1 s a probe (item 3) fails: open again. The next probe
    # (item 4) succeeds: closed.
    assert [c.state for c in changes] == ["open", "half_open", "open", "half_open", "closed"]
    assert changes[1].ts - changes[0].ts >= 0.9
    assert changes[3].ts - changes[2].ts >= 0.9
