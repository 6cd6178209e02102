"""Kubernetes backend: agents are the pods of one Indexed Job per workflow phase.

The objects and their builders are in :mod:`jetreduce.launcher.k8s_manifests`, the API calls
in :mod:`jetreduce.launcher.k8s_api`, what Job and pod status say in
:mod:`jetreduce.launcher.k8s_status`.

The poller (listing Jobs and pods, released slots) is in :mod:`jetreduce.launcher.k8s_poller`,
which this backend extends; it extends in turn :mod:`jetreduce.launcher.k8s_relaunch` (a failed
Job run again or given up) and :mod:`jetreduce.launcher.k8s_reports` (exits, pod and Job
status reported to the launcher).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from jetreduce.contract.records import StoredSpec
from jetreduce.launcher.backend import ExitCallback, StatusCallback
from jetreduce.launcher.k8s_api import (
    ApiClient,
    KubeApi,
    KubernetesBackendError,
    PermanentApiError,
    TransientApiError,
    load_api_client,
)
from jetreduce.launcher.k8s_manifests import (
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
from jetreduce.launcher.k8s_poller import JobPoller
from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.launcher.k8s_status import JobSeen, attempt_of, held_slots
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

POD_GONE_POLL_S = 0.5
"""How often a stop of one phase looks whether its pods are gone (see ``stop``)."""
POD_GONE_MARGIN_S = 15.0
"""Past the pods' grace period, how long that stop waits for them at most."""


class KubernetesBackend(JobPoller):
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
        self.may_act: Callable[[], bool] = lambda: True
        self.earlier_failures: Callable[[str], Awaitable[set[str]]] | None = None
        self.on_released: Callable[[str, str], Awaitable[None]] | None = None
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

    def held(self, wf: str, phase: str) -> int | None:
        """Slots of the phase's Jobs that have not finished, as of the last poll (or this
        process's own launch): each index not yet ended, times its pod's slots. An index
        whose agent drained (exit 0: the queue ran dry) succeeded, and its pod is not run
        again, so its slots stop counting at the next poll; the Job itself is not scaled
        down (see docs/kubernetes.md, elastic slots). None if a Job's status is unknown."""
        jobs = [
            s for s in self._seen.values() if s.wf == wf and s.phase == phase and not s.finished
        ]
        if any(s.held is None for s in jobs):
            return None
        return sum(s.held or 0 for s in jobs)

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
            raise TransientApiError(
                f"kubernetes: Jobs not listed within {bound_s:g}s (see the poll warnings)"
            ) from None

    def refusal(self, spec: StoredSpec) -> str | None:
        """Only workflows that ask for pods (``backend: kubernetes``), in a namespace of this
        installation, with an image it lets workflows choose (``workflow_images``). A
        ``local`` workflow is refused rather than run as pods: its submitter expects its
        commands on the submitter's disk (``workdir``), which pods do not have, so it would
        fail later and less clearly."""
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
        allowed = self.settings.workflow_images
        if opts.image and allowed is not None and not _image_allowed(opts.image, allowed):
            return (
                f"could not start: image {opts.image!r} is not one this installation lets "
                f"workflows choose ({', '.join(allowed) or 'none'})"
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
                    meta.get("name", ""),
                    JobSeen(wf, phase, attempt_of(meta), namespace=ns, held=held_slots(job)),
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
        if not self.may_act():  # the launcher's fence, asked again after the calls above
            return 0
        created = await self.kube.create(self.kube.batch.create_namespaced_job, job)
        name = job["metadata"]["name"]
        self._seen.setdefault(name, JobSeen(wf, phase, namespace=ns, held=held_slots(job)))
        self._ensure_poller()
        return agents if created else 0

    async def stop(self, wf: str, phase: str | None = None, grace_s: float = 10.0) -> None:
        """Delete the workflow's Jobs (of ``phase``, or all, with Background propagation so
        their pods get their grace period) and, for the whole workflow, its root ConfigMap
        (the garbage collector then removes its Secret). Of one phase: return once its pods
        no longer run (as the local backend's stop returns once its processes have exited).
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
        if phase is not None:
            await self._until_pods_gone(wf, phase, selector)

    async def _until_pods_gone(self, wf: str, phase: str, selector: str) -> None:
        """A deleted Job's pods run on for their grace period (handing items back). A stop
        of one phase (the map's, after ``map.complete``, which the launcher runs in the
        background while it counts their slots) returns once none of them runs, so that
        their slots are freed only then; bounded by the grace period and a margin. Not for
        a whole workflow (its end, the janitor): nobody counts those."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.termination_grace_s + POD_GONE_MARGIN_S
        every_s = min(POD_GONE_POLL_S, self.settings.poll_interval_s)
        while True:
            running = False

            async def look(ns: str) -> None:
                nonlocal running
                pods = await self.kube.call(
                    self.kube.core.list_namespaced_pod, ns, label_selector=selector
                )
                running = running or any(
                    (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
                    for p in pods.get("items", [])
                )

            with contextlib.suppress(KubernetesBackendError):  # transient: look again
                await self._each_namespace("stop", look)
            if not running:
                return
            if loop.time() >= deadline:
                log.warning("workflow %s: %s pods still running after their grace", wf, phase)
                return
            await asyncio.sleep(every_s)

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

    async def stop_all(self, grace_s: float = 10.0) -> None:
        """Stop watching; leave every Job running. Unlike local child processes, pods do not
        die with the launcher, and deleting them on a launcher restart (an upgrade) or a
        change of leader would throw away all work in flight; the next leader finds them
        by label. What the poller saw is forgotten: should this replica lead again, it
        lists afresh before it counts slots (:meth:`sync`)."""
        self._stopping.set()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        self._polled.clear()
        self._seen.clear()

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


def _image_allowed(image: str, allowed: tuple[str, ...]) -> bool:
    """``image`` is one of ``allowed``, an entry ending in ``*`` matching any image that
    starts with the rest (``registry.example/team/*``)."""
    return any(image.startswith(a[:-1]) if a.endswith("*") else image == a for a in allowed)
