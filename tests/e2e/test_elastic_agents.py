"""Elastic slots, the agent's side (issue 17; worker/elastic.py): once the queue has run dry
and an agent has held nothing for a moment, map agents other than agent 0 leave the phase
(exit 0, "drained") before ``map.complete``; agent 0 stays and runs the retry that comes due
after they left; every agent reports what it held and used (``agent.usage``).

Real nats-server, the services in-process, three one-slot agents as child processes."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from helpers import Harness, read_stream, services, stored_events
from jetreduce.cli.submit import submit
from jetreduce.cli.watch import Watcher
from jetreduce.contract import events as ev
from jetreduce.contract.events import SubmitOptions
from support import wait_for

pytestmark = pytest.mark.anyio

# Markers live in the test's directory ($2), not in the agent's workspace: each agent has a
# copy of its own, and the retry may run on another agent than the first attempt.
SCRIPT = """set -u
case "$1" in
  0) i=0; while [ ! -f "$2/release" ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done ;;
  5) if [ ! -f "$2/failed" ]; then touch "$2/failed"; echo "first try fails" >&2; exit 3; fi ;;
esac
echo "item $1"
"""

WORKFLOW = """
name: elastic
map:
  input: "echo '[0, 1, 2, 3, 4, 5]'"
  max_parallel: 3
  agent_template:
    - shell: "sh item.sh ${item} MARKERS"
error_policy:
  retry_config:
    max_attempts: 3
    backoff:
      fixed: {delay: 1s}
"""


async def test_idle_agents_leave_before_map_complete_and_agent_0_runs_the_retry(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    (workdir / "item.sh").write_text(SCRIPT)
    wf = f"elastic-{secrets.token_hex(3)}"
    async with services(nats_url, prefix, tmp_path, max_processes=3) as h:
        usage_subject = h.subjects.agent("usage", wf)

        async def reports() -> list[ev.AgentUsage]:
            stored = await stored_events(h.nc, h.subjects, usage_subject)
            return [e for e in stored if isinstance(e, ev.AgentUsage)]

        watcher = Watcher(h.nc, h.subjects, wf, show_events=False, tty=False)
        await watcher.start()
        try:
            await submit(
                h.nc,
                h.subjects,
                WORKFLOW.replace("MARKERS", str(workdir)),
                SubmitOptions(workdir=str(workdir)),
                workflow_id=wf,
                source="test",
            )

            async def one_drained() -> bool:
                return any(r.drained for r in await reports())

            # Item 0 holds one agent until released: the others run dry meanwhile.
            await wait_for(one_drained, timeout_s=60)
            (workdir / "release").touch()
            done = await watcher.until_done(90)
        finally:
            await watcher.stop()
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        assert (done.total, done.done, done.dead) == (6, 6, 0)
        # The aggregator sums the reports into the workflow's utilisation.
        assert done.utilisation is not None and 0 < done.utilisation <= 1, done
        assert 0 < done.busy_slot_s <= done.held_slot_s, done
        results = await stored_events(h.nc, h.subjects, h.subjects.map("complete", wf))
        complete = next(e for e in results if isinstance(e, ev.MapComplete))
        terminal = await _terminal(h, wf)

        async def every_agent_reported() -> bool:
            return len(await reports()) >= 3

        await wait_for(every_agent_reported, timeout_s=30)
        usage = await reports()
    assert sorted(r.index for r in terminal) == [0, 1, 2, 3, 4, 5]
    retried = next(r for r in terminal if r.index == 5)
    assert isinstance(retried, ev.ItemDone) and retried.attempts == 2
    drained = [r for r in usage if r.drained]
    assert drained and all(r.index > 0 for r in drained), usage
    assert all(r.ts < complete.ts for r in drained), (usage, complete.ts)
    assert not any(r.drained for r in usage if r.index == 0), usage
    for report in usage:
        assert report.phase == "map" and report.slots == 1, report
        assert 0 < report.held_s < 300, report
        assert 0 <= report.busy_s <= report.held_s, report
    # Every attempt is counted once: six items, one of them twice.
    assert sum(r.items for r in usage) == 7, usage
    assert sum(r.busy_s for r in usage) > 0


async def _terminal(h: Harness, wf: str) -> list[ev.ItemDone | ev.ItemDead]:
    found = await read_stream(
        h.nc.jetstream(), h.subjects.results_stream, h.subjects.terminal_of(wf)
    )
    return [e for e in found if isinstance(e, ev.ItemDone | ev.ItemDead)]
