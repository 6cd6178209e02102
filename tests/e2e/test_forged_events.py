"""Events no one may forge (issue 13): whoever can publish on the event and result subjects
must not be able to cancel another workflow, end a map early, or record an item's result
before it runs. Real services and agents against the session nats-server."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from helpers import Harness, item_results, read_stream, services
from jetreduce.cli.submit import submit
from jetreduce.cli.watch import Watcher
from jetreduce.contract import events as ev
from jetreduce.contract.events import SubmitOptions
from jetreduce.runtime.publish import is_stored
from support import wait_for

pytestmark = pytest.mark.anyio

WORKFLOW = """
name: forged
map:
  input: "seq 0 {last}"
  max_parallel: {parallel}
  agent_template:
    - shell: "sleep {sleep}; echo real-${{item}}"
reduce:
  - shell: "grep -c real- ${{map.results_file}}"
"""


async def run_with(
    h: Harness, workdir: Path, text: str, forge: Callable[[str], Awaitable[None]]
) -> Any:
    """Submit ``text``, call ``forge(wf)`` at once, follow the workflow to its end."""
    wf = f"wf-{secrets.token_hex(4)}"
    watcher = Watcher(h.nc, h.subjects, wf, show_events=False, tty=False)
    await watcher.start()
    try:
        options = SubmitOptions(workdir=str(workdir))
        await submit(h.nc, h.subjects, text, options, workflow_id=wf, source="test")
        await forge(wf)
        return await watcher.until_done(60)
    finally:
        await watcher.stop()


async def test_cancel_naming_another_workflow_cancels_neither(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    async with services(nats_url, prefix, tmp_path) as h:
        s = h.subjects

        async def forge(wf: str) -> None:
            # workflow.cancel.<other> whose payload names this workflow.
            event = ev.WorkflowCancelRequested(workflow_id=wf, reason="forged")
            await h.nc.publish(s.workflow("cancel", "other"), ev.encode(event))

        text = WORKFLOW.format(last=3, parallel=2, sleep=0.5)
        end = await run_with(h, workdir, text, forge)
        assert isinstance(end, ev.WorkflowCompleted), end
        assert end.reduce_output == "4"
        js = h.nc.jetstream()
        assert not await is_stored(js, s.events_stream, s.workflow("cancelled", end.workflow_id))


async def test_false_map_complete_neither_stops_the_map_nor_starts_reduce(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    async with services(nats_url, prefix, tmp_path) as h:
        s = h.subjects
        js = h.nc.jetstream()

        async def forge(wf: str) -> None:
            planned = s.workflow("planned", wf)
            await wait_for(lambda: is_stored(js, s.events_stream, planned), timeout_s=30)
            event = ev.MapComplete(workflow_id=wf, total=6, done=6, dead=0)
            await h.nc.publish(s.map("complete", wf), ev.encode(event))

        end = await run_with(h, workdir, WORKFLOW.format(last=5, parallel=2, sleep=0.4), forge)
        assert isinstance(end, ev.WorkflowCompleted), (end, h.agent_logs()[-3000:])
        assert end.reduce_output == "6"  # every real result reached reduce
        results = await item_results(h, end.workflow_id)
        assert {i: r.output for i, r in results.items()} == {i: f"real-{i}" for i in range(6)}
        stored = await read_stream(js, s.events_stream, s.map("complete", end.workflow_id))
        assert len(stored) == 1 and isinstance(stored[0], ev.MapComplete), stored


async def test_result_stored_before_the_item_ran_is_replaced_by_the_real_one(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    async with services(nats_url, prefix, tmp_path) as h:
        s = h.subjects

        async def forge(wf: str) -> None:
            # Before item 2 runs (one slot, a second per item): stored first, create-only.
            forged = ev.ItemDone(
                workflow_id=wf,
                index=2,
                item_id="item_2",
                output="forged",
                exit_code=0,
                duration_s=0.1,
                attempts=1,
                agent="mallory/1/map-0",
            )
            stored = await is_stored(h.nc.jetstream(), s.results_stream, s.item_done(wf, 2))
            assert not stored
            await h.nc.jetstream().publish(s.item_done(wf, 2), ev.encode(forged))

        end = await run_with(h, workdir, WORKFLOW.format(last=2, parallel=1, sleep=1), forge)
        assert isinstance(end, ev.WorkflowCompleted), end
        assert end.reduce_output == "3"
        js = h.nc.jetstream()
        terminal = await read_stream(js, s.results_stream, s.terminal_of(end.workflow_id))
        outputs = sorted((r.index, getattr(r, "output", None)) for r in terminal)  # type: ignore[attr-defined]
        assert outputs == [(i, f"real-{i}") for i in range(3)]


async def test_a_result_beyond_the_total_neither_blocks_the_reduce_nor_reaches_it(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    """A result for an item the workflow does not have (index ≥ total): the aggregator
    does not count it, and neither may the launcher when it checks ``map.complete``, or it
    would refuse the true one and the reduce would never start."""
    async with services(nats_url, prefix, tmp_path) as h:
        s = h.subjects

        async def forge(wf: str) -> None:
            forged = ev.ItemDone(
                workflow_id=wf,
                index=99,
                item_id="item_99",
                output="real-forged",
                exit_code=0,
                duration_s=0.1,
                attempts=1,
                agent="mallory/1/map-0",
            )
            await h.nc.jetstream().publish(s.item_done(wf, 99), ev.encode(forged))

        end = await run_with(h, workdir, WORKFLOW.format(last=3, parallel=2, sleep=0.2), forge)
        assert isinstance(end, ev.WorkflowCompleted), (end, h.agent_logs()[-3000:])
        assert (end.total, end.done) == (4, 4)
