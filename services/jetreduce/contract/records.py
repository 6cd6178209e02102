"""State records kept in KV buckets: the workflow record (counters and phase, never per-item
state; peers.md §0.1) and the stored spec.

Phase changes go through compare-and-set on the KV revision, so two services (or a restarted
one) racing on the same transition cannot both win.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec

from jetreduce.contract.events import MapComplete, SubmitOptions
from jetreduce.contract.subjects import TERMINAL_EVENTS
from jetreduce.contract.workflow.model import Workflow

__all__ = [
    "Phase",
    "PhaseClaim",
    "StoredSpec",
    "WorkflowRecord",
    "counted_complete",
    "needs_reduce",
]


class Phase(StrEnum):
    ACCEPTED = "accepted"
    SETUP = "setup"
    PLANNING = "planning"
    MAPPING = "mapping"
    REDUCING = "reducing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def order(self) -> int:
        return _ORDER.index(self)


_ORDER = list(Phase)
_TERMINAL = frozenset(Phase(event) for event in TERMINAL_EVENTS)


class WorkflowRecord(msgspec.Struct, kw_only=True):
    workflow_id: str
    name: str
    phase: Phase
    created_ts: float
    updated_ts: float
    total: int | None = None
    done: int = 0
    dead: int = 0
    max_parallel: int = 1
    reason: str = ""
    reduce_output: str = ""
    finished_ts: float | None = None
    map_counted: bool = False
    """The aggregator counted every item of the map terminal (``done`` and ``dead`` are that
    count) and stores ``map.complete`` next; cleared when a DLQ retry reopens the map. See
    :func:`counted_complete`."""


def counted_complete(record: WorkflowRecord | None, complete: MapComplete) -> bool:
    """Whether the record vouches for ``complete``: the aggregator wrote the same counts
    into it, after its exact count, before storing the event. Anyone allowed to publish
    events could store a false ``map.complete``, but only services write records, so one
    that agrees with its record needs no second count of the results: that count is
    O(items) on the server, and 200 agents and the launcher counting at once held every
    JetStream API request for seconds before the reduce could start (issue 18). One that
    does not agree is counted, as before."""
    return (
        record is not None
        and record.map_counted
        and (record.total, record.done, record.dead)
        == (complete.total, complete.done, complete.dead)
    )


class StoredSpec(msgspec.Struct, kw_only=True):
    """What agents need to run a workflow: the normalised spec, the options and, once setup
    has run, its captured variables."""

    workflow: Workflow
    options: SubmitOptions
    captures: dict[str, str] = msgspec.field(default_factory=dict)


def needs_reduce(spec: StoredSpec, total: int) -> bool:
    """Whether a workflow whose map ended with ``total`` items runs a reduce: it has reduce
    steps and at least one item (Prodigy: no work items skips map and reduce). The launcher
    starts the reduce agent exactly when this holds; the aggregator completes the workflow
    at ``map.complete`` exactly when it does not."""
    reduce = spec.workflow.reduce
    return reduce is not None and bool(reduce.steps) and total > 0


class PhaseClaim(msgspec.Struct, kw_only=True):
    """Who runs a workflow's setup or reduce steps now (runtime/claim.py). Written only with
    create-only or revision-checked writes, so of two agents racing for it one wins."""

    holder: str
    """``host/pid`` of the agent that holds it."""
    host: str
    pid: int
    boot: str = ""
    """The holder process's start time as the kernel gives it (``/proc/<pid>/stat``): with the
    pid, names the process, so a successor on the same host can tell it is gone even if
    the pid was reused."""
    attempt: int
    """Runs of the phase's steps so far, this one included."""
    expires_ts: float
    """Wall-clock time after which a successor may take the claim (renewed before then)."""
    released: bool = False
    """Handed back without an outcome (SIGTERM): a successor takes it at once."""
