"""Reading what the Job controller and the kubelet wrote: Job conditions, pod reasons, exit
codes, completion indexes; and what the poller remembers of each Job between polls. Pure."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from jetreduce.contract.events import JobStatus
from jetreduce.launcher.k8s_manifests import (
    AGENT_CONTAINER,
    ATTEMPT_ANNOTATION,
    COMPLETION_INDEX_ANNOTATION,
)


@dataclass
class JobSeen:
    wf: str
    phase: str
    attempt: int = 0
    namespace: str = ""
    failed: int = 0
    version: str = ""
    """The Job's resourceVersion and status at the last poll: a change lists its pods."""
    announced: set[str] = field(default_factory=set)
    """``JobStatus`` states already published for this Job."""
    pod_events: set[str] = field(default_factory=set)
    """Pods already reported through ``PodFailed``."""
    reported_pods: set[str] = field(default_factory=set)
    finished: bool = False
    last_index: int = -1
    last_code: int = -1
    """Of the last failed pod reported (for the final ``agent.exited`` of a Job)."""
    relaunch_at: float | None = None
    """Loop time at which this failed Job is replaced; None until its failure is seen."""
    relaunched: bool = False
    gave_up: bool = False
    permanent: int | None = None
    """A non-retriable exit code one of its pods ended with: no relaunch can help."""
    first_seen: float | None = None
    """Loop time this launcher first saw the Job (its startup deadline counts from here)."""
    started: bool = False
    """One of its pods has run (been ready, succeeded or failed)."""
    troubles: dict[str, float] = field(default_factory=dict)
    """``StartProblem.key`` → loop time first seen, for problems still present."""
    start_reported: set[str] = field(default_factory=set)
    """``StartProblem.key``s already published as ``PodFailed``."""
    held: int | None = None
    """Agent slots its pods hold (:func:`held_slots`); None until known."""


def job_status_event(
    wf: str, phase: str, job: str, state: str, status: Mapping[str, Any], reason: str
) -> JobStatus:
    return JobStatus(
        workflow_id=wf,
        phase=phase,
        job=job,
        state=state,
        active=int(status.get("active") or 0),
        succeeded=int(status.get("succeeded") or 0),
        failed=int(status.get("failed") or 0),
        reason=reason,
    )


def pod_index(meta: Mapping[str, Any]) -> int:
    try:
        return int((meta.get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION, "-1"))
    except ValueError:
        return -1


def true_condition(pod_status: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for c in pod_status.get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return dict(c)
    return None


def pod_reason(
    pod_status: Mapping[str, Any], disruption: Mapping[str, Any] | None
) -> tuple[str, str]:
    """The most specific reason Kubernetes gives, and its message: the pod's own
    (``Evicted``, ``DeadlineExceeded``, ``NodeLost``), then the disruption's
    (``EvictionByEvictionAPI``, ``PreemptionByScheduler``…), then the agent container's
    (``OOMKilled``, ``Error``, ``ContainerCannotRun``)."""
    terminated: Mapping[str, Any] = {}
    for cs in pod_status.get("containerStatuses") or []:
        if cs.get("name") == AGENT_CONTAINER:
            terminated = (cs.get("state") or {}).get("terminated") or {}
    if pod_status.get("reason"):
        return str(pod_status["reason"]), str(pod_status.get("message") or "")
    if disruption is not None:
        return str(disruption.get("reason") or "DisruptionTarget"), str(
            disruption.get("message") or ""
        )
    if terminated.get("reason"):
        return str(terminated["reason"]), str(terminated.get("message") or "")
    if terminated.get("exitCode"):
        return "Error", ""
    return "Unknown", ""


def attempt_of(meta: Mapping[str, Any]) -> int:
    """A Job's run number (0 for Jobs made before relaunches existed, or by hand)."""
    try:
        return int((meta.get("annotations") or {}).get(ATTEMPT_ANNOTATION) or 0)
    except ValueError:
        return 0


def exit_code(pod_status: Mapping[str, Any]) -> int:
    """The agent container's exit code; -1 when the pod failed without one (evicted, lost)."""
    for cs in pod_status.get("containerStatuses") or []:
        if cs.get("name") == AGENT_CONTAINER:
            terminated = (cs.get("state") or {}).get("terminated") or {}
            if "exitCode" in terminated:
                return int(terminated["exitCode"])
    return -1


def agent_slots(job: Mapping[str, Any]) -> int:
    """Slots per pod of a Job, from its agent container's ``JETREDUCE_SLOTS``."""
    spec = job.get("spec") or {}
    containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
    container: Mapping[str, Any] = next(
        (c for c in containers if c.get("name") == AGENT_CONTAINER), {}
    )
    env = container.get("env") or []
    value = next((e.get("value") for e in env if e.get("name") == "JETREDUCE_SLOTS"), "1")
    try:
        return max(1, int(value or 1))
    except ValueError:
        return 1


def held_slots(job: Mapping[str, Any]) -> int:
    """Slots a Job's agents hold: every index not yet ended (running, starting, or waiting
    to be retried) times its pod's slots; none once the Job has finished. An index that
    succeeded ended for good: a map agent that drained (its queue ran dry) exits 0 and is
    not run again, so its slots are free for other workflows at once."""
    status = job.get("status") or {}
    if any(
        c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
        for c in status.get("conditions") or []
    ):
        return 0
    completions = int((job.get("spec") or {}).get("completions") or 1)
    ended = parse_indexes(str(status.get("completedIndexes") or "")) | parse_indexes(
        str(status.get("failedIndexes") or "")
    )
    return max(0, completions - len(ended)) * agent_slots(job)


def parse_indexes(text: str) -> set[int]:
    """``"1,3-5"`` → ``{1, 3, 4, 5}`` (the Job status's compressed index lists)."""
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


START_WAITING_REASONS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
"""Why a container waits that no waiting cures: the image or the pod's configuration is wrong
(a missing Secret, ConfigMap or key; an image that cannot be pulled)."""


@dataclass(frozen=True)
class StartProblem:
    """Why a Job's pod (or, ``pod == ""``, the Job itself) has not started: the API's own
    reason and message. ``hard``: it will not resolve by waiting (a wrong image or missing
    object), as opposed to capacity (``Unschedulable``, a quota while other pods run)."""

    pod: str
    index: int
    reason: str
    message: str
    hard: bool

    @property
    def key(self) -> str:
        return f"{self.pod}/{self.reason}"


STALE_EVENT_S = {"FailedMount": 150.0, "FailedCreate": 420.0}
"""A Warning Event last seen longer ago than this is history, not a present problem. While
it lasts the problem repeats it (the Event's count and last time are updated): the kubelet
retries a mount with a backoff capped near 2 minutes, the Job controller a pod creation
near 6. Events outlive their cause by about an hour: a Secret created since must not keep
failing a pod that is still pending for another reason."""


def _event_time(event: Mapping[str, Any]) -> float | None:
    """When an Event was last seen (epoch seconds), from whichever field the API filled."""
    series = event.get("series") or {}
    meta = event.get("metadata") or {}
    for value in (
        series.get("lastObservedTime"),
        event.get("lastTimestamp"),
        event.get("eventTime"),
        meta.get("creationTimestamp"),
    ):
        if isinstance(value, str) and value:
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def _stale(event: Mapping[str, Any], reason: str, now: float) -> bool:
    seen = _event_time(event)
    return seen is not None and now - seen > STALE_EVENT_S.get(reason, float("inf"))


def start_problems(
    job: str, pods: Mapping[str, Any], events: Mapping[str, Any], now: float | None = None
) -> list[StartProblem]:
    """What keeps ``job``'s pods from starting, from its pods' status and the Warning Events
    of the Job and its pending pods: ``FailedCreate`` on the Job (no pod could be created: a
    missing ServiceAccount, Pod Security or quota rejection; hard when the Job has no pod at
    all), ``Unschedulable``, a container waiting for a reason in
    :data:`START_WAITING_REASONS`, ``FailedMount`` on a pending pod (a missing Secret or
    ConfigMap volume). Events older than :data:`STALE_EVENT_S` (by ``now``, epoch seconds)
    are left out."""
    now = time.time() if now is None else now
    found: list[StartProblem] = []
    pending: dict[str, int] = {}
    items = pods.get("items", [])
    for pod in items:
        meta = pod.get("metadata") or {}
        st = pod.get("status") or {}
        if st.get("phase") not in (None, "", "Pending"):
            continue
        name, index = str(meta.get("name", "")), pod_index(meta)
        pending[name] = index
        for cond in st.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                reason = str(cond.get("reason") or "Unschedulable")
                found.append(
                    StartProblem(name, index, reason, str(cond.get("message") or ""), False)
                )
        for cs in st.get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in START_WAITING_REASONS:
                found.append(
                    StartProblem(
                        name, index, str(waiting["reason"]), str(waiting.get("message") or ""), True
                    )
                )
    seen: set[tuple[str, str]] = set()
    for event in reversed(events.get("items", [])):  # newest first
        involved = event.get("involvedObject") or {}
        reason, message = str(event.get("reason") or ""), str(event.get("message") or "")
        kind, name = involved.get("kind"), str(involved.get("name") or "")
        if kind == "Job" and name == job and reason == "FailedCreate":
            problem = StartProblem("", -1, reason, message, not items)
        elif kind == "Pod" and name in pending and reason == "FailedMount":
            problem = StartProblem(name, pending[name], reason, message, True)
        else:
            continue
        if _stale(event, reason, now):
            continue
        if (problem.pod, reason) not in seen:  # the newest message of each is enough
            seen.add((problem.pod, reason))
            found.append(problem)
    return found


def last_failed(pods: Mapping[str, Any], failed_indexes: set[int]) -> dict[int, str]:
    """For each index the Job gave up, the name of its newest failed pod (creation time,
    then name: pods retried within a second share a timestamp)."""
    newest: dict[int, tuple[str, str]] = {}
    for pod in pods.get("items", []):
        meta = pod.get("metadata", {})
        if (pod.get("status") or {}).get("phase") != "Failed":
            continue
        index = pod_index(meta)
        if index not in failed_indexes:
            continue
        key = (str(meta.get("creationTimestamp") or ""), str(meta.get("name") or ""))
        if index not in newest or key > newest[index]:
            newest[index] = key
    return {index: name for index, (_, name) in newest.items()}
