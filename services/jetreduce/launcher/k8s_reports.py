"""What the ``kubernetes`` backend's poller tells the launcher: exits, pod and Job status.

The poller (:mod:`jetreduce.launcher.k8s_poller`) decides what it looked at; this module turns
that into the launcher's callbacks, each once: ``agent.exited`` per failed pod (``on_exit``,
with the container's exit code and whether it runs again), ``PodFailed`` per failed, disrupted
or unstartable pod and ``JobStatus`` per Job state (``on_status``), and the final
``agent.exited`` (``restarted=False, remaining=0``) when a phase's pods cannot start. Kept
apart from the polling so that what an event says, and when it is said only once, is read in
one place; a callback that raises is logged and never stops a poll.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from jetreduce.contract.events import JobStatus, PodFailed
from jetreduce.launcher.backend import ExitCallback, StatusCallback
from jetreduce.launcher.k8s_api import KubeApi
from jetreduce.launcher.k8s_manifests import PHASE_LABEL, WORKFLOW_ANNOTATION, job_name
from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.launcher.k8s_status import (
    JobSeen,
    StartProblem,
    attempt_of,
    exit_code,
    job_status_event,
    last_failed,
    parse_indexes,
    pod_index,
    pod_reason,
    start_problems,
    true_condition,
)

__all__ = ["JobReporter"]

log = logging.getLogger(__name__)


class JobReporter:
    """Reports of :class:`~jetreduce.launcher.k8s_poller.JobPoller`, which extends it (as
    :class:`~jetreduce.launcher.kubernetes.KubernetesBackend` extends the poller, which
    provides the state below)."""

    settings: KubernetesSettings
    kube: KubeApi
    on_exit: ExitCallback | None
    on_status: StatusCallback | None
    earlier_failures: Callable[[str], Awaitable[set[str]]] | None
    """Workflow → pods whose failure is already stored (reported by an earlier leader): a
    new leader's first poll counts them without reporting their exits again."""
    _seen: dict[str, JobSeen]
    """Job name → what the poller last saw."""

    async def _check_start(
        self, job: str, seen: JobSeen, pods: Mapping[str, Any], events: Mapping[str, Any]
    ) -> None:
        """Report what keeps the Job's pods from starting (one ``PodFailed`` per pod and
        reason, the Job's own ``FailedCreate`` with ``pod=""``), and give the phase up with
        that reason once a problem no waiting cures has lasted ``startup_deadline_s``, or no
        pod has started within it: instead of a workflow that hangs on pods that never run."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if seen.first_seen is None:
            seen.first_seen = now
        problems = start_problems(job, pods, events)
        seen.troubles = {p.key: seen.troubles.get(p.key, now) for p in problems}
        for problem in problems:
            if problem.key in seen.start_reported:
                continue
            seen.start_reported.add(problem.key)
            log.warning(
                "workflow %s: %s Job %s: %s cannot start: %s: %s",
                seen.wf,
                seen.phase,
                job,
                problem.pod or "a pod",
                problem.reason,
                problem.message,
            )
            await self._status(
                PodFailed(
                    workflow_id=seen.wf,
                    phase=seen.phase,
                    job=job,
                    pod=problem.pod,
                    index=problem.index,
                    reason=problem.reason,
                    message=problem.message[:256],
                )
            )
        deadline = self.settings.startup_deadline_s
        overdue = [p for p in problems if p.hard and now - seen.troubles[p.key] >= deadline]
        if not overdue and not seen.started and now - seen.first_seen >= deadline:
            overdue = problems or [StartProblem("", -1, "NotStarted", "no pod started", False)]
        if not overdue:
            return
        why = overdue[0]
        seen.gave_up = True
        await self._notify(
            seen.wf,
            seen.phase,
            why.index,
            -1,
            False,
            0,
            f"could not start within {deadline:g}s: {why.reason}: {why.message} (Job {job})",
        )

    @staticmethod
    def _give_up_reason(seen: JobSeen, reason: str, code: int) -> str:
        """The end of ``AgentExited.reason`` when the phase is given up: the aggregator
        fails the workflow with "<phase> agents <this>"."""
        job = job_name(seen.wf, seen.phase, seen.attempt)
        if reason == "DeadlineExceeded":
            return f"ran out of time: Job {job} failed with DeadlineExceeded"
        if seen.permanent is not None:
            return (
                f"exited with non-retriable code {seen.permanent} (2: the agent does not know "
                f"the workflow or phase), so no retry was made: Job {job} failed with "
                f"{reason or 'no reason given'}"
            )
        runs = f" after {seen.attempt} relaunch(es)" if seen.attempt else ""
        return (
            f"kept crashing (last exit code {code}): Job {job} failed with "
            f"{reason or 'no reason given'}{runs}"
        )

    async def _report_pods(
        self,
        seen: JobSeen,
        job_failed: bool,
        relaunch: bool,
        status: Mapping[str, Any],
        completions: int,
        pods: Mapping[str, Any],
        job_reason: str,
    ) -> int:
        """One ``on_exit`` per newly failed pod; returns how many. A pod is restarted if its
        Job retries its index, or if the whole Job fails and is relaunched; if it is not (the
        phase is given up), the exit says why, from the Job's ``job_reason``."""
        failed_indexes = parse_indexes(str(status.get("failedIndexes") or ""))
        if job_failed:
            remaining = completions if relaunch else 0
        else:
            # Indexes still running or to be retried: neither succeeded nor failed for good.
            # At least 1 while the Job has not failed: its Failed condition, not this count,
            # ends the phase (a relaunch may follow), and the status can show every index
            # failed a poll before it shows the condition.
            done = int(status.get("succeeded") or 0) + len(failed_indexes)
            remaining = max(1, completions - done)
        reported = 0
        earlier = await self._earlier(seen.wf)
        last = last_failed(pods, failed_indexes)
        for pod in pods.get("items", []):
            meta = pod.get("metadata", {})
            pod_status = pod.get("status") or {}
            if pod_status.get("phase") != "Failed" or meta.get("name") in seen.reported_pods:
                continue
            seen.reported_pods.add(meta.get("name", ""))
            if meta.get("name") in earlier:
                continue  # reported by an earlier leader: this one only counts it
            index = pod_index(meta)
            code = exit_code(pod_status)
            # A slow poll can find several failed pods of an index its Job has since given
            # up: only the newest was not replaced.
            restart = relaunch if job_failed else last.get(index) != meta.get("name")
            seen.last_index, seen.last_code = index, code
            log.warning(
                "workflow %s: %s pod %s (index %d) failed with %d%s",
                seen.wf,
                seen.phase,
                meta.get("name"),
                index,
                code,
                "; it runs again" if restart else "",
            )
            final = job_failed and not restart
            await self._notify(
                seen.wf,
                seen.phase,
                index,
                code,
                restart,
                remaining,
                self._give_up_reason(seen, job_reason, code) if final else "",
            )
            reported += 1
        return reported

    async def _earlier(self, wf: str) -> set[str]:
        """Pods of ``wf`` whose failure an earlier launcher (leader) reported already."""
        if self.earlier_failures is None:
            return set()
        try:
            return await self.earlier_failures(wf)
        except Exception:
            log.exception("earlier_failures callback failed")
            return set()

    async def _pod_events(self, job: str, seen: JobSeen, pods: Mapping[str, Any]) -> None:
        """One ``PodFailed`` per pod that failed or was disrupted (evicted, preempted,
        drained: such a pod may even have succeeded, having handed its items back)."""
        if self.on_status is None:
            return
        for pod in pods.get("items", []):
            meta = pod.get("metadata", {})
            name = meta.get("name", "")
            pod_status = pod.get("status") or {}
            disruption = true_condition(pod_status, "DisruptionTarget")
            if name in seen.pod_events or (
                pod_status.get("phase") != "Failed" and disruption is None
            ):
                continue
            seen.pod_events.add(name)
            reason, message = pod_reason(pod_status, disruption)
            code = exit_code(pod_status)
            await self._status(
                PodFailed(
                    workflow_id=seen.wf,
                    phase=seen.phase,
                    job=job,
                    pod=name,
                    index=pod_index(meta),
                    reason=reason,
                    exit_code=None if code == -1 else code,
                    disruption=disruption is not None,
                    message=message[:256],
                )
            )

    async def _job_events(
        self,
        job: str,
        seen: JobSeen,
        status: Mapping[str, Any],
        conditions: Mapping[str, Mapping[str, Any]],
    ) -> None:
        """``JobStatus`` once per state: ``running`` when it first has active pods, then
        ``complete`` or ``failed`` from its condition."""
        if "Complete" in conditions:
            state = "complete"
        elif "Failed" in conditions:
            state = "failed"
        elif int(status.get("active") or 0) > 0 and not seen.announced:
            state = "running"
        else:
            return
        if state in seen.announced:
            return
        seen.announced.add(state)
        reason = str(conditions.get("Failed", {}).get("reason") or "")
        await self._status(job_status_event(seen.wf, seen.phase, job, state, status, reason))

    async def _announce_stopped(self, ns: str, selector: str) -> None:
        """Before ``stop`` deletes Jobs: the last word on each this launcher has not yet
        seen finish: ``complete``/``failed`` if it had, else ``stopped`` (deleted while its
        pods ran, because its phase or its workflow ended)."""
        listed = await self.kube.call(
            self.kube.batch.list_namespaced_job, ns, label_selector=selector
        )
        for job in listed.get("items", []):
            meta = job.get("metadata", {})
            wf = meta.get("annotations", {}).get(WORKFLOW_ANNOTATION)
            phase = meta.get("labels", {}).get(PHASE_LABEL)
            name = meta.get("name", "")
            if not wf or not phase:
                continue
            seen = self._seen.get(name) or JobSeen(wf, phase, attempt_of(meta), namespace=ns)
            if seen.announced & {"complete", "failed", "stopped"}:
                continue
            status = job.get("status") or {}
            conditions = {
                c.get("type"): c
                for c in status.get("conditions") or []
                if c.get("status") == "True"
            }
            if conditions.keys() & {"Complete", "Failed"}:
                await self._job_events(name, seen, status, conditions)
                continue
            seen.announced.add("stopped")
            await self._status(job_status_event(wf, phase, name, "stopped", status, ""))

    async def _status(self, event: JobStatus | PodFailed) -> None:
        if self.on_status is None:
            return
        try:
            await self.on_status(event)
        except Exception:
            log.exception("on_status callback failed")

    async def _notify(
        self,
        wf: str,
        phase: str,
        index: int,
        code: int,
        restart: bool,
        remaining: int,
        reason: str = "",
    ) -> None:
        if self.on_exit is None:
            return
        try:
            await self.on_exit(wf, phase, index, code, restart, remaining, reason)
        except Exception:
            log.exception("on_exit callback failed")
