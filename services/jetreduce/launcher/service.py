"""Launcher service: see the package docstring.

**One leader among replicas** (runtime/leadership.py). Every launcher replica follows the
workflow records (:class:`MappingRecords`), but only the one holding the launcher's lease
acts: consumes the launcher's events, admits workflows, starts and stops agents, runs the
reconciler and (through the backend) the Kubernetes poller. Every action asks
:meth:`Leadership.may_act` first (the fence), and the backend asks it before it relaunches a
Job or restarts an agent. A standby does not pull from the durable ``launcher`` consumer at
all, so no event is acked and dropped by a replica that would not act on it: the events
wait in the consumer for the leader. A new leader does not rely on them either: its term
starts with a full reconciliation from JetStream (records, specs, stored phase events) and
the backend (Kubernetes Jobs), so events the dead leader had pulled but not acked (they
come back after the consumer's ack wait) change nothing it has not already done.

Agents of a dead leader: local agents die with their launcher's process
(runtime/orphans.py ``die_with_parent``), so a new leader on another process counts none
of them; a leader that loses its lease while alive stops its agents within the lease's
safety margin, before a successor may take over. Kubernetes Jobs outlive their launcher:
the new leader's first admission waits for a full listing (``backend.sync()``), so their
slots count as used, never as free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from nats.aio.msg import Msg

from jetreduce.contract.events import (
    AgentExited,
    AgentLaunched,
    JobStatus,
    MapComplete,
    PodFailed,
    decode_as,
    encode,
)
from jetreduce.contract.records import Phase, StoredSpec, WorkflowRecord, needs_reduce
from jetreduce.contract.subjects import TERMINAL_EVENTS
from jetreduce.launcher.admission import Candidate, admit
from jetreduce.launcher.backend import AgentBackend, Stops
from jetreduce.launcher.completion import map_is_complete, stored_map_complete
from jetreduce.launcher.mapping import MappingRecords
from jetreduce.launcher.reported import Reported
from jetreduce.runtime.leadership import LEASE_TTL_S, Leadership, NotLeader
from jetreduce.runtime.publish import is_stored, publish_retrying
from jetreduce.runtime.service import EventConsumer, Retry, ServiceContext
from jetreduce.runtime.state import StateStore

__all__ = ["Launcher"]

log = logging.getLogger(__name__)

RECONCILE_EVERY_S = 15.0
AGING_S = 300.0
"""Waiting this long lifts a workflow one priority lane (launcher/admission.py)."""
RECORDS_READY_S = 30.0
"""Longest wait (s) for the first full read of the workflow records before an admission with
a slot cap; past it the event is redelivered (or the reconciler tries again)."""
LEASE_TTL_ENV = "JETREDUCE_LAUNCHER_LEASE_TTL_S"
"""The launcher lease's time to live (default ``LEASE_TTL_S``, 10 s): how long a standby
waits for a leader that vanished without trace (another host; a frozen process)."""
STEP_DOWN_GRACE_S = 1.0
"""A leader that lost its lease gives its local agents this long to hand their items back
(SIGTERM) before it kills them: well inside the lease's safety margin (3 s)."""
SHUTDOWN_GRACE_S = 10.0
"""A stopping leader (SIGTERM) gives its agents this long; it renews its lease meanwhile."""
LEADER_WORK_BOUND_S = 1.0
"""After its term ends, how long a leader lets an event handler in flight finish (each of
its actions is fenced) before it is cancelled and the agents are stopped."""


class Launcher:
    """Starts each phase's agents. ``max_slots`` caps the map agent slots of all workflows
    together (None: no cap); waiting workflows are admitted by priority (admission.py)."""

    def __init__(
        self,
        ctx: ServiceContext,
        backend: AgentBackend,
        *,
        max_slots: int | None = None,
        aging_s: float = AGING_S,
        leadership: Leadership | None = None,
    ) -> None:
        """``leadership``: this replica's lease (default: the installation's launcher lease,
        held as ``host/pid``, see runtime/leadership.py; tests running two launchers in one
        process pass their own)."""
        if max_slots is not None and max_slots < 1:
            raise ValueError(f"max_slots must be at least 1, got {max_slots}")
        self.ctx = ctx
        self.s = ctx.subjects
        self.backend = backend
        self.state = StateStore(ctx.js, ctx.subjects)
        self.max_slots = max_slots
        self.aging_s = aging_s
        self._admitting = asyncio.Lock()
        self.mapping = MappingRecords(self.state)
        self.leadership = leadership or Leadership(
            ctx.js,
            self.s.claims_bucket,
            self.s.claim_key("leader", "launcher"),
            name="launcher",
            ttl_s=float(os.environ.get(LEASE_TTL_ENV, "") or LEASE_TTL_S),
        )
        self.reported = Reported(ctx.js, self.s)
        backend.on_exit = self._on_agent_exit
        backend.on_status = self._on_status
        backend.may_act = self.leadership.may_act
        backend.earlier_failures = self.reported.earlier_pods
        backend.on_released = self._slots_freed
        self.stops = Stops(backend, self._stopped)
        """Agents being stopped in the background (a map's after ``map.complete``, all of a
        workflow's after its end): nothing waits for them, their map slots stay counted
        until they are gone."""
        self._winding_down = False
        """Set while a term ends: stops that return then admit nobody."""
        self.reconciles = 0
        """Full reconciliations done (the first of a term is its take-over)."""

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the records (every replica), and act while this replica leads."""
        try:
            loops = [self.leadership.run(stop, self._lead)]
            if self.max_slots is not None:
                loops.insert(0, self.mapping.watch(stop))  # first: admissions wait for it
            await asyncio.gather(*loops)
        finally:
            await self.backend.stop_all()

    async def _lead(self, term: asyncio.Event) -> None:
        """One term as leader: consume the events and reconcile (at once: the view is
        rebuilt from JetStream, never inherited) until ``term`` ends; then stop this
        process's agents (quickly if the lease was lost: a successor may start soon)."""
        self._winding_down = False
        self.mapping.complete.clear()  # re-learnt from the stored events as admissions ask
        self.reported.reset()  # likewise the status reports (launcher/reported.py)
        work: asyncio.Future[Any] = asyncio.gather(self._consume(term), self._reconciler(term))
        ended: asyncio.Future[Any] = asyncio.ensure_future(term.wait())
        try:
            await asyncio.wait({work, ended}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                work.result()  # raises what ended it; returning early is the caller's error
                return
            with contextlib.suppress(TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(work), LEADER_WORK_BOUND_S)
        finally:
            ended.cancel()
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
            lost = not self.leadership.claim.left()
            self._winding_down = True
            if not lost:  # a stopping leader lets its stops finish (briefly)
                await self.stops.wait(LEADER_WORK_BOUND_S)
            await self.stops.cancel()  # what they had not stopped, stop_all does
            await self.backend.stop_all(STEP_DOWN_GRACE_S if lost else SHUTDOWN_GRACE_S)

    async def _consume(self, term: asyncio.Event) -> None:
        filters = [
            self.s.workflow("accepted", "*"),
            self.s.workflow("planned", "*"),
            self.s.workflow("reopened", "*"),
            self.s.map("complete", "*"),
            *self.s.workflow_ends("*"),
        ]
        consumer = EventConsumer(
            self.ctx,
            stream=self.s.events_stream,
            durable="launcher",
            filters=filters,
            handler=self.on_event,
        )
        await consumer.run(term)

    async def _reconciler(self, stop: asyncio.Event) -> None:
        """Re-drive on start and periodically: a launcher that restarted (or a ``run`` that
        is resumed) has no agents, so every unfinished phase gets its agents back. Launching
        is idempotent, so racing the event handlers is harmless."""
        while not stop.is_set():
            try:
                await self.reconcile()
                self.reconciles += 1
            except NotLeader:
                return  # the term is ending: the next leader reconciles
            except Exception:
                log.exception("launcher: reconcile failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), RECONCILE_EVERY_S)

    async def reconcile(self) -> None:
        for record in await self.state.list():
            if record.phase.terminal:
                continue
            wf = record.workflow_id
            spec = await self.state.get_spec(wf)
            if spec is None:
                continue
            if record.phase in (Phase.ACCEPTED, Phase.SETUP):
                if not await self._stored(self.s.setup("completed", wf)):
                    await self._launch(wf, "setup", [1], spec)
            elif record.phase == Phase.REDUCING:
                if self.backend.running(wf, "map") and not self.stops.stopping(wf, "map"):
                    # map agents left by a stop cut short (a term ended midway)
                    self.stops.start(wf, "map", self._held(wf, self._planned(record)))
                if not await self._stored(self.s.reduce("completed", wf)):
                    await self._launch(wf, "reduce", [1], spec)
            elif record.phase == Phase.MAPPING and record.total:
                await self._stored_map_complete(record, spec)
        await self.admit_maps()

    async def admit_maps(self, changed: str | None = None) -> None:
        """Start the map agents of every mapping workflow that may have them now: all of
        them without a slot cap, else by priority while slots are free. ``changed`` names
        the workflow an event was about: without a cap, it is the only one to look at; with
        one, it is the only record read (the others come from :class:`MappingRecords`)."""
        self.leadership.check()  # before sync(): a standby's poller does not list
        records = await self._admission_records(changed)
        async with self._admitting:
            await self.backend.sync()  # a restarted launcher must see what still runs
            used = self.stops.slots()  # map agents of completed maps (or ended workflows) exiting
            waiting: list[Candidate] = []
            read: dict[str, StoredSpec] = {}  # specs read for priorities, reused to launch
            for record in records:
                if record.phase != Phase.MAPPING or not record.total:
                    continue
                wf = record.workflow_id
                slots = self._planned(record)
                if self.backend.running(wf, "map"):
                    used += self._held(wf, slots)
                    continue
                if wf in self.mapping.complete or self._stopping(wf):
                    continue  # (a map reopened while its last agents are being stopped:
                    # admitted once they are, so that no new Job meets the old one)
                priority = await self._priority(wf, read)
                if priority is not None:
                    waiting.append(Candidate(wf, priority, record.created_ts, slots))
            free = None if self.max_slots is None else max(0, self.max_slots - used)
            admitted, specs = await self._admit(waiting, free, read)
            for c in admitted:
                await self._launch(
                    c.workflow_id, "map", self.backend.plan(c.slots), specs[c.workflow_id]
                )
            if len(admitted) < len(waiting):
                log.info(
                    "%d workflow(s) wait for agent slots (%d of %s in use)",
                    len(waiting) - len(admitted),
                    used + sum(c.slots for c in admitted),
                    self.max_slots,
                )

    async def _map_slots(self, wf: str) -> int:
        """Map slots ``wf``'s agents hold now (0 without map agents)."""
        if not self.backend.running(wf, "map"):
            return 0
        held = self.backend.held(wf, "map")
        if held is not None:
            return held
        record = await self.state.get(wf)
        return self._planned(record) if record is not None else self.max_slots or 0

    def _planned(self, record: WorkflowRecord) -> int:
        """The map slots a workflow is admitted with (its ``max_parallel``, capped)."""
        return min(record.max_parallel, self.max_slots or record.max_parallel)

    def _held(self, wf: str, planned: int) -> int:
        """Slots ``wf``'s map agents hold now: fewer than ``planned`` once some drained
        (their queue ran dry and they left early); ``planned`` when the backend cannot tell,
        and at most ``planned`` (a backend's rounding up of pods is not charged)."""
        held = self.backend.held(wf, "map")
        return planned if held is None else min(held, planned)

    async def _slots_freed(self, wf: str, phase: str) -> None:
        """A map agent of ``wf`` left early (drained: the backend's ``on_released``): with a
        slot cap, waiting workflows may be admitted at once, not at the next event."""
        if phase == "map" and self.max_slots is not None:
            await self._admit_quietly(wf)

    async def _stopped(self, wf: str, phase: str | None) -> None:
        """A background stop (:class:`Stops`) returned: with a slot cap, the slots are free;
        and a map reopened meanwhile (a DLQ retry) gets its agents now (admission skips it
        while its old agents are being stopped, so that no new Job meets the old one)."""
        if phase in ("map", None) or self.max_slots is not None:
            await self._admit_quietly(wf)

    def _stopping(self, wf: str) -> bool:
        """Whether ``wf``'s map agents (alone, or with the rest) are being stopped."""
        return self.stops.stopping(wf, "map") or self.stops.stopping(wf, None)

    async def _admit_quietly(self, wf: str) -> None:
        """:meth:`admit_maps` from a callback: never raises (the next event, leader or
        reconcile admits instead)."""
        if self._winding_down or not self.leadership.may_act():
            return
        try:
            await self.admit_maps(wf)
        except (NotLeader, Retry):
            pass
        except Exception:
            log.exception("launcher: admission after %s's agents left failed", wf)

    async def _admission_records(self, changed: str | None) -> list[WorkflowRecord]:
        """Without a cap: ``changed`` alone, else every record. With one: the mapping
        workflows as watched (after reading ``changed`` itself, which the watch may not
        have delivered yet), or every record when not running as a service (no watch)."""
        if self.max_slots is None or not self.mapping.watching:
            if changed is not None and self.max_slots is None:
                record = await self.state.get(changed)
                return [record] if record is not None else []
            return await self.state.list()
        try:
            await asyncio.wait_for(self.mapping.ready.wait(), RECORDS_READY_S)
        except TimeoutError:
            raise Retry("the workflow records have not been read yet") from None
        if changed is not None:
            await self.mapping.refresh(changed)
        return self.mapping.records()

    async def _priority(self, wf: str, read: dict[str, StoredSpec]) -> str | None:
        """The workflow's priority (read from its spec once while it maps, the spec kept in
        ``read``); None without a spec."""
        priority = self.mapping.priority.get(wf)
        if priority is None:
            spec = await self.state.get_spec(wf)
            if spec is None:
                return None
            read[wf] = spec
            priority = spec.options.priority
            if self.max_slots is not None and self.mapping.watching:
                self.mapping.priority[wf] = priority
        return priority

    async def _admit(
        self, waiting: list[Candidate], free: int | None, read: dict[str, StoredSpec]
    ) -> tuple[list[Candidate], dict[str, StoredSpec]]:
        """:func:`admit`, leaving out workflows whose map turns out complete (a restarted
        launcher, or the moment between ``map.complete`` and the move to reducing): only
        those chosen are checked, so the cost follows the launches, not the waiting line.
        Specs already in ``read`` (this admission's) are not read again."""
        while True:
            chosen = admit(waiting, free, time.time(), self.aging_s)
            specs: dict[str, StoredSpec] = {}
            done: set[str] = set()
            for c in chosen:
                wf = c.workflow_id
                spec = read.get(wf) or await self.state.get_spec(wf)
                if spec is None or await self._stored(self.s.map("complete", wf)):
                    done.add(wf)
                    if spec is not None and self.mapping.watching:
                        self.mapping.complete.add(wf)
                else:
                    specs[wf] = spec
            if not done:
                return chosen, specs
            waiting = [c for c in waiting if c.workflow_id not in done]

    async def _stored(self, subject: str) -> bool:
        return await is_stored(self.ctx.js, self.s.events_stream, subject)

    async def on_event(self, msg: Msg) -> None:
        """Handle one event, if this replica leads (else it goes back for the leader)."""
        try:
            self.leadership.check()
            await self._on_event(msg)
        except NotLeader:
            raise Retry("this launcher no longer leads", delay_s=1.0) from None

    async def _on_event(self, msg: Msg) -> None:
        kind = ".".join(msg.subject.split(".")[-3:-1])
        wf = msg.subject.rsplit(".", 1)[-1]
        if kind.startswith("workflow.") and kind.split(".")[1] in TERMINAL_EVENTS:
            self.leadership.check()
            # In the background (the next workflow's events need not wait for these agents
            # to exit); map agents of a cancelled or failed map keep their slots until gone,
            # and once they are, waiting workflows are admitted (Stops' ``after``).
            self.stops.start(wf, None, await self._map_slots(wf))
            self.reported.forget(wf)
            return
        record = await self.state.get(wf)
        spec = await self.state.get_spec(wf)
        if record is None or spec is None or record.phase.terminal:
            return
        if kind == "workflow.accepted":
            if record.phase.order > Phase.SETUP.order:
                return
            await self.state.transition(wf, Phase.SETUP)
            await self._launch(wf, "setup", [1], spec)
        elif kind in ("workflow.planned", "workflow.reopened"):
            self.mapping.complete.discard(wf)  # a reopened map is not complete any more
            await self.admit_maps(wf)
        elif kind == "map.complete":
            complete = decode_as(msg.data, MapComplete, subject=msg.subject)
            await self._map_complete(wf, record, spec, complete, msg.metadata.sequence.stream)

    async def _map_complete(
        self, wf: str, record: WorkflowRecord, spec: StoredSpec, complete: MapComplete, seq: int
    ) -> None:
        """A stored ``map.complete`` (stream sequence ``seq``): stop the map agents (in the
        background: the reduce needs the map complete, not its agents gone; their slots stay
        counted until they are) and start the reduce. From the event, or from the reconciler
        when the workflow still maps (the leader that pulled the event died before handling
        it). Idempotent: a second delivery starts no second stop or reduce."""
        if not await map_is_complete(self.ctx, record, complete, seq):
            return
        self.leadership.check()
        self.stops.start(wf, "map", self._held(wf, self._planned(record)))
        if self.max_slots is not None:
            self.mapping.complete.add(wf)
            await self.admit_maps(wf)
        if not needs_reduce(spec, complete.total):
            return
        await self.state.transition(wf, Phase.REDUCING)
        await self._launch(wf, "reduce", [1], spec)

    async def _stored_map_complete(self, record: WorkflowRecord, spec: StoredSpec) -> None:
        """Reconciler: a mapping workflow whose ``map.complete`` is stored is handled as the
        event would be (idempotent), instead of waiting for its redelivery."""
        stored = await stored_map_complete(self.ctx, record.workflow_id)
        if stored is not None:
            await self._map_complete(record.workflow_id, record, spec, *stored)

    async def _launch(self, wf: str, phase: str, slots: list[int], spec: StoredSpec) -> None:
        self.leadership.check()  # the fence: no agent is started on an expiring lease
        refusal = self.backend.refusal(spec)
        if refusal is not None:
            # Not run elsewhere instead: the final agent.exited fails the workflow with why
            # (repeated by the reconciler until the aggregator has done so; it acts once).
            log.warning("workflow %s: %s agents %s", wf, phase, refusal)
            await self._on_agent_exit(wf, phase, -1, -1, False, 0, refusal)
            return
        started = await self.backend.launch(wf, phase, slots, spec)
        if started:
            log.info("workflow %s: launched %d %s agent(s)", wf, started, phase)
            await publish_retrying(
                self.ctx.js,
                self.s.agent("launched", wf),
                encode(
                    AgentLaunched(
                        workflow_id=wf,
                        phase=phase,
                        agents=started,
                        slots=sum(slots),
                        backend=self.backend.name,
                    )
                ),
            )

    async def _on_agent_exit(
        self,
        wf: str,
        phase: str,
        index: int,
        code: int,
        restarted: bool,
        remaining: int,
        reason: str = "",
    ) -> None:
        if not self.leadership.may_act():
            log.info("workflow %s: %s agent %d exit not reported (not leading)", wf, phase, index)
            return
        await publish_retrying(
            self.ctx.js,
            self.s.agent("exited", wf),
            encode(
                AgentExited(
                    workflow_id=wf,
                    phase=phase,
                    index=index,
                    exit_code=code,
                    restarted=restarted,
                    remaining=remaining,
                    reason=reason,
                )
            ),
        )

    async def _on_status(self, event: JobStatus | PodFailed) -> None:
        """Publish a backend's Job/pod status as ``agent.job.<wf>`` / ``agent.pod_failed.<wf>``
        (the event's tag names its subject)."""
        if not self.leadership.may_act():
            return  # a standby's poller is stopped; this is a leader stepping down
        if await self.reported.stored(event):
            return  # reported by an earlier leader (or this one in an earlier term)
        kind = "job" if isinstance(event, JobStatus) else "pod_failed"
        try:
            await publish_retrying(
                self.ctx.js, self.s.agent(kind, event.workflow_id), encode(event)
            )
        except BaseException:
            self.reported.unmark(event)
            raise
