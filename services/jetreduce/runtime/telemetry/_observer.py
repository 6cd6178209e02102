"""Orchestrator metrics, derived from the events every service already publishes.

Counting where the events are is exact and touches no service's code path: items are
counted from ``item.done`` / ``item.dead`` (RESULTS) and ``item.failed`` (EVENTS), each
through a durable JetStream consumer that delivers **headers only**, shared by the replicas
(a queue group, so their sums add up): a result or a failure carries up to 64 KiB of output
this process has no use for, and the attempt's duration rides in a header
(``DURATION_HEADER``). Queue depth per lane comes from the aggregator's ``progress``
snapshots, active agents from ``agent.launched`` / ``agent.exited``, circuit breakers from
``agent.circuit``. The process hosting the aggregator runs it (``ServiceHost`` with a metrics
port); nothing subscribes when metrics are off, so a run without them pays nothing.

The consumers deliver new messages only and expect no acks: these are operating metrics, not
the books — the RESULTS stream is. A dead item recorded by the janitor (its agents kept
dying) has no duration: it is counted, not timed.

Lease age per lane comes from the agents themselves: no queue backend says when it
delivered a message, but each agent knows when it leased its items and reports its oldest
lease at every heartbeat (``telemetry.leases.<wf>``, core NATS, not stored).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from typing import Any

import msgspec

from jetreduce.contract import events as ev
from jetreduce.contract.subjects import PRIORITY_LANES, TERMINAL_EVENTS, Subjects
from jetreduce.runtime.telemetry._setup import meter as current_meter

__all__ = ["EventMetrics"]

log = logging.getLogger(__name__)

RESULTS_CONSUMER = "metrics-results"
FAILED_CONSUMER = "metrics-failed"
"""Durable push consumers of ``item.done``/``item.dead`` on RESULTS and ``item.failed`` on
EVENTS, headers only, each delivered to the queue group of its name; the server removes one
``CONSUMER_IDLE_S`` after its last subscriber left (metrics turned off)."""
CONSUMER_IDLE_S = 3600.0
DURATION_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
"""Item attempts run from milliseconds (an echo) to an hour (a claude step)."""
LEASE_REPORT_STALE_S = 60.0
"""An agent's lease report older than this is dropped (the agent is gone; agents report
every third of their lease, 10 s by default)."""
_lease_ages = msgspec.json.Decoder(ev.LeaseAges)


class EventMetrics:
    """Subscribe to the event subjects and keep the instruments of the current meter."""

    def __init__(self, nc: Any, subjects: Subjects, state: Any | None = None) -> None:
        self.nc = nc
        self.s = subjects
        self.state = state
        """A ``StateStore`` to look a workflow's priority up (its lane); None: lane "p1"."""
        self._subs: list[Any] = []
        self._lanes: dict[str, str] = {}
        self._progress: dict[str, ev.Progress] = {}
        self._agents: dict[tuple[str, str], int] = {}
        self._circuits: dict[tuple[str, str], str] = {}
        self._leases: dict[tuple[str, str], tuple[float, int, float]] = {}
        """(workflow, agent) → (oldest lease age, leases held, monotonic time of the report)."""
        meter = current_meter()
        if meter is None:
            self.enabled = False
            return
        self.enabled = True
        self.enqueued = meter.create_counter(
            "jetreduce.items.enqueued", description="Items planned into a queue (and retried)"
        )
        self.done = meter.create_counter("jetreduce.items.done", description="Items done")
        self.failed = meter.create_counter(
            "jetreduce.items.failed", description="Failed attempts (each retry counts)"
        )
        self.dead = meter.create_counter(
            "jetreduce.items.dead", description="Items dead after their last attempt"
        )
        self.duration = meter.create_histogram(
            "jetreduce.item.duration",
            unit="s",
            description="Duration of an item's final attempt",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
        )
        meter.create_observable_gauge(
            "jetreduce.queue.pending",
            callbacks=[lambda _o: self._queue("pending")],
            description="Items waiting in the queue, per lane",
        )
        meter.create_observable_gauge(
            "jetreduce.queue.in_flight",
            callbacks=[lambda _o: self._queue("in_flight")],
            description="Items leased by agents, per lane",
        )
        meter.create_observable_gauge(
            "jetreduce.queue.lease_age_max",
            unit="s",
            callbacks=[self._lease_age],
            description="Age of the oldest item lease held by an agent, per lane",
        )
        meter.create_observable_gauge(
            "jetreduce.workflows.mapping",
            callbacks=[self._workflows],
            description="Workflows in their map phase",
        )
        meter.create_observable_gauge(
            "jetreduce.agents.active",
            callbacks=[self._active_agents],
            description="Agents running (or being restarted), per phase",
        )
        meter.create_observable_gauge(
            "jetreduce.circuit.agents",
            callbacks=[self._circuit_states],
            description="Agents whose circuit breaker is open or half open",
        )

    async def start(self) -> EventMetrics:
        if not self.enabled:
            return self
        s = self.s
        self._subs.append(await self._headers_only(s.results_stream, RESULTS_CONSUMER))
        self._subs.append(await self._headers_only(s.events_stream, FAILED_CONSUMER))
        for subject in (*s.progress_subjects, *_state_subjects(s)):
            self._subs.append(await self.nc.subscribe(subject, cb=self._on_event))
        self._subs.append(await self.nc.subscribe(s.telemetry_leases("*"), cb=self._on_leases))
        return self

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):  # cleanup: the connection may be closing
                await sub.unsubscribe()
        self._subs = []

    async def _headers_only(self, stream: str, durable: str) -> Any:
        """The ``item.*`` results of ``stream`` without their payloads (see the module
        docstring): no acks, new messages only when first created (a restarted process
        resumes where it stopped). RESULTS holds done and dead, EVENTS only failed."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        items = self.s.item_terminal("*", "*")
        config = ConsumerConfig(
            durable_name=durable,
            deliver_group=durable,
            filter_subject=items,
            headers_only=True,
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.NEW,
            inactive_threshold=CONSUMER_IDLE_S,
        )
        return await self.nc.jetstream().subscribe(
            items,
            queue=durable,  # nats-py: a queue subscription's durable is the queue
            durable=durable,
            stream=stream,
            config=config,
            cb=self._on_item,
            manual_ack=True,
        )

    # -- counters ---------------------------------------------------------------------------
    async def _on_item(self, msg: Any) -> None:
        kind = msg.subject.rsplit(".", 3)[-3]
        if kind == "done":
            self.done.add(1)
        elif kind == "dead":
            self.dead.add(1)
        elif kind == "failed":
            self.failed.add(1)
            return
        else:
            return
        self._record_duration(msg, kind)

    def _record_duration(self, msg: Any, outcome: str) -> None:
        try:
            seconds = float((msg.headers or {})[ev.DURATION_HEADER])
        except (KeyError, ValueError):
            return  # no duration known (recorded by the janitor, or an older agent)
        self.duration.record(seconds, {"outcome": outcome})

    async def _on_leases(self, msg: Any) -> None:
        try:
            report = _lease_ages.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        key = (report.workflow_id, report.agent)
        self._leases[key] = (report.oldest_s, report.in_flight, time.monotonic())

    # -- state from events ------------------------------------------------------------------
    async def _on_event(self, msg: Any) -> None:
        try:
            event = ev.decode(msg.data)
        except ev.BadEvent:
            return
        wf = event.workflow_id
        if isinstance(event, ev.Progress):
            if event.phase == "mapping":
                if wf not in self._lanes:
                    self._lanes[wf] = await self._lane(wf)
                self._progress[wf] = event
            else:
                self._progress.pop(wf, None)
        elif isinstance(event, ev.WorkflowPlanned):
            self.enqueued.add(event.total)
        elif isinstance(event, ev.WorkflowReopened):
            self.enqueued.add(event.retried)
        elif isinstance(event, ev.AgentLaunched):
            self._agents[(wf, event.phase)] = event.agents
        elif isinstance(event, ev.AgentExited):
            self._agents[(wf, event.phase)] = event.remaining
        elif isinstance(event, ev.CircuitChanged):
            self._circuits[(wf, event.agent)] = event.state
        elif isinstance(event, ev.MapComplete):
            self._agents.pop((wf, "map"), None)
            self._forget(wf, agents=False)
        elif isinstance(event, ev.ReduceCompleted | ev.ReduceFailed):
            self._agents.pop((wf, "reduce"), None)
        elif msg.subject.rsplit(".", 2)[-2] in TERMINAL_EVENTS:
            self._forget(wf, agents=True)

    def _forget(self, wf: str, *, agents: bool) -> None:
        self._progress.pop(wf, None)
        self._lanes.pop(wf, None)
        for key in [k for k in self._circuits if k[0] == wf]:
            del self._circuits[key]
        for lease_key in [k for k in self._leases if k[0] == wf]:
            del self._leases[lease_key]
        if agents:
            for key in [k for k in self._agents if k[0] == wf]:
                del self._agents[key]

    async def _lane(self, wf: str) -> str:
        if self.state is None:
            return PRIORITY_LANES["normal"]
        try:
            spec = await self.state.get_spec(wf)
        except Exception:
            spec = None
        priority = spec.options.priority if spec is not None else "normal"
        return PRIORITY_LANES.get(priority, PRIORITY_LANES["normal"])

    # -- observable callbacks (run at collection, on the scraping thread or task) -----------
    def _queue(self, field: str) -> list[Any]:
        from opentelemetry.metrics import Observation

        per_lane: dict[str, int] = dict.fromkeys(PRIORITY_LANES.values(), 0)
        for wf, progress in list(self._progress.items()):
            lane = self._lanes.get(wf, PRIORITY_LANES["normal"])
            per_lane[lane] = per_lane.get(lane, 0) + int(getattr(progress, field))
        return [Observation(n, {"lane": lane}) for lane, n in per_lane.items()]

    def _lease_age(self, _options: Any) -> list[Any]:
        from opentelemetry.metrics import Observation

        now = time.monotonic()
        per_lane: dict[str, float] = dict.fromkeys(PRIORITY_LANES.values(), 0.0)
        for (wf, agent), (oldest_s, held, at) in list(self._leases.items()):
            if now - at > LEASE_REPORT_STALE_S:
                self._leases.pop((wf, agent), None)
                continue
            if held:
                lane = self._lanes.get(wf, PRIORITY_LANES["normal"])
                per_lane[lane] = max(per_lane.get(lane, 0.0), oldest_s + (now - at))
        return [Observation(round(age, 3), {"lane": lane}) for lane, age in per_lane.items()]

    def _workflows(self, _options: Any) -> list[Any]:
        from opentelemetry.metrics import Observation

        return [Observation(len(self._progress))]

    def _active_agents(self, _options: Any) -> list[Any]:
        from opentelemetry.metrics import Observation

        per_phase: dict[str, int] = defaultdict(int, {"setup": 0, "map": 0, "reduce": 0})
        for (_wf, phase), n in list(self._agents.items()):
            per_phase[phase] += max(0, n)
        return [Observation(n, {"phase": phase}) for phase, n in per_phase.items()]

    def _circuit_states(self, _options: Any) -> list[Any]:
        from opentelemetry.metrics import Observation

        per_state = {"open": 0, "half_open": 0}
        for state in list(self._circuits.values()):
            if state in per_state:
                per_state[state] += 1
        return [Observation(n, {"state": state}) for state, n in per_state.items()]


def _state_subjects(s: Subjects) -> list[str]:
    return [
        s.workflow("planned", "*"),
        s.workflow("reopened", "*"),
        *s.workflow_ends("*"),
        s.agent("launched", "*"),
        s.agent("exited", "*"),
        s.agent("circuit", "*"),
        s.map("complete", "*"),
        s.reduce("completed", "*"),
        s.reduce("failed", "*"),
    ]
