"""Which Job and pod status events are already stored, so that a new leader does not repeat
them.

The Kubernetes poller remembers what it reported in memory (``JobSeen.announced``,
``pod_events``): a launcher that takes over (or restarts) starts with none of it and, at its
first poll, would report every running Job as ``running`` again and every failed pod again.
The stream is the memory that survives the leader: before the first ``agent.job`` /
``agent.pod_failed`` of a workflow in a term, the leader reads that workflow's stored ones
(two short subject reads) and skips what is there. Later reports of the term are checked
against that set and added to it (this leader is the only writer while it leads).

A failed pod's ``agent.exited`` carries no pod name, but the poller publishes the pod's
``agent.pod_failed`` just before it in the same poll: an exit is a repeat when a pod failure
of that pod was stored *before this term* (a leader killed between the two loses that one
exit; the pod's failure is still reported).
"""

from __future__ import annotations

import asyncio
import logging

from nats.js import JetStreamContext

from jetreduce.contract.events import JobStatus, PodFailed
from jetreduce.contract.subjects import Subjects
from jetreduce.runtime.store import read_events

__all__ = ["Reported", "status_key"]

log = logging.getLogger(__name__)

Key = tuple[str, ...]


def status_key(event: JobStatus | PodFailed) -> Key:
    """What makes a report the same one: a Job's state, or a pod's (or a Job's
    ``FailedCreate``, ``pod=""``) reason."""
    if isinstance(event, JobStatus):
        return ("job", event.job, event.state)
    return ("pod", event.job, event.pod, event.reason)


class Reported:
    """The stored status reports of each workflow, as far as this term has read them."""

    def __init__(self, js: JetStreamContext, subjects: Subjects) -> None:
        self._js = js
        self._s = subjects
        self._known: dict[str, set[Key]] = {}
        self._earlier_pods: dict[str, set[str]] = {}
        """Workflow → pods whose failure was stored before this term's first read."""
        self._lock = asyncio.Lock()

    def reset(self) -> None:
        """A new term: what was read before may have been added to by another leader."""
        self._known.clear()
        self._earlier_pods.clear()

    async def stored(self, event: JobStatus | PodFailed) -> bool:
        """Whether ``event`` (the same key) is stored already; if not, it is counted as
        stored from now on (the caller publishes it). On a read error the event is taken
        as new: a repeated report is better than a lost one."""
        async with self._lock:
            known = await self._load(event.workflow_id)
            key = status_key(event)
            if key in known:
                return True
            known.add(key)
            return False

    async def earlier_pods(self, wf: str) -> set[str]:
        """Pods of ``wf`` whose failure was stored before this term (see above): the poller
        counts their exits without reporting them again."""
        async with self._lock:
            await self._load(wf)
            return self._earlier_pods.get(wf, set())

    async def _load(self, wf: str) -> set[Key]:
        known = self._known.get(wf)
        if known is None:
            try:
                known = await self._read(wf)
            except Exception as exc:
                log.warning("workflow %s: stored status reports not read (%r)", wf, exc)
                known = set()
            self._known[wf] = known
            self._earlier_pods[wf] = {k[2] for k in known if k[0] == "pod" and k[2]}
        return known

    def unmark(self, event: JobStatus | PodFailed) -> None:
        """``event`` could not be published after all: report it when it comes again."""
        self._known.get(event.workflow_id, set()).discard(status_key(event))

    def forget(self, wf: str) -> None:
        self._known.pop(wf, None)
        self._earlier_pods.pop(wf, None)

    async def _read(self, wf: str) -> set[Key]:
        keys: set[Key] = set()
        for kind in ("job", "pod_failed"):
            stored = await read_events(self._js, self._s.events_stream, self._s.agent(kind, wf))
            keys.update(status_key(e) for e in stored if isinstance(e, JobStatus | PodFailed))
        return keys
