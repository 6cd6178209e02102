"""How much a map agent holds, when it hands its slots back, and what it reports about them.

**Budget.** A map agent leases at most ``slots + prefetch(slots)`` items at a time, counting
every item it holds: running, leased and not started yet, and finished with its result on
the wire (acked only when the server stored it, `recording`). The prefetch is
``slots // 10``: none for agents under 10 slots, so 200 one-slot agents hold at most 200
leases and an item never waits leased behind a busy slot; a 25-slot agent keeps 2 ready
so a slot that frees starts its next item without a pull round trip. The queue never
delivers beyond what was asked (`queues.base`: a read-ahead is bounded by ``max_n``), so
this is also the bound on the server's ack-pending count per agent.

**Elastic slots.** When the queue has run dry (nothing pending: items left are in flight on
other agents, or waiting out a retry delay) and an agent has held nothing for
``DRAIN_IDLE_S`` (``JETREDUCE_DRAIN_IDLE_S``; 0 turns it off), an agent with index > 0
leaves the phase: it exits 0 ("drained") and its launcher frees its slots for other
workflows. Agent 0 stays until ``map.complete`` to run retries and redeliveries (a delayed
retry is in flight on JetStream and SQS, not pending). The depth is asked at most once per
idle period: an idle agent's cost stays flat.

**Usage.** As it leaves the phase (drained, ``map.complete``, the workflow's end or a stop
signal) the agent publishes one ``AgentUsage``: ``held_s`` = slots x time since its map
phase started, ``busy_s`` = the sum of its attempts' lease → decided times. The publish is
bounded (`USAGE_TIMEOUT_S`): an unreachable NATS never holds the exit up for longer.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.js import JetStreamContext

from jetreduce.contract.events import AgentUsage

__all__ = [
    "DRAIN_IDLE_S",
    "USAGE_TIMEOUT_S",
    "IdleWatch",
    "Usage",
    "prefetch",
    "publish_bounded",
]

log = logging.getLogger(__name__)

DRAIN_IDLE_S = 1.0
"""How long an agent must have held nothing before it asks whether the queue ran dry."""
USAGE_TIMEOUT_S = 1.5
"""Longest the usage report may hold up an agent's exit."""


def prefetch(slots: int) -> int:
    """Items leased beyond the slots (see the module docstring)."""
    return slots // 10


class IdleWatch:
    """Tells when an agent (index > 0) has been idle long enough to ask for the depth."""

    def __init__(self, index: int, idle_s: float | None = DRAIN_IDLE_S) -> None:
        self.enabled = index > 0 and idle_s is not None  # None: never leaves early
        self.idle_s = idle_s or 0.0
        self.since = time.monotonic()

    def ran_dry(self, active: bool) -> bool:
        """Called after each lease: True when the agent has held nothing for ``idle_s``
        (at most once per ``idle_s``)."""
        if not self.enabled:
            return False
        now = time.monotonic()
        if active:
            self.since = now
            return False
        if now - self.since < self.idle_s:
            return False
        self.since = now
        return True


class Usage:
    """Slot-seconds a map agent held and spent running items."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.started = time.monotonic()
        self.busy_s = 0.0
        self.items = 0

    def ran(self, seconds: float) -> None:
        self.busy_s += max(0.0, seconds)
        self.items += 1

    def report(self, wf: str, agent: str, index: int, drained: bool) -> AgentUsage:
        held = self.slots * (time.monotonic() - self.started)
        return AgentUsage(
            workflow_id=wf,
            phase="map",
            agent=agent,
            index=index,
            slots=self.slots,
            held_s=round(held, 6),
            busy_s=round(min(self.busy_s, held), 6),
            items=self.items,
            drained=drained,
        )


async def publish_bounded(
    js: JetStreamContext, subject: str, payload: bytes, timeout_s: float = USAGE_TIMEOUT_S
) -> bool:
    """Publish once, giving up after ``timeout_s``: a report never worth a slow exit."""
    try:
        await asyncio.wait_for(js.publish(subject, payload, timeout=timeout_s), timeout_s)
    except Exception as exc:
        log.warning("agent: usage report not published (%s)", type(exc).__name__)
        return False
    return True
