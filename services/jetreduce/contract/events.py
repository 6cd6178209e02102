"""Event payloads: one msgspec Struct per event type, tagged by ``type`` on the wire.

Every payload is JSON with ``type``, ``workflow_id``, ``ts`` (Unix seconds) and ``v`` (schema
version), so ``nats sub '>'`` is readable by a person. Decoding goes through :func:`decode`,
which turns any malformed payload into :class:`BadEvent` instead of an exception escaping a
service loop (invariant 5: bad input yields a clear error, never a crash).

"Malformed" covers more than the JSON shape: services build subjects and KV keys from a decoded
event's ``workflow_id`` and item ``index``, so :func:`decode` also refuses a ``workflow_id`` that
is not a subject token (``a.b``, ``*``, ``>``, spaces, unicode, empty, over 80 characters) and a
negative or over-64-bit index. ``workflow.submit`` is the exception for the id: it may be empty
(the planner assigns one), and the planner checks it itself so that its rejection can name the
field.
"""

from __future__ import annotations

import time
from typing import Any, TypeVar

import msgspec

from jetreduce.contract.errors import PermanentError
from jetreduce.contract.subjects import MAX_INDEX, is_token

__all__ = [
    "DURATION_HEADER",
    "INLINE_ITEM_LIMIT",
    "REPLY_HEADER",
    "SCHEMA_VERSION",
    "WORKSPACES",
    "AgentExited",
    "AgentLaunched",
    "AgentUsage",
    "BadEvent",
    "CircuitChanged",
    "Event",
    "ItemDead",
    "ItemDone",
    "ItemFailed",
    "JobStatus",
    "LeaseAges",
    "MapComplete",
    "MapFailed",
    "PodFailed",
    "Problem",
    "Progress",
    "QueueStatus",
    "ReduceCompleted",
    "ReduceFailed",
    "ReduceRestarted",
    "ReduceStarted",
    "SetupCompleted",
    "SetupFailed",
    "SetupRestarted",
    "SubmitOptions",
    "SubmitReply",
    "WorkItem",
    "WorkflowAccepted",
    "WorkflowCancelRequested",
    "WorkflowCancelled",
    "WorkflowCompleted",
    "WorkflowFailed",
    "WorkflowPlanned",
    "WorkflowRejected",
    "WorkflowReopened",
    "WorkflowRetryRequested",
    "WorkflowSubmit",
    "WorkflowTimedOut",
    "decode",
    "decode_as",
    "encode",
    "now",
]

SCHEMA_VERSION = 1
DURATION_HEADER = "Jetreduce-Duration"
"""Header of ``item.done`` / ``item.dead`` carrying the attempt's ``duration_s``: a metrics
reader takes it from a headers-only consumer instead of fetching the whole result."""
REPLY_HEADER = "Jetreduce-Reply"
"""Header of a ``workflow.submit`` naming an inbox: the planner answers the submission there
(JetStream keeps no reply subjects, so request/reply over a stored subject needs this)."""
MAX_TEXT = 64 * 1024
"""Longest captured output / error text carried inline in an event (bytes of UTF-8)."""


def now() -> float:
    return time.time()


class _Base(msgspec.Struct, kw_only=True, tag_field="type"):
    workflow_id: str
    ts: float = msgspec.field(default_factory=now)
    v: int = SCHEMA_VERSION


# -- submission ------------------------------------------------------------------------------
class SubmitOptions(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How to run a submitted workflow. Never carries secrets: only names and settings."""

    workdir: str | None = None
    """Directory the setup, map and reduce commands run in (local backend)."""
    max_parallel: int | None = None
    """Overrides ``map.max_parallel``."""
    priority: str = "normal"
    backend: str = "local"
    vars: dict[str, str] = msgspec.field(default_factory=dict)
    """Values of ``$VAR`` references the submitter resolved from its own environment."""
    max_attempts: int | None = None
    timeout_s: float | None = None
    """The whole workflow's time budget; past it the workflow ends as timed out."""
    lease_s: float | None = None
    """How long an item stays leased without a heartbeat (agents beat at a third of it)."""
    queue: str | None = None
    """Item queue URL (``jetstream``, ``redis://…``, ``sqs://…``); None: the installation's."""
    args: list[str] = msgspec.field(default_factory=list)
    """Positional arguments (``--args``): ``$1`` / ``${ARG_1}`` and env ``ARG_1`` in steps."""
    profile: str | None = None
    """The workflow ``profiles:`` entry whose variables apply (``--profile``)."""
    workspace: str = "agent"
    """Where map items run (one of :data:`WORKSPACES`; ``--workspace``): ``agent``, a
    directory of each agent's own (a git worktree in a repository, else a copy of the
    workflow directory); ``item``, a git worktree per item (``--worktrees``); ``shared``,
    the workflow directory itself. Setup and reduce always run in the workflow directory."""
    namespace: str | None = None
    """Kubernetes namespace of the workflow's Jobs; None: the installation's. The launcher
    runs it only in a namespace its installation allows, else the workflow fails saying so."""
    image: str | None = None
    """Agent image of the workflow's pods (kubernetes); None: the installation's."""
    input_upload: bool = False
    """The submitter uploaded the ``map.input`` file as ``contract.objects.input_upload_object``:
    agents that do not share its disk (pods) read the input from there when their working
    directory lacks the file. A flag, not a name, so no submission can point an agent (or the
    janitor's cleanup) at another workflow's object. Deleted with the workflow's other
    objects."""


WORKSPACES: tuple[str, ...] = ("agent", "item", "shared")
"""The values of ``SubmitOptions.workspace``."""


class WorkflowSubmit(_Base, tag="workflow.submit", kw_only=True):
    """Publish to ``workflow.submit``. ``workflow`` is the workflow file's YAML text (or a JSON
    object of the same shape); the planner validates it and answers accepted or rejected."""

    workflow: str | dict[str, Any]
    workflow_id: str = ""
    """Optional: the planner assigns ``wf-<sequence>`` when empty."""
    options: SubmitOptions = msgspec.field(default_factory=SubmitOptions)
    source: str = "<submit>"


class Problem(msgspec.Struct, kw_only=True):
    path: str
    message: str
    line: int | None = None
    column: int | None = None
    severity: str = "error"


class SubmitReply(msgspec.Struct, kw_only=True):
    workflow_id: str
    accepted: bool
    problems: list[Problem] = msgspec.field(default_factory=list)


class WorkflowAccepted(_Base, tag="workflow.accepted", kw_only=True):
    name: str
    warnings: list[Problem] = msgspec.field(default_factory=list)


class WorkflowRejected(_Base, tag="workflow.rejected", kw_only=True):
    problems: list[Problem]


# -- phases ----------------------------------------------------------------------------------
class SetupCompleted(_Base, tag="setup.completed", kw_only=True):
    captures: dict[str, str] = msgspec.field(default_factory=dict)
    input_object: str
    """Object-store name holding the raw map input (file bytes or command stdout)."""
    input_is_command: bool = False
    input_bytes: int = 0


class SetupFailed(_Base, tag="setup.failed", kw_only=True):
    error: str
    exit_code: int | None = None


class WorkflowPlanned(_Base, tag="workflow.planned", kw_only=True):
    total: int
    max_parallel: int


class AgentLaunched(_Base, tag="agent.launched", kw_only=True):
    phase: str
    agents: int
    slots: int
    backend: str


class AgentExited(_Base, tag="agent.exited", kw_only=True):
    phase: str
    index: int
    exit_code: int
    restarted: bool
    remaining: int = 0
    """Agents of this phase still running (or to be restarted) after this exit."""
    reason: str = ""
    """Why the backend gives up on the phase (with ``restarted=False, remaining=0``), for the
    workflow's failure message: a Job that failed as a whole, agents it could not start.
    Empty when it says nothing beyond the exit code."""


class AgentUsage(_Base, tag="agent.usage", kw_only=True):
    """What one map agent used of the slots it held (published by the agent as it leaves the
    phase: drained, at ``map.complete``, or stopped): the aggregator sums these into the
    workflow's utilisation (busy slot-seconds / held slot-seconds) for ``workflow.completed``.
    Stored on ``agent.usage.<wf>``; an agent restarted after a kill reports again under the
    same ``agent`` name with its own figures, so every report counts."""

    phase: str
    agent: str
    index: int
    slots: int
    held_s: float
    """Slot-seconds held: ``slots`` times the time from the agent's start to its leaving."""
    busy_s: float
    """Slot-seconds spent running items (each item's attempt, leased to decided)."""
    items: int = 0
    """Attempts this agent ran."""
    drained: bool = False
    """True when the agent left early because the queue ran dry (its slots handed back)."""


class PodFailed(_Base, tag="agent.pod_failed", kw_only=True):
    """A pod of a phase's Job ended in failure or was disrupted (kubernetes backend): the
    pod's own reason, as Kubernetes gives it: ``Evicted``, ``OOMKilled``, ``Error`` (see
    ``exit_code``), ``DeadlineExceeded``, a disruption such as ``EvictionByEvictionAPI``…
    Sent at most once per pod by a launcher (a restarted launcher may repeat one)."""

    phase: str
    job: str
    pod: str
    index: int
    """The pod's completion index (-1 if it has none)."""
    reason: str
    exit_code: int | None = None
    """The agent container's exit code; None when it never ran or ended without one."""
    disruption: bool = False
    """Evicted, preempted or drained: the Job retries the index without using its budget."""
    message: str = ""


class JobStatus(_Base, tag="agent.job", kw_only=True):
    """A phase's Job changed state (kubernetes backend): ``running`` (it has active pods),
    ``complete``, ``failed`` (with the Job's ``reason``: ``BackoffLimitExceeded``,
    ``DeadlineExceeded``…) or ``stopped`` (deleted by the launcher before it finished: its
    phase or workflow ended). Each at most once per Job and launcher."""

    phase: str
    job: str
    state: str
    active: int = 0
    succeeded: int = 0
    failed: int = 0
    reason: str = ""


class CircuitChanged(_Base, tag="agent.circuit", kw_only=True):
    """An agent's circuit breaker changed state: ``open`` (dispatch paused), ``half_open``
    (probing), ``closed`` (flowing)."""

    state: str
    agent: str
    consecutive_failures: int


class MapComplete(_Base, tag="map.complete", kw_only=True):
    total: int
    done: int
    dead: int


class QueueStatus(_Base, tag="agent.queue", kw_only=True):
    """An agent lost (``unavailable``, with the error) or regained (``available``) its item
    queue's backend (Redis, SQS). In between it backs off and retries; nothing is lost."""

    state: str
    agent: str
    queue: str
    """The backend's kind: ``jetstream``, ``redis`` or ``sqs`` (never its URL: it may hold
    credentials)."""
    error: str = ""


class LeaseAges(_Base, tag="agent.leases", kw_only=True):
    """An agent's leases, reported at each heartbeat on ``telemetry.leases.<wf>`` (core NATS,
    not stored): the metrics' lease age per lane comes from these, since no queue backend
    says when a message it delivered was leased."""

    agent: str
    in_flight: int
    oldest_s: float
    """Age of the agent's oldest lease (0 with none)."""


class MapFailed(_Base, tag="map.failed", kw_only=True):
    """An item's step failed and its ``on_failure`` said ``fail_workflow: true``: the map
    phase ends there and the workflow fails (the item itself is dead, without retries)."""

    index: int
    item_id: str
    error: str


class ReduceStarted(_Base, tag="reduce.started", kw_only=True):
    attempt: int = 1
    """Which run of the reduce steps this is: 1, then one more after each run that a crash
    (or a lost claim) interrupted. Stored once per attempt."""


class _Restarted(_Base, kw_only=True):
    """A phase run by one agent at a time (setup, reduce) starts again after a run that did
    not finish: the claim of the previous agent expired, was released, or its process is
    known dead. Its steps run a second time (at-least-once, docs/reliability.md)."""

    attempt: int
    previous: str
    """The agent that held the phase's claim before (``host/pid``)."""
    reason: str
    """``released`` (handed back on SIGTERM), ``dead`` (its process is gone) or ``expired``."""


class SetupRestarted(_Restarted, tag="setup.restarted", kw_only=True):
    pass


class ReduceRestarted(_Restarted, tag="reduce.restarted", kw_only=True):
    pass


class ReduceCompleted(_Base, tag="reduce.completed", kw_only=True):
    output: str
    duration_s: float


class ReduceFailed(_Base, tag="reduce.failed", kw_only=True):
    error: str
    exit_code: int | None = None
    output: str = ""


class WorkflowCompleted(_Base, tag="workflow.completed", kw_only=True):
    total: int
    done: int
    dead: int
    duration_s: float
    reduce_output: str = ""
    utilisation: float | None = None
    """Busy slot-seconds over held slot-seconds of the map agents (``agent.usage``); None
    when no map agent reported (no items, or reports not in when the workflow ended)."""
    busy_slot_s: float = 0.0
    held_slot_s: float = 0.0


class WorkflowFailed(_Base, tag="workflow.failed", kw_only=True):
    reason: str


class WorkflowCancelRequested(_Base, tag="workflow.cancel", kw_only=True):
    reason: str = "cancelled by user"


class WorkflowRetryRequested(_Base, tag="workflow.retry", kw_only=True):
    """``jetreduce dlq retry``: give these dead items another run (re-opening the workflow if
    it had ended; reduce then runs again once they are terminal)."""

    indices: list[int]


class WorkflowReopened(_Base, tag="workflow.reopened", kw_only=True):
    retried: int


class WorkflowCancelled(_Base, tag="workflow.cancelled", kw_only=True):
    reason: str


class WorkflowTimedOut(_Base, tag="workflow.timed_out", kw_only=True):
    timeout_s: float


# -- items -----------------------------------------------------------------------------------
INLINE_ITEM_LIMIT = 256 * 1024
"""Largest item (bytes of JSON) carried inside its work message. A bigger one is stored in
the object store and the message names it, so no item is too large to queue (the NATS
default ``max_payload`` is 1 MiB)."""


class WorkItem(_Base, tag="work.item", kw_only=True):
    """One unit of map work. ``index`` is its position after the pipeline (input order)."""

    index: int
    item: Any
    item_stored: bool = False
    """The item is larger than ``INLINE_ITEM_LIMIT``: ``item`` is null and its JSON is in
    the object store as ``item_object(workflow_id, index)`` (a flag, not a name, so no
    message can point an agent at another workflow's objects)."""


class ItemDone(_Base, tag="item.done", kw_only=True):
    index: int
    item_id: str
    output: str
    """The steps' output; its last ``MAX_TEXT`` bytes when larger (see ``output_stored``)."""
    exit_code: int
    duration_s: float
    attempts: int
    agent: str = ""
    output_stored: bool = False
    """The output exceeded ``MAX_TEXT``: the whole of it is in the object store as
    ``output_object(workflow_id, index)``, and reduce reads it from there."""


class ItemDead(_Base, tag="item.dead", kw_only=True):
    index: int
    item_id: str
    error: str
    error_type: str = "CommandFailed"
    """``CommandFailed``, ``Timeout``, ``CommitValidationFailed`` (a ``commit_required`` step
    made no commit), ``MergeConflict`` (the item's branch did not merge), ``WorktreeError``,
    ``AgentCrashed`` or ``Unknown``."""
    exit_code: int | None
    stderr_tail: str
    attempts: int
    duration_s: float = 0.0
    agent: str = ""
    item: Any = None
    log_object: str | None = None
    """Object-store name of the failed attempt's output (stdout and stderr tails)."""


class ItemFailed(_Base, tag="item.failed", kw_only=True):
    index: int
    item_id: str
    attempt: int
    error: str
    exit_code: int | None
    stderr_tail: str
    retry_in_s: float | None


class Progress(_Base, tag="progress", kw_only=True):
    phase: str
    total: int
    done: int
    dead: int
    in_flight: int
    pending: int
    rate_per_s: float
    eta_s: float | None


Event = (
    WorkflowSubmit
    | WorkflowAccepted
    | WorkflowRejected
    | SetupCompleted
    | SetupFailed
    | WorkflowPlanned
    | AgentLaunched
    | AgentExited
    | AgentUsage
    | PodFailed
    | JobStatus
    | CircuitChanged
    | QueueStatus
    | LeaseAges
    | MapComplete
    | MapFailed
    | ReduceStarted
    | ReduceRestarted
    | SetupRestarted
    | ReduceCompleted
    | ReduceFailed
    | WorkflowCompleted
    | WorkflowFailed
    | WorkflowCancelRequested
    | WorkflowRetryRequested
    | WorkflowReopened
    | WorkflowCancelled
    | WorkflowTimedOut
    | WorkItem
    | ItemDone
    | ItemDead
    | ItemFailed
    | Progress
)


class BadEvent(PermanentError, ValueError):
    """A payload that is not a valid event; carries a short, safe description."""


_decoder = msgspec.json.Decoder(Event)
_encoder = msgspec.json.Encoder()
T = TypeVar("T")


def encode(event: Any) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes, *, subject: str | None = None) -> Event:
    """Decode any event. Raises :class:`BadEvent` (only) on a malformed payload: bad JSON,
    invalid UTF-8 in a string, nesting deeper than msgspec's recursion limit, a wrong type or
    missing field, or an id that may not be placed in a subject (see the module docstring).

    ``subject``: the subject it was consumed from, one that ends with a workflow id
    (``workflow.cancel.<wf>``, ``map.complete.<wf>``…): an event about another workflow on
    it, or of another type than the subject names (a ``map.complete`` payload published on
    ``map.failed.<wf>``, which others may publish), is forged or misrouted, and is refused
    so it can act on neither."""
    try:
        event: Event = _decoder.decode(data)
    except (
        msgspec.DecodeError,
        msgspec.ValidationError,
        RecursionError,  # msgspec's depth limit, not ours: deep nesting is still bad input
        UnicodeDecodeError,  # msgspec raises it for invalid UTF-8 inside a string
    ) as exc:
        raise BadEvent(f"malformed event: {str(exc)[:256]}") from None
    _check_ids(event)
    if subject is not None:
        if subject.rsplit(".", 1)[-1] != event.workflow_id:
            raise BadEvent(f"{subject} carries an event of workflow {event.workflow_id[:100]!r}")
        kind = type(event).__struct_config__.tag
        if f".{kind}." not in f".{subject}":
            raise BadEvent(f"{subject} carries a {kind} event")
    return event


def _check_ids(event: Event) -> None:
    if not isinstance(event, WorkflowSubmit) and not is_token(event.workflow_id):
        shown = event.workflow_id[:100]
        raise BadEvent(
            f"malformed event: invalid workflow_id {shown!r} (1-80 characters of A-Z a-z 0-9 _ -)"
        )
    # Item indices become subject tokens (``item.done.<wf>.<index>``); an agent's index does
    # not, so AgentExited is not checked here.
    indices: list[int] = []
    if isinstance(event, WorkItem | ItemDone | ItemDead | ItemFailed | MapFailed):
        indices.append(event.index)
    elif isinstance(event, WorkflowRetryRequested):
        indices.extend(event.indices)
    for index in indices:
        if not 0 <= index <= MAX_INDEX:
            raise BadEvent(f"malformed event: index {str(index)[:40]} is out of range")


def decode_as(data: bytes, cls: type[T], *, subject: str | None = None) -> T:
    """Decode an event that must be of type ``cls`` (``subject``: as for :func:`decode`)."""
    event = decode(data, subject=subject)
    if not isinstance(event, cls):
        raise BadEvent(f"expected {cls.__name__}, got {type(event).__name__}")
    return event
