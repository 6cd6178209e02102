"""A map agent's usage report (worker/elastic.py) on a real server: stored with the figures
it was given, and never holding the agent's exit up for long when NATS is unreachable."""

from __future__ import annotations

import time
from pathlib import Path

import nats
import pytest

from helpers import stored_events
from jetreduce.contract import events as ev
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.embedded import EmbeddedServer
from jetreduce.worker.context import AgentConfig
from jetreduce.worker.elastic import (
    DRAIN_IDLE_S,
    USAGE_TIMEOUT_S,
    IdleWatch,
    Usage,
    prefetch,
    publish_bounded,
)

pytestmark = pytest.mark.anyio


def test_prefetch_is_none_below_ten_slots() -> None:
    """200 one-slot agents lease at most 200 items: nothing waits behind a busy slot."""
    assert [prefetch(n) for n in (1, 9, 10, 25, 62, 250)] == [0, 0, 1, 2, 6, 25]


def test_only_agents_past_the_first_watch_for_a_dry_queue() -> None:
    first, other = IdleWatch(0, idle_s=0.0), IdleWatch(1, idle_s=0.0)
    assert not first.ran_dry(active=False)
    assert not other.ran_dry(active=True)
    assert other.ran_dry(active=False)


def test_draining_can_be_turned_off() -> None:
    """``JETREDUCE_DRAIN_IDLE_S=0``: every agent stays until ``map.complete`` (the load
    test's idle-agent figure needs idle agents)."""
    config = AgentConfig.from_env(
        {"JETREDUCE_WORKFLOW_ID": "wf", "JETREDUCE_AGENT_INDEX": "3", "JETREDUCE_DRAIN_IDLE_S": "0"}
    )
    watch = IdleWatch(config.index, config.drain_idle_s)
    assert config.drain_idle_s is None and not watch.ran_dry(active=False)
    assert AgentConfig.from_env({"JETREDUCE_WORKFLOW_ID": "wf"}).drain_idle_s == DRAIN_IDLE_S


async def test_usage_report_is_stored(nats_url: str, prefix: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        s = Subjects(prefix)
        js = nc.jetstream()
        await declare(js, s)
        usage = Usage(slots=4)
        usage.started -= 1.0  # its map phase began a second ago: 4 slot-seconds held
        usage.ran(0.25)
        usage.ran(0.5)
        report = usage.report("wf-usage", "h/1/map-2", 2, drained=True)
        assert await publish_bounded(js, s.agent("usage", "wf-usage"), ev.encode(report))
        stored = await stored_events(nc, s, s.agent("usage", "wf-usage"))
    finally:
        await nc.close()
    assert len(stored) == 1
    got = stored[0]
    assert isinstance(got, ev.AgentUsage)
    assert (got.index, got.slots, got.items, got.drained) == (2, 4, 2, True)
    assert got.busy_s == pytest.approx(0.75)
    assert 4.0 <= got.held_s < 60 and got.busy_s <= got.held_s


async def test_usage_report_gives_up_quickly_when_nats_is_gone(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "nats").start()
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        js = nc.jetstream()
        await declare(js, Subjects("gone"))
        server.stop()
        start = time.monotonic()
        stored = await publish_bounded(js, "gone.agent.usage.wf", b"{}")
        took = time.monotonic() - start
    finally:
        server.stop()
        await nc.close()
    assert not stored
    assert took < USAGE_TIMEOUT_S + 0.5
