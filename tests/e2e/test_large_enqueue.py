"""A 200,000-item workflow while the planner is still enqueueing it (issue 13):

* cancelled mid-enqueue, its WORK subjects are empty within 10 s and stay empty (the
  planner stops enqueueing and purges what it added after the janitor's purge), also when
  the nats-server restarts right after the cancel;
* its progress, sampled, never shows more terminal items than are stored, never goes
  backwards, and never has a negative rate.

Slow (each enqueues 200k items on a 2-core machine)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import services
from jetreduce.cli.submit import submit
from jetreduce.contract import events as ev
from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.subjects import Subjects
from jetreduce.embedded import EmbeddedServer
from jetreduce.runtime.publish import is_stored
from support import wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ITEMS = 200_000
WORKFLOW = f"""
name: large
map:
  input: "seq 0 {ITEMS - 1}"
  max_parallel: 2
  agent_template:
    - shell: "true"
"""


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A server of this test's own (it is restarted), on a fixed port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = EmbeddedServer(tmp_path / "nats", port=port).start()
    try:
        yield server
    finally:
        server.stop()


async def distinct(nc: Any, stream: str, subject_filter: str) -> int:
    """Distinct subjects in ``stream`` matching the filter (one per item: WORK, RESULTS)."""
    resp = await nc.request(
        f"$JS.API.STREAM.INFO.{stream}",
        json.dumps({"subjects_filter": subject_filter, "offset": 1 << 40}).encode(),
        timeout=5,
    )
    return int(json.loads(resp.data).get("total", 0))


async def start(h: Any, wf: str, workdir: Path) -> None:
    await submit(
        h.nc, h.subjects, WORKFLOW, SubmitOptions(workdir=str(workdir)), workflow_id=wf, source="t"
    )
    s = h.subjects
    planned = s.workflow("planned", wf)
    await wait_for(lambda: is_stored(h.nc.jetstream(), s.events_stream, planned), timeout_s=120)


@pytest.mark.parametrize("restart", [False, True], ids=["plain", "server-restart"])
async def test_cancel_mid_enqueue_leaves_no_work(
    restart: bool, own_server: EmbeddedServer, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    wf = "big-cancel"
    async with services(own_server.url, prefix, tmp_path) as h:
        s: Subjects = h.subjects
        await start(h, wf, workdir)
        await wait_for(
            lambda: distinct(h.nc, s.work_stream, s.work_of(wf)), timeout_s=60, every_s=0.1
        )
        queued = await distinct(h.nc, s.work_stream, s.work_of(wf))
        assert queued < ITEMS, "the enqueue was over before the cancel: nothing proven"
        await h.nc.publish(
            s.workflow("cancel", wf),
            ev.encode(ev.WorkflowCancelRequested(workflow_id=wf, reason="test")),
        )

        async def work_left() -> int | None:
            with contextlib.suppress(Exception):  # the server may be coming back
                return await distinct(h.nc, s.work_stream, s.work_of(wf))
            return None

        await wait_for(lambda: _is_zero(work_left()), timeout_s=10, every_s=0.2)
        cancelled = s.workflow("cancelled", wf)
        assert await is_stored(h.nc.jetstream(), s.events_stream, cancelled)
        if restart:  # what the purges removed stays removed
            own_server.stop()
            own_server.start()
            await wait_for(lambda: _is_zero(work_left()), timeout_s=20, every_s=0.2)
        await asyncio.sleep(2.0)  # nothing comes back: the planner has stopped
        assert await work_left() == 0


async def _is_zero(value: Any) -> bool:
    return (await value) == 0


async def test_progress_is_exact_and_monotonic_while_enqueueing(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    wf = "big-progress"
    async with services(nats_url, prefix, tmp_path) as h:
        s: Subjects = h.subjects
        samples: asyncio.Queue[ev.Progress] = asyncio.Queue()

        async def on_progress(msg: Any) -> None:
            event = ev.decode(msg.data)
            if isinstance(event, ev.Progress):
                samples.put_nowait(event)

        sub = await h.nc.subscribe(s.progress(wf), cb=on_progress)
        try:
            await start(h, wf, workdir)
            checked: list[tuple[int, int, float, int]] = []
            while len(checked) < 8:
                p = await asyncio.wait_for(samples.get(), 30)
                stored = await distinct(h.nc, s.results_stream, s.terminal_of(wf))
                checked.append((p.done, p.dead, p.rate_per_s, stored))
            queued = await distinct(h.nc, s.work_stream, s.work_of(wf))
        finally:
            await sub.unsubscribe()
            await h.nc.publish(
                s.workflow("cancel", wf),
                ev.encode(ev.WorkflowCancelRequested(workflow_id=wf, reason="done")),
            )
        print(f"\nprogress samples (done, dead, rate, stored): {checked}; queued at end {queued}")
        for done, dead, rate, stored in checked:
            assert done + dead <= stored, checked
            assert rate >= 0, checked
        shown = [done + dead for done, dead, _, _ in checked]
        assert shown == sorted(shown), f"progress went backwards: {checked}"
