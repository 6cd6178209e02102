"""A workflow's utilisation for ``workflow.completed`` (issue 17, elastic slots): busy
slot-seconds over held slot-seconds of its map agents, summed from their ``agent.usage``
reports.

Every stored report counts: an agent restarted after a kill reports again, with the figures
of its own run, so nothing is de-duplicated. A map agent reports as it leaves the phase. With
a reduce phase they have all left before it started (the launcher stops them first), so what
is stored is all there will be (``wait_s`` 0). Without one, ``workflow.completed`` follows
``map.complete`` at once, while the map agents are still leaving. So the reports expected
are counted from the launcher's events: each
``agent.launched`` of phase ``map`` adds its ``agents``, each ``agent.exited`` of a map agent
that is restarted adds one (the new run reports too). They are awaited, as they are stored,
for at most ``USAGE_WAIT_S``; then the workflow ends with what arrived (an agent killed
without reporting must not hold it up longer). No report at all: utilisation None.

One ordered consumer on ``agent.*.<wf>`` reads what is stored and then what is stored next:
no polling, and nothing read twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from dataclasses import dataclass

from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from jetreduce.contract.events import AgentExited, AgentLaunched, AgentUsage, BadEvent, decode
from jetreduce.contract.subjects import Subjects

__all__ = ["USAGE_WAIT_S", "Usage", "map_usage"]

log = logging.getLogger(__name__)

USAGE_WAIT_S = 0.5
"""How long the end of a workflow waits for map agents' reports still missing."""

READ_TIMEOUT_S = 10.0
"""Bound on reading what is already stored (a workflow's agent events: a handful per agent)."""


@dataclass
class Usage:
    """Sums of a workflow's map agents' reports."""

    reports: int = 0
    expected: int = 0
    busy_slot_s: float = 0.0
    held_slot_s: float = 0.0

    @property
    def utilisation(self) -> float | None:
        if self.reports == 0 or self.held_slot_s <= 0:
            return None
        return round(min(1.0, self.busy_slot_s / self.held_slot_s), 4)

    def add(self, data: bytes | None) -> None:
        """Count one stored ``agent.*`` event of the workflow (others are not ours)."""
        try:
            event = decode(data or b"")
        except BadEvent as exc:
            log.warning("agent event skipped: %s", exc)
            return
        if getattr(event, "phase", None) != "map":
            return
        if isinstance(event, AgentLaunched):
            self.expected += max(0, event.agents)
        elif isinstance(event, AgentExited) and event.restarted:
            self.expected += 1
        elif isinstance(event, AgentUsage):
            held, busy = event.held_s, event.busy_s
            if not (_sane(held) and _sane(busy)):
                log.warning("agent.usage of %s skipped: held %r, busy %r", event.agent, held, busy)
                return
            self.reports += 1
            self.held_slot_s += held
            self.busy_slot_s += min(busy, held)


def _sane(value: float) -> bool:
    return math.isfinite(value) and value >= 0


async def map_usage(
    js: JetStreamContext, subjects: Subjects, wf: str, *, wait_s: float = USAGE_WAIT_S
) -> Usage:
    """The workflow's map usage: what is stored, and reports still expected for up to
    ``wait_s`` (see the module docstring)."""
    usage = Usage()
    try:
        sub = await js.subscribe(
            subjects.agent("*", wf),
            stream=subjects.events_stream,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
    except NotFoundError:
        return usage
    loop = asyncio.get_running_loop()
    try:
        info = await sub.consumer_info()
        # Everything stored when the consumer was made is pending or already delivered (then
        # its last message says that nothing is pending): as runtime/store.py reads.
        delivered = info.delivered.consumer_seq if info.delivered is not None else 0
        caught_up = not info.num_pending and not delivered
        read_by = loop.time() + READ_TIMEOUT_S
        wait_by = loop.time() + wait_s
        while not caught_up or usage.reports < usage.expected:
            left = (read_by if not caught_up else wait_by) - loop.time()
            if left <= 0:
                break
            try:
                msg = await sub.next_msg(timeout=left)
            except (TimeoutError, NatsTimeout):
                break
            usage.add(msg.data)
            if not msg.metadata.num_pending:
                caught_up = True
    finally:
        with contextlib.suppress(Exception):  # the connection may be closing
            await sub.unsubscribe()
    if usage.reports < usage.expected:
        log.info(
            "workflow %s: %d of %d map agents reported their usage",
            wf,
            usage.reports,
            usage.expected,
        )
    return usage
