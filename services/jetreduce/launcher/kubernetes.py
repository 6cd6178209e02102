"""Kubernetes backend: agents are the pods of one Indexed Job per workflow phase.

The objects and their builders are in :mod:`jetreduce.launcher.k8s_manifests`, the API calls
in :mod:`jetreduce.launcher.k8s_api`, what Job and pod status say in
:mod:`jetreduce.launcher.k8s_status`.

Failures are found by polling, not watching: one LIST of this installation's Jobs per
``poll_interval_s`` (plus a LIST of a Job's pods when its failure count grows). A poll has no
resume/410 logic to get wrong, its cost does not grow with the number of workflows, and a
missed interval only delays an ``agent.exited`` event: no item depends on it, because items
live in JetStream and are redelivered whatever happens to pods.

A Job that fails as a whole (its per-index or overall backoff is used up) leaves the phase
with no agents while items remain. The poller then creates the phase's next Job
(``jr-<slug>-<phase>-<n>``, annotated ``jetreduce.io/attempt``) up to
``KubernetesSettings.max_relaunches`` times, keeping the failed ones for their pods' logs.
Past that bound, or when the Job ran out of time (``DeadlineExceeded``), it reports a final
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
import math
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

from jetreduce.contract.events import JobStatus, PodFailed
from jetreduce.contract.records import StoredSpec
from jetreduce.launcher.backend import ExitCallback, StatusCallback
from jetreduce.launcher.k8s_api import (
    ApiClient,
    KubeApi,
    KubernetesBackendError,
    PermanentApiError,
    load_api_client,
)
from jetreduce.launcher.k8s_manifests import (
    AGENT_CONTAINER,
    ATTEMPT_ANNOTATION,
    COMPLETION_INDEX_ANNOTATION,
    IMAGE_ANNOTATION,
    INSTALLATION_LABEL,
    MANAGED_BY,
    PHASE_LABEL,
    WORKFLOW_ANNOTATION,
    WORKFLOW_LABEL,
    SecretSource,
    agent_nats_env,
    build_map_job,
    build_phase_job,
    build_root_configmap,
    build_secret,
    installation,
    job_name,
    owner_reference,
    phase_timeout_s,
    root_name,
    secret_env_keys,
    secret_name,
    workflow_slug,
)
from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.launcher.k8s_status import (
    JobSeen,
    StartProblem,
    attempt_of,
    exit_code,
    job_status_event,
    parse_indexes,
    pod_index,
    pod_reason,
    start_problems,
    true_condition,
)
from jetreduce.runtime.settings import NatsSettings

__all__ = [
    "ATTEMPT_ANNOTATION",
    "COMPLETION_INDEX_ANNOTATION",
    "IMAGE_ANNOTATION",
    "PHASE_LABEL",
    "WORKFLOW_ANNOTATION",
    "WORKFLOW_LABEL",
    "KubernetesBackend",
    "KubernetesBackendError",
    "SecretSource",
    "agent_nats_env",
    "build_map_job",
    "build_phase_job",
    "build_root_configmap",
    "build_secret",
    "job_name",
    "load_api_client",
    "phase_timeout_s",
    "root_name",
    "secret_name",
    "workflow_slug",
]

log = logging.getLogger(__name__)


class KubernetesBackend:
    """:class:`~jetreduce.launcher.backend.AgentBackend` on Kubernetes Indexed Jobs.

    Stateless across restarts: what runs is whatever the API server lists, so a restarted
    launcher (a new Deployment revision) neither relaunches nor loses running Jobs.
    """

    name = "kubernetes"

    def __init__(
        self,
        nats: NatsSettings,
        settings: KubernetesSettings | None = None,
        *,
        api_client: ApiClient | None = None,
        secret_source: SecretSource | None = None,
        on_exit: ExitCallback | None = None,
        on_status: StatusCallback | None = None,
    ) -> None:
        self.nats = nats
        settings = settings or KubernetesSettings()
        self.installation = installation(nats.prefix)
        self.settings = replace(
            settings, labels={**settings.labels, INSTALLATION_LABEL: self.installation}
        )
        self._mine = (
            f"app.kubernetes.io/managed-by={MANAGED_BY},{INSTALLATION_LABEL}={self.installation}"
        )
        self.kube = KubeApi(api_client, self.settings.request_timeout_s)
        self.secret_source = secret_source
        self.on_exit = on_exit
        self.on_status = on_status
        self._seen: dict[str, JobSeen] = {}
        """Job name → what the poller last saw."""
        self._poller: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._denied: dict[tuple[str, str], str] = {}
        """(operation, namespace) → the permanent error last logged for it."""
        self._polled = asyncio.Event()
        """Set by the first successful poll: from then on :meth:`running` knows every Job."""

    # -- AgentBackend ---------------------------------------------------------------------
    def plan(self, parallel: int) -> list[int]:
        """Pods and slots per pod: ``ceil(parallel / slots_per_pod)`` pods sharing ``parallel``
        slots evenly (a Job's pods are identical, so it rounds up: at most pods-1 extra)."""
        parallel = max(1, parallel)
        pods = math.ceil(parallel / self.settings.slots_per_pod)
        return [math.ceil(parallel / pods)] * pods

    def running(self, wf: str, phase: str) -> bool:
        """As of the last poll (or this process's own launch). Before the first poll it
        knows only this process's own launches: call :meth:`sync` first where a missed Job
        matters (slot accounting after a launcher restart)."""
        return any(s.wf == wf and s.phase == phase and not s.finished for s in self._seen.values())

    async def sync(self) -> None:
        """Return once :meth:`running` reflects every Job the API server lists, i.e. after
        the poller's first successful poll (started here if need be). A restarted launcher
        learns of the Jobs its predecessor left running only this way; deciding admission
        before it would count their slots as free. Raises :class:`KubernetesBackendError`
        if no poll succeeds within a bound (the caller's event or reconcile is retried)."""
        if self._polled.is_set():
            return
        self._ensure_poller()
        bound_s = 2 * self.settings.request_timeout_s * (1 + len(self.settings.namespaces))
        try:
            await asyncio.wait_for(self._polled.wait(), bound_s)
        except TimeoutError:
            raise KubernetesBackendError(
                f"kubernetes: Jobs not listed within {bound_s:g}s (see the poll warnings)"
            ) from None

    def refusal(self, spec: StoredSpec) -> str | None:
        """Only workflows that ask for pods (``backend: kubernetes``), in a namespace of this
        installation. A ``local`` workflow is refused rather than run as pods: its
        submitter expects its commands on the submitter's disk (``workdir``), which pods
        do not have, so it would fail later and less clearly."""
        opts = spec.options
        if opts.backend != "kubernetes":
            return (
                f"could not start: the workflow asks for the {opts.backend} backend (the "
                "default when none is named), but this installation runs agents as Kubernetes "
                "pods (submit with --backend kubernetes)"
            )
        if opts.namespace and opts.namespace not in self.settings.namespaces:
            return (
                f"could not start: namespace {opts.namespace!r} is not one this installation "
                f"may use ({', '.join(self.settings.namespaces)})"
            )
        return None

    def _workflow_settings(self, spec: StoredSpec) -> KubernetesSettings:
        """This installation's settings with the workflow's own namespace and image."""
        opts = spec.options
        return replace(
            self.settings,
            namespace=opts.namespace or self.settings.namespace,
            image=opts.image or self.settings.image,
        )

    async def launch(self, wf: str, phase: str, slots: list[int], spec: StoredSpec) -> int:
        """Create the root ConfigMap, the Secret and the phase's Job, each create-or-keep
        (409 means a previous attempt got there). Returns the Job's pod count, or 0 if the
        phase already has a Job: any run of it, so that the launcher's reconciler never
        starts a second first run beside a relaunch (say, after the first run's TTL).

        An API error that no retry changes (no Role in the namespace, no such namespace,
        an object the server rejects) fails the workflow at once with the API's message
        (the final ``agent.exited``) and returns 0; a transient one is raised, for the
        launcher to retry the event."""
        try:
            return await self._launch(wf, phase, slots, spec)
        except PermanentApiError as exc:
            log.warning("workflow %s: %s agents could not be created: %s", wf, phase, exc)
            await self._notify(wf, phase, -1, -1, False, 0, f"could not be created: {exc}")
            return 0

    async def _launch(self, wf: str, phase: str, slots: list[int], spec: StoredSpec) -> int:
        settings = self._workflow_settings(spec)
        ns = settings.namespace
        existing = await self.kube.call(
            self.kube.batch.list_namespaced_job,
            ns,
            label_selector=(
                f"{WORKFLOW_LABEL}={workflow_slug(wf)},{PHASE_LABEL}={phase},"
                f"{INSTALLATION_LABEL}={self.installation}"
            ),
        )
        if existing.get("items"):
            for job in existing["items"]:
                meta = job.get("metadata", {})
                self._seen.setdefault(
                    meta.get("name", ""), JobSeen(wf, phase, attempt_of(meta), namespace=ns)
                )
            self._ensure_poller()
            return 0
        root = await self._ensure_root(wf, spec, settings)
        owner = owner_reference(root)
        secret_values = self._nats_secret_env()
        if self.secret_source is not None:
            secret_values.update(await self.secret_source(wf, spec))
        if secret_values:
            await self.kube.create(
                self.kube.core.create_namespaced_secret,
                build_secret(wf, secret_values, settings, owner),
            )
        agents = max(1, len(slots))
        job = build_phase_job(
            wf,
            phase,
            completions=agents,
            slots=max(slots) if slots else 1,
            settings=settings,
            nats_env=self._nats_plain_env(),
            secret_keys=sorted(secret_values),
            owner=owner,
            timeout_s=phase_timeout_s(spec, phase),
            workflow_image=bool(spec.options.image),
        )
        created = await self.kube.create(self.kube.batch.create_namespaced_job, job)
        name = job["metadata"]["name"]
        self._seen.setdefault(name, JobSeen(wf, phase, namespace=ns))
        self._ensure_poller()
        return agents if created else 0

    async def stop(self, wf: str, phase: str | None = None, grace_s: float = 10.0) -> None:
        """Delete the workflow's Jobs (of ``phase``, or all, with Background propagation so
        their pods get their grace period) and, for the whole workflow, its root ConfigMap
        (the garbage collector then removes its Secret).
        Idempotent; ``grace_s`` is unused: pods have ``terminationGracePeriodSeconds``."""
        selector = f"{WORKFLOW_LABEL}={workflow_slug(wf)},{INSTALLATION_LABEL}={self.installation}"
        if phase is not None:
            selector += f",{PHASE_LABEL}={phase}"

        # Every namespace a workflow may use: the workflow's own is not known here (a
        # janitor sweep has no spec), and one call per allowed namespace is cheap. Each on
        # its own (see _each_namespace).
        async def stop_in(ns: str) -> None:
            if self.on_status is not None:
                await self._announce_stopped(ns, selector)
            await self.kube.call(
                self.kube.batch.delete_collection_namespaced_job,
                ns,
                label_selector=selector,
                propagation_policy="Background",
            )
            if phase is None:
                await self._delete_root(wf, ns)

        await self._each_namespace("stop", stop_in)
        for name, seen in list(self._seen.items()):
            if seen.wf == wf and (phase is None or seen.phase == phase):
                del self._seen[name]

    async def _delete_root(self, wf: str, ns: str) -> None:
        """The workflow's root ConfigMap, by name (no deletecollection in the services' own
        namespace, whose ConfigMaps hold the installation's settings), if it is this
        installation's (another one sharing the namespace may have a workflow of the same
        id), guarded by its uid. The garbage collector takes its children, the Secret
        included."""
        try:
            root = await self.kube.call(
                self.kube.core.read_namespaced_config_map, root_name(wf), ns
            )
        except PermanentApiError as exc:
            if exc.status == 404:
                return
            raise
        meta = root.get("metadata") or {}
        if (meta.get("labels") or {}).get(INSTALLATION_LABEL) != self.installation:
            return
        await self.kube.call(
            self.kube.core.delete_namespaced_config_map,
            root_name(wf),
            ns,
            body={"propagationPolicy": "Background", "preconditions": {"uid": meta.get("uid")}},
        )

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

    async def stop_all(self, grace_s: float = 10.0) -> None:
        """Stop watching; leave every Job running. Unlike local child processes, pods do not
        die with the launcher, and deleting them on a launcher restart (an upgrade) would
        throw away all work in flight; the next launcher finds them by label."""
        self._stopping.set()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None

    # -- janitor support ------------------------------------------------------------------
    async def workflows(self) -> set[str]:
        """Ids of every workflow that has objects in the namespace (for orphan sweeps)."""
        found: set[str] = set()

        async def list_in(ns: str) -> None:
            # Not Secrets: every one is owned by its workflow's root ConfigMap (created
            # first), so the roots find them, and nothing here may read a Secret.
            for lister in (
                self.kube.batch.list_namespaced_job,
                self.kube.core.list_namespaced_config_map,
            ):
                listed = await self.kube.call(lister, ns, label_selector=self._mine)
                for item in listed.get("items", []):
                    meta = item.get("metadata", {})
                    wf = meta.get("annotations", {}).get(WORKFLOW_ANNOTATION)
                    if wf:
                        found.add(wf)

        # What the reachable namespaces hold is worth sweeping even if one is not.
        await self._each_namespace("sweep", list_in, all_failed_only=True)
        return found

    # -- internals ------------------------------------------------------------------------
    def _nats_plain_env(self) -> dict[str, str]:
        return agent_nats_env(self.nats, self.settings, os.environ)

    def _nats_secret_env(self) -> dict[str, str]:
        if self.settings.nats_env_secret:
            return {}  # agents have a NATS identity of their own
        env = self.nats.to_env()
        return {k: env[k] for k in secret_env_keys() if k in env}

    async def _ensure_root(
        self, wf: str, spec: StoredSpec, settings: KubernetesSettings
    ) -> dict[str, Any]:
        body = build_root_configmap(wf, spec, settings)
        created: dict[str, Any] | None = await self.kube.create(
            self.kube.core.create_namespaced_config_map, body
        )
        if created is not None:
            return created
        existing: dict[str, Any] = await self.kube.call(
            self.kube.core.read_namespaced_config_map, body["metadata"]["name"], settings.namespace
        )
        return existing

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._stopping.clear()
            self._poller = asyncio.create_task(self._poll_loop(), name="kubernetes job poller")

    async def _poll_loop(self) -> None:
        last_error = ""
        while not self._stopping.is_set():
            try:
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
            # Every index ran to its end and one succeeded: an agent exits 0 only once its
            # phase is over, so the phase's outcome is decided (by the aggregator), and
            # neither a relaunch nor a give-up may race it.
            decided = (
                job_failed and reason == "FailedIndexes" and int(status.get("succeeded") or 0) > 0
            )
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
        slots = next((e.get("value") for e in env if e.get("name") == "JETREDUCE_SLOTS"), "1")
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
            slots=int(slots or 1),
            settings=settings,
            nats_env=self._nats_plain_env(),
            secret_keys=secret_keys,
            owner=owners[0] if owners else None,
            timeout_s=timeout_s,
            attempt=seen.attempt + 1,
            workflow_image=bool(image),
        )
        # 409: another launcher replica (or this one before a restart) got there first.
        await self.kube.create(self.kube.batch.create_namespaced_job, body)
        name = body["metadata"]["name"]
        self._seen.setdefault(
            name, JobSeen(seen.wf, seen.phase, seen.attempt + 1, namespace=settings.namespace)
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
        for pod in pods.get("items", []):
            meta = pod.get("metadata", {})
            pod_status = pod.get("status") or {}
            if pod_status.get("phase") != "Failed" or meta.get("name") in seen.reported_pods:
                continue
            seen.reported_pods.add(meta.get("name", ""))
            index = pod_index(meta)
            code = exit_code(pod_status)
            restart = relaunch if job_failed else index not in failed_indexes
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
