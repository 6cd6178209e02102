"""The ``kubernetes`` backend's poller: what happens to the Jobs it created.

Failures are found by polling, not watching: one LIST of this installation's Jobs per
``poll_interval_s`` and namespace (plus a LIST of a Job's pods when it changed, and of the
namespace's Warning Events while one of its Jobs is starting). A poll has no
resume/410 logic to get wrong, its cost does not grow with the number of workflows, and a
missed interval only delays an ``agent.exited`` event: no item depends on it, because items
live in JetStream and are redelivered whatever happens to pods.

A Job that fails as a whole is run again or given up by
:mod:`jetreduce.launcher.k8s_relaunch`; what a poll finds is reported (``agent.exited``,
``PodFailed``, ``JobStatus``) by :mod:`jetreduce.launcher.k8s_reports`. This module lists and
diffs: which Jobs exist, what changed since the last poll, which slots were released.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from jetreduce.launcher.k8s_api import KubernetesBackendError, PermanentApiError
from jetreduce.launcher.k8s_manifests import PHASE_LABEL, WORKFLOW_ANNOTATION
from jetreduce.launcher.k8s_relaunch import JobRelauncher
from jetreduce.launcher.k8s_status import JobSeen, attempt_of, held_slots, parse_indexes

__all__ = ["JobPoller"]

log = logging.getLogger(__name__)


class JobPoller(JobRelauncher):
    """Polling for :class:`~jetreduce.launcher.kubernetes.KubernetesBackend`, which provides
    the state below (one concern per module: the backend creates and deletes, this watches;
    its reports and relaunches are in the classes it extends)."""

    installation: str
    on_released: Callable[[str, str], Awaitable[None]] | None
    """Called when a phase's Jobs hold fewer slots than at the last poll (indexes ended)."""
    _mine: str
    """The label selector of this installation's objects."""
    _denied: dict[tuple[str, str], str]
    _poller: asyncio.Task[None] | None
    _stopping: asyncio.Event
    _polled: asyncio.Event

    async def _each_namespace(
        self, what: str, do: Callable[[str], Awaitable[None]], *, all_failed_only: bool = False
    ) -> None:
        """``do(ns)`` for every namespace of this installation, each on its own, so that one
        namespace without a Role (or briefly unreachable) does not blind the launcher in the
        others. A permanent error is logged (once per namespace and message) and skipped: it
        will not heal by retrying, and the others must go on. The first transient error is
        raised once all were tried, so the caller retries (``all_failed_only``: only if
        every namespace failed)."""
        transient: list[KubernetesBackendError] = []
        for ns in self.settings.namespaces:
            try:
                await do(ns)
                self._denied.pop((what, ns), None)
            except PermanentApiError as exc:
                if self._denied.get((what, ns)) != str(exc):
                    self._denied[(what, ns)] = str(exc)
                    log.warning("kubernetes %s in namespace %s skipped: %s", what, ns, exc)
            except KubernetesBackendError as exc:
                transient.append(exc)
        if transient and (not all_failed_only or len(transient) == len(self.settings.namespaces)):
            raise transient[0]

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._stopping.clear()
            self._poller = asyncio.create_task(self._poll_loop(), name="kubernetes job poller")

    async def _poll_loop(self) -> None:
        last_error = ""
        while not self._stopping.is_set():
            try:
                if self.may_act():  # a poll reports and relaunches: the leader's alone
                    await self.poll_once()
                last_error = ""
            except Exception as exc:
                if str(exc) != last_error:  # log a repeating failure once
                    log.warning("kubernetes job poll failed: %s", exc)
                    last_error = str(exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.poll_interval_s)

    async def poll_once(self) -> None:
        """One look at every Job of this installation: report newly failed pods through
        ``on_exit`` (with the container's exit code) and ``on_status`` (with the pod's
        reason), pods that cannot start, Jobs that started running or finished, and replace
        (or give up on) a phase whose current Job failed as a whole. Each namespace on its
        own (see :meth:`_each_namespace`): a namespace this launcher may not list counts as
        looked at, so :meth:`sync` does not wait on it forever."""
        await self._each_namespace("poll", self._poll_namespace)
        self._polled.set()

    async def _poll_namespace(self, ns: str) -> None:
        jobs: list[tuple[str, str, str, int, dict[str, Any]]] = []
        current: dict[tuple[str, str], int] = {}
        """(workflow, phase) → the highest attempt listed: that phase's current Job."""
        known = {name: seen for name, seen in self._seen.items() if seen.namespace == ns}
        """What was known before the listing. The listing is a snapshot, older than any entry
        added, replaced or dropped since (a launch, a stop, this poll's own relaunch, in the
        awaits of this poll): those are not undone by it (see :meth:`_stale`)."""
        listed = await self.kube.call(
            self.kube.batch.list_namespaced_job, ns, label_selector=self._mine
        )
        for job in listed.get("items", []):
            meta = job.get("metadata", {})
            wf = meta.get("annotations", {}).get(WORKFLOW_ANNOTATION)
            phase = meta.get("labels", {}).get(PHASE_LABEL)
            if not wf or not phase:
                continue
            attempt = attempt_of(meta)
            jobs.append((meta.get("name", ""), wf, phase, attempt, job))
            current[(wf, phase)] = max(current.get((wf, phase), 0), attempt)
        events: dict[str, Any] | None = None
        """The namespace's Warning Events, listed once per poll if a Job is starting."""
        released: list[tuple[str, str]] = []
        for name, wf, phase, attempt, job in jobs:
            if self._stale(name, known):
                continue  # stopped, or stopped and launched again, since it was listed
            seen = self._seen.setdefault(name, JobSeen(wf, phase, attempt, namespace=ns))
            seen.namespace = ns
            status = job.get("status") or {}
            conditions = {
                c.get("type"): c
                for c in status.get("conditions") or []
                if c.get("status") == "True"
            }
            job_failed = "Failed" in conditions
            seen.finished = job_failed or "Complete" in conditions
            held, seen.held = seen.held, held_slots(job)
            if held is not None and seen.held < held:
                released.append((wf, phase))  # indexes ended (drained agents): slots free
            reason = str(conditions["Failed"].get("reason") or "") if job_failed else ""
            failed = int(status.get("failed") or 0)
            # Any change of the Job (a pod ended, was replaced, became ready) is a reason to
            # look at its pods: a disrupted pod is replaced without counting as ``failed``.
            version = f"{job.get('metadata', {}).get('resourceVersion', '')}:" + json.dumps(
                status, sort_keys=True
            )
            changed, seen.version = version != seen.version, version
            active = int(status.get("active") or 0)
            seen.started = seen.started or bool(
                int(status.get("ready") or 0) or int(status.get("succeeded") or 0) or failed
            )
            # Pods that exist but do not run, or no pod at all: look for why.
            starting = (
                not seen.finished
                and not seen.gave_up
                and (active == 0 or active > int(status.get("ready") or 0))
            )
            pods: dict[str, Any] | None = None
            if starting or failed > seen.failed or (changed and self.on_status is not None):
                pods = await self.kube.call(
                    self.kube.core.list_namespaced_pod,
                    ns,
                    label_selector=f"batch.kubernetes.io/job-name={name}",
                )
                self._note_permanent(seen, pods)
            if starting and pods is not None:
                if events is None:
                    events = await self.kube.call(
                        self.kube.core.list_namespaced_event, ns, field_selector="type=Warning"
                    )
                await self._check_start(name, seen, pods, events)
            if self._seen.get(name) is not seen:
                continue  # stopped while its pods were listed: nothing more to do for it
            # Every index ran to its end and index 0 succeeded: agent 0 exits 0 only once its
            # phase is over, so the phase's outcome is decided (by the aggregator), and
            # neither a relaunch nor a give-up may race it. Not any other index: a map agent
            # with index > 0 exits 0 as soon as its queue runs dry (it drained, handing its
            # slots back) while items may still be retried, by agent 0 alone.
            completed = parse_indexes(str(status.get("completedIndexes") or ""))
            decided = job_failed and reason == "FailedIndexes" and 0 in completed
            # A failed Job's pods come back when a newer run of the phase exists or will.
            superseded = attempt < current[(wf, phase)]
            relaunch = superseded or (
                job_failed and not decided and self._may_relaunch(seen, reason)
            )
            reported = 0
            if pods is not None:
                await self._pod_events(name, seen, pods)
                if failed > seen.failed:
                    seen.failed = failed
                    completions = int((job.get("spec") or {}).get("completions") or 1)
                    reported = await self._report_pods(
                        seen,
                        job_failed and not decided,
                        relaunch,
                        status,
                        completions,
                        pods,
                        reason,
                    )
            await self._job_events(name, seen, status, conditions)
            if decided and not seen.gave_up:
                seen.gave_up = True
                log.info("workflow %s: %s Job %s ended after its phase did", wf, phase, name)
            elif job_failed and not superseded and self._seen.get(name) is seen:
                # (Not if a stop dropped it during the reports above: no Job after a stop.)
                await self._after_job_failed(seen, job, reason, relaunch, reported)
        present = {name for name, *_ in jobs}
        for name in known:
            if name not in present and not self._stale(name, known):
                del self._seen[name]  # deleted (by us, the janitor, or its TTL)
        for wf, phase in dict.fromkeys(released):
            await self._released(wf, phase)

    def _stale(self, name: str, known: Mapping[str, JobSeen]) -> bool:
        """Whether a poll's listing is older than what it knows of Job ``name``: its entry
        was there before the listing and has since been dropped (``stop``) or replaced (a
        map reopened while its old Job was deleted: ``launch`` reuses the name). A Job
        unknown before the listing (a launch or relaunch while it was taken) is not listed
        as gone either (``known`` does not name it): the poll that created it keeps it. Each
        such Job waits for the next poll, whose listing is newer."""
        return name in known and self._seen.get(name) is not known[name]

    async def _released(self, wf: str, phase: str) -> None:
        """Tell the launcher that ``wf``'s ``phase`` holds fewer slots (it may admit)."""
        if self.on_released is None:
            return
        try:
            await self.on_released(wf, phase)
        except Exception:
            log.exception("on_released callback failed")
