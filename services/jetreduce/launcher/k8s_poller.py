"""The ``kubernetes`` backend's poller: what happens to the Jobs it created.

Failures are found by polling, not watching: one LIST of this installation's Jobs per
``poll_interval_s`` and namespace (plus a LIST of a Job's pods when it changed, and of the
namespace's Warning Events while one of its Jobs is starting). A poll has no
resume/410 logic to get wrong, its cost does not grow with the number of workflows, and a
missed interval only delays an ``agent.exited`` event: no item depends on it, because items
live in JetStream and are redelivered whatever happens to pods.

A Job that fails as a whole (its per-index or overall backoff is used up) leaves the phase
with no agents while items remain. The poller then creates the phase's next Job
(``jr-<slug>-<phase>-<n>``, annotated ``jetreduce.io/attempt``) up to
``KubernetesSettings.max_relaunches`` times, keeping the failed ones for their pods' logs.
Past that bound, when the Job ran out of time (``DeadlineExceeded``), when an agent exited
with a non-retriable code, or when no pod could start within ``startup_deadline_s``, it
reports a final
``agent.exited`` with ``restarted=False, remaining=0``: the event on which the aggregator
fails the workflow, the same one the local backend sends when it gives up on its last agent.
Which Job is current is read from the API server (the highest attempt of a workflow phase),
so a restarted launcher picks up where the last one stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

from jetreduce.contract.events import JobStatus, PodFailed
from jetreduce.launcher.backend import ExitCallback, StatusCallback
from jetreduce.launcher.k8s_api import KubeApi, KubernetesBackendError, PermanentApiError
from jetreduce.launcher.k8s_manifests import (
    AGENT_CONTAINER,
    IMAGE_ANNOTATION,
    PHASE_LABEL,
    WORKFLOW_ANNOTATION,
    build_phase_job,
    job_name,
)
from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.launcher.k8s_status import (
    JobSeen,
    StartProblem,
    agent_slots,
    attempt_of,
    exit_code,
    held_slots,
    job_status_event,
    last_failed,
    parse_indexes,
    pod_index,
    pod_reason,
    start_problems,
    true_condition,
)

__all__ = ["JobPoller"]

log = logging.getLogger(__name__)


class JobPoller:
    """Polling, reporting and relaunching for :class:`~jetreduce.launcher.kubernetes.
    KubernetesBackend`, which provides the state below (one concern per module: the backend
    creates and deletes, this watches)."""

    settings: KubernetesSettings
    kube: KubeApi
    installation: str
    on_exit: ExitCallback | None
    on_status: StatusCallback | None
    may_act: Callable[[], bool]
    """The launcher's leadership fence: no poll, relaunch or report without it."""
    earlier_failures: Callable[[str], Awaitable[set[str]]] | None
    """Workflow → pods whose failure is already stored (reported by an earlier leader): a
    new leader's first poll counts them without reporting their exits again."""
    on_released: Callable[[str, str], Awaitable[None]] | None
    """Called when a phase's Jobs hold fewer slots than at the last poll (indexes ended)."""
    _seen: dict[str, JobSeen]
    """Job name → what the poller last saw."""
    _mine: str
    """The label selector of this installation's objects."""
    _denied: dict[tuple[str, str], str]
    _poller: asyncio.Task[None] | None
    _stopping: asyncio.Event
    _polled: asyncio.Event

    def _nats_plain_env(self) -> dict[str, str]:
        raise NotImplementedError  # the backend's: the agents' NATS environment

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
            elif job_failed and not superseded:
                await self._after_job_failed(seen, job, reason, relaunch, reported)
        present = {name for name, *_ in jobs}
        for name in [n for n, seen in self._seen.items() if seen.namespace == ns]:
            if name not in present:
                del self._seen[name]  # deleted (by us, the janitor, or its TTL)
        for wf, phase in dict.fromkeys(released):
            await self._released(wf, phase)

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

    def _may_relaunch(self, seen: JobSeen, reason: str) -> bool:
        """Within the phase's budget: a relaunch left, and time left (a Job that hit its
        ``activeDeadlineSeconds`` used the phase's time; another run would only extend it);
        and no agent exited with a code that no new run can change."""
        return (
            reason != "DeadlineExceeded"
            and seen.permanent is None
            and seen.attempt < self.settings.max_relaunches
        )

    def _note_permanent(self, seen: JobSeen, pods: Mapping[str, Any]) -> None:
        """Remember a failed pod whose exit code is non-retriable (its index was failed by
        the Job's ``FailIndex`` rule)."""
        for pod in pods.get("items", []):
            pod_status = pod.get("status") or {}
            code = exit_code(pod_status)
            if (
                pod_status.get("phase") == "Failed"
                and code in self.settings.non_retriable_exit_codes
            ):
                seen.permanent = code

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

    async def _after_job_failed(
        self, seen: JobSeen, job: Mapping[str, Any], reason: str, relaunch: bool, reported: int
    ) -> None:
        """The phase's current Job failed: its pods are gone and will not come back. Create
        the next run once its delay is over, or, with no budget left, send the final
        ``agent.exited`` (``restarted=False, remaining=0``) on which the workflow fails."""
        if seen.relaunched or seen.gave_up:
            return
        why = reason or "no reason given"
        if not relaunch:
            seen.gave_up = True
            log.warning(
                "workflow %s: %s Job %s failed (%s) after %d relaunch(es); giving up",
                seen.wf,
                seen.phase,
                job_name(seen.wf, seen.phase, seen.attempt),
                why,
                seen.attempt,
            )
            if not reported:  # the pods' own reports (remaining=0) already said so
                await self._notify(
                    seen.wf,
                    seen.phase,
                    seen.last_index,
                    seen.last_code,
                    False,
                    0,
                    self._give_up_reason(seen, reason, seen.last_code),
                )
            return
        loop = asyncio.get_running_loop()
        if seen.relaunch_at is None:
            delay = self.settings.relaunch_delay_s * (seen.attempt + 1)
            seen.relaunch_at = loop.time() + delay
            log.warning(
                "workflow %s: %s Job failed (%s); relaunch %d of %d in %gs",
                seen.wf,
                seen.phase,
                why,
                seen.attempt + 1,
                self.settings.max_relaunches,
                delay,
            )
        if loop.time() >= seen.relaunch_at:
            await self._relaunch(seen, job)
            seen.relaunched = True

    async def _relaunch(self, seen: JobSeen, failed: Mapping[str, Any]) -> None:
        """Create the phase's next Job from what the failed one says about the workflow
        (namespace, completions, slots, secret keys, owner, deadline, and the image if the
        workflow chose it), with this installation's current pod settings otherwise; the
        launcher's spec is not needed, so any launcher replica can do it."""
        meta = failed.get("metadata") or {}
        spec = failed.get("spec") or {}
        containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
        container: Mapping[str, Any] = next(
            (c for c in containers if c.get("name") == AGENT_CONTAINER), {}
        )
        env = container.get("env") or []
        secret_keys = [e["name"] for e in env if "secretKeyRef" in (e.get("valueFrom") or {})]
        owners = meta.get("ownerReferences") or []
        deadline = spec.get("activeDeadlineSeconds")
        timeout_s = max(1, int(deadline) - self.settings.deadline_margin_s) if deadline else None
        image = (meta.get("annotations") or {}).get(IMAGE_ANNOTATION)
        settings = replace(
            self.settings,
            namespace=meta.get("namespace") or seen.namespace or self.settings.namespace,
            image=image or self.settings.image,
        )
        body = build_phase_job(
            seen.wf,
            seen.phase,
            completions=int(spec.get("completions") or 1),
            slots=agent_slots(failed),
            settings=settings,
            nats_env=self._nats_plain_env(),
            secret_keys=secret_keys,
            owner=owners[0] if owners else None,
            timeout_s=timeout_s,
            attempt=seen.attempt + 1,
            workflow_image=bool(image),
        )
        # 409: another launcher replica (or this one before a restart) got there first.
        if not self.may_act():
            return
        await self.kube.create(self.kube.batch.create_namespaced_job, body)
        name = body["metadata"]["name"]
        self._seen.setdefault(
            name,
            JobSeen(
                seen.wf,
                seen.phase,
                seen.attempt + 1,
                namespace=settings.namespace,
                held=held_slots(body),
            ),
        )
        log.warning("workflow %s: relaunched the %s phase as Job %s", seen.wf, seen.phase, name)

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

    async def _released(self, wf: str, phase: str) -> None:
        """Tell the launcher that ``wf``'s ``phase`` holds fewer slots (it may admit)."""
        if self.on_released is None:
            return
        try:
            await self.on_released(wf, phase)
        except Exception:
            log.exception("on_released callback failed")

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
