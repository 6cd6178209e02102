"""``retry_config.backoff`` end to end: each kind's delays, measured between the stored
``item.failed`` events of an item that always fails (issue 16: every kind ran as exponential x2).

Real nats-server, the services in-process, agents as child processes. The four workflows run at
once; each item fails 4 times, so each gives 3 delays."""

from __future__ import annotations

import asyncio
import itertools
import secrets
from pathlib import Path

import pytest

from helpers import Harness, services, stored_events
from jetreduce.cli.submit import submit
from jetreduce.cli.watch import Watcher
from jetreduce.contract import events as ev
from jetreduce.contract.events import SubmitOptions

pytestmark = pytest.mark.anyio

TOKEN = secrets.token_hex(3)
JITTER = 0.2
"""The agent spreads each delay by ±20%."""

KINDS: dict[str, tuple[str, list[float]]] = {
    "fixed": ("{fixed: {delay: 0.3s}}", [0.3, 0.3, 0.3]),
    "linear": ("{linear: {initial: 0.2s, increment: 0.4s}}", [0.2, 0.6, 1.0]),
    "exponential": ("{exponential: {initial: 0.2s, multiplier: 3}}", [0.2, 0.6, 1.8]),
    "fibonacci": ("{fibonacci: {initial: 0.4s}}", [0.4, 0.4, 0.8]),
}

WORKFLOW = """
name: backoff-{kind}
map:
  input: "echo '[1]'"
  agent_template:
    - shell: "echo nope >&2; exit 3"
error_policy:
  retry_config:
    max_attempts: 4
    backoff: {backoff}
"""


async def failures_of(h: Harness, kind: str, workdir: Path) -> list[ev.ItemFailed]:
    wf = f"backoff-{kind}-{TOKEN}"
    watcher = Watcher(h.nc, h.subjects, wf, show_events=False, tty=False)
    await watcher.start()
    try:
        text = WORKFLOW.format(kind=kind, backoff=KINDS[kind][0])
        options = SubmitOptions(workdir=str(workdir))
        await submit(h.nc, h.subjects, text, options, workflow_id=wf, source="test")
        end = await watcher.until_done(90)
    finally:
        await watcher.stop()
    assert isinstance(end, ev.WorkflowCompleted), h.agent_logs()
    assert (end.done, end.dead) == (0, 1)
    events = await stored_events(h.nc, h.subjects, h.subjects.item_failed(wf, "*"))
    return [e for e in events if isinstance(e, ev.ItemFailed)]


async def test_each_backoff_kind_waits_its_own_delays(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    async with services(nats_url, prefix, tmp_path) as h:
        found = await asyncio.gather(*(failures_of(h, kind, workdir) for kind in KINDS))
    for kind, failures in zip(KINDS, found, strict=True):
        expected = KINDS[kind][1]
        assert [f.attempt for f in failures] == [1, 2, 3, 4], kind
        announced = [f.retry_in_s for f in failures]
        assert announced[-1] is None, kind  # the last attempt is not retried
        for delay, want in zip(announced[:-1], expected, strict=True):
            assert delay is not None, kind
            assert want * (1 - JITTER) - 1e-6 <= delay <= want * (1 + JITTER) + 1e-6, (
                kind,
                announced,
            )
        # Measured: the next attempt failed no sooner than the delay, and not much later
        # (the redelivery, an agent's lease poll and a one-line shell step in between).
        for before, after in itertools.pairwise(failures):
            assert before.retry_in_s is not None
            gap = after.ts - before.ts
            assert before.retry_in_s * 0.95 <= gap <= before.retry_in_s + 1.5, (kind, gap)
    # The kinds differ where they should, whatever the jitter: exponential's third delay
    # (1.8 s, at least 1.44) is longer than linear's (1.0 s, at most 1.2).
    third = {kind: failures[2].retry_in_s for kind, failures in zip(KINDS, found, strict=True)}
    assert third["exponential"] is not None and third["linear"] is not None
    assert third["exponential"] > third["linear"]
