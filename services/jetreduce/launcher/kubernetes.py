"""Kubernetes backend: agents are the pods of one Indexed Job per workflow phase.

Objects per workflow (all in ``KubernetesSettings.namespace``, all labelled
``jetreduce.io/workflow=<slug>``)::

    ConfigMap jr-<slug>            the root: workflow id, name, agent template (for people)
     ├── Secret jr-<slug>-env      NATS password/token and workflow secrets (secretKeyRef only)
     ├── Job jr-<slug>-setup       Indexed, completions 1
     ├── Job jr-<slug>-map         Indexed, completions = parallelism = number of agents
     ├── Job jr-<slug>-map-2 …     the same, relaunched after the first failed as a whole
     └── Job jr-<slug>-reduce      Indexed, completions 1

Children carry an ``ownerReference`` to the root, so deleting the root ConfigMap lets the
garbage collector remove everything; :meth:`KubernetesBackend.stop` does not rely on that and
deletes by label (one ``deletecollection`` per kind), which also catches children whose root
was never created. Setup and reduce are Indexed Jobs of one completion so that every agent
pod reads ``JOB_COMPLETION_INDEX`` the same way.

The builders (:func:`build_root_configmap`, :func:`build_secret`, :func:`build_map_job`,
:func:`build_phase_job`) are pure functions returning plain dicts, so tests validate them
against the Kubernetes OpenAPI schemas without a cluster.

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

This is the only module that imports the ``kubernetes`` client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from jetreduce.contract.events import JobStatus, PodFailed
from jetreduce.contract.records import StoredSpec
from jetreduce.launcher.backend import ExitCallback, StatusCallback
from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.runtime.settings import SECRET_FIELDS, NatsSettings

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
    "build_map_job",
    "build_phase_job",
    "build_root_configmap",
    "build_secret",
    "job_name",
    "load_api_client",
    "root_name",
    "secret_name",
    "workflow_slug",
]

log = logging.getLogger(__name__)

WORKFLOW_LABEL = "jetreduce.io/workflow"
PHASE_LABEL = "jetreduce.io/phase"
WORKFLOW_ANNOTATION = "jetreduce.io/workflow-id"
INSTALLATION_LABEL = "jetreduce.io/installation"
"""The installation's NATS prefix (``default`` without one): every object carries it and
every list selects it, so installations sharing a namespace never see (or sweep) each
other's objects."""


def installation(prefix: str) -> str:
    """A label value for a NATS prefix (at most 63 characters of [A-Za-z0-9._-])."""
    value = re.sub(r"[^A-Za-z0-9._-]", "-", prefix).strip("-._") or "default"
    if len(value) > 63:
        value = value[:50].rstrip("-._") + "-" + hashlib.sha256(prefix.encode()).hexdigest()[:12]
    return value


"""The exact workflow id (the label holds a slug that fits label and name rules)."""
ATTEMPT_ANNOTATION = "jetreduce.io/attempt"
"""On Jobs: 0 for a phase's first Job, n for its n-th relaunch."""
IMAGE_ANNOTATION = "jetreduce.io/image"
"""On Jobs whose workflow chose its agent image: a relaunch keeps it (otherwise a relaunch
takes the installation's current image)."""
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
MANAGED_BY = "jetreduce-launcher"
PART_OF = "jetreduce"
AGENT_CONTAINER = "agent"
CONFIGMAP_TEMPLATE_LIMIT = 512 * 1024
"""Bytes of agent template kept in the root ConfigMap (the object limit is 1 MiB)."""

SecretSource = Callable[[str, StoredSpec], Awaitable[Mapping[str, str]]]
"""(workflow id, spec) → environment variables to hand agents through the workflow's Secret.
Values never travel through JetStream; where they come from is the installation's choice."""

_SLUG_MAX = 40
_BAD_CHARS = re.compile(r"[^a-z0-9-]+")


class KubernetesBackendError(Exception):
    """A Kubernetes API call failed for a reason retrying the same event may fix (the
    launcher's consumer redelivers it). Carries the HTTP status, never the response body."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# -- names and labels ---------------------------------------------------------------------------
def workflow_slug(wf: str) -> str:
    """A DNS-1123 label of at most 40 characters for ``wf``, stable and collision-safe.

    Workflow ids allow ``_`` and capitals, which object names do not; any id that had to be
    changed or cut gets a short hash of the original, so two ids never share a slug."""
    slug = _BAD_CHARS.sub("-", wf.lower()).strip("-")
    if slug == wf and len(slug) <= _SLUG_MAX:
        return slug
    digest = hashlib.sha256(wf.encode()).hexdigest()[:8]
    head = slug[: _SLUG_MAX - 9].strip("-") or "wf"
    return f"{head}-{digest}"


def root_name(wf: str) -> str:
    return f"jr-{workflow_slug(wf)}"


def secret_name(wf: str) -> str:
    return f"jr-{workflow_slug(wf)}-env"


def job_name(wf: str, phase: str, attempt: int = 0) -> str:
    """At most 52 characters: pod names append ``-<index>-<5 chars>`` within 63. A relaunch
    (``attempt`` n ≥ 1) gets a new name, ``…-<phase>-<n+1>``, so the failed Job stays for
    inspection and the new one never races its deletion."""
    suffix = f"-{attempt + 1}" if attempt else ""
    return f"jr-{workflow_slug(wf)}-{phase}{suffix}"


def _labels(wf: str, component: str, instance: str, settings: KubernetesSettings) -> dict[str, str]:
    labels = dict(settings.labels)
    labels.update(
        {
            "app.kubernetes.io/name": "jetreduce-agent",
            "app.kubernetes.io/instance": instance,
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": PART_OF,
            "app.kubernetes.io/managed-by": MANAGED_BY,
            WORKFLOW_LABEL: workflow_slug(wf),
        }
    )
    return labels


def _metadata(
    wf: str,
    name: str,
    component: str,
    settings: KubernetesSettings,
    owner: Mapping[str, Any] | None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": settings.namespace,
        "labels": _labels(wf, component, name, settings),
        "annotations": {**settings.annotations, WORKFLOW_ANNOTATION: wf},
    }
    if owner is not None:
        meta["ownerReferences"] = [dict(owner)]
    return meta


def owner_reference(root: Mapping[str, Any]) -> dict[str, Any]:
    """An ownerReference to the root ConfigMap as the API server returned it (with its uid).

    Not ``controller``/``blockOwnerDeletion``: the root does not manage its children, and
    blocking would need ``update`` on ``configmaps/finalizers`` for no gain."""
    meta = root["metadata"]
    return {"apiVersion": "v1", "kind": "ConfigMap", "name": meta["name"], "uid": meta["uid"]}


# -- builders (pure) ----------------------------------------------------------------------------
def build_root_configmap(wf: str, spec: StoredSpec, settings: KubernetesSettings) -> dict[str, Any]:
    """The workflow's root object. It holds what a person inspecting the namespace wants to
    see (which workflow, which agent template); agents read the spec from JetStream."""
    template = json.dumps(
        [_step_json(s) for s in spec.workflow.map.agent_template], indent=1, sort_keys=True
    )
    if len(template.encode()) > CONFIGMAP_TEMPLATE_LIMIT:
        template = json.dumps({"truncated": True, "bytes": len(template.encode())})
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(wf, root_name(wf), "workflow", settings, None),
        "data": {
            "workflow-id": wf,
            "workflow-name": spec.workflow.name,
            "agent-template.json": template,
        },
    }


def _step_json(step: Any) -> Any:
    return msgspec.to_builtins(step)


def build_secret(
    wf: str,
    values: Mapping[str, str],
    settings: KubernetesSettings,
    owner: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The workflow's Secret: one key per environment variable. Immutable, so kubelets need
    not watch it and nobody can swap credentials under a running Job."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "immutable": True,
        "metadata": _metadata(wf, secret_name(wf), "credentials", settings, owner),
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in sorted(values.items())},
    }


def build_map_job(
    wf: str,
    *,
    agents: int,
    slots: int,
    settings: KubernetesSettings,
    nats_env: Mapping[str, str],
    secret_keys: list[str] | tuple[str, ...] = (),
    owner: Mapping[str, Any] | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """The map phase: ``agents`` pods (``parallelism = completions``), each index retried
    ``backoff_limit_per_index`` times; the Job fails once more than ``maxFailedIndexes``
    indexes have failed. Evictions and drains (``DisruptionTarget``) do not count."""
    return build_phase_job(
        wf,
        "map",
        completions=agents,
        slots=slots,
        settings=settings,
        nats_env=nats_env,
        secret_keys=secret_keys,
        owner=owner,
        timeout_s=timeout_s,
    )


def build_phase_job(
    wf: str,
    phase: str,
    *,
    completions: int = 1,
    slots: int = 1,
    settings: KubernetesSettings,
    nats_env: Mapping[str, str],
    secret_keys: list[str] | tuple[str, ...] = (),
    owner: Mapping[str, Any] | None = None,
    timeout_s: float | None = None,
    attempt: int = 0,
    workflow_image: bool = False,
) -> dict[str, Any]:
    """An Indexed Job running ``jetreduce worker`` for ``phase`` (setup/map/reduce);
    ``attempt`` n ≥ 1 builds the phase's n-th relaunch. ``workflow_image``: the image in
    ``settings`` is the workflow's own choice (recorded, so a relaunch keeps it)."""
    if completions < 1:
        raise ValueError("completions must be >= 1")
    name = job_name(wf, phase, attempt)
    labels = _labels(wf, phase, name, settings)
    labels[PHASE_LABEL] = phase
    meta = _metadata(wf, name, phase, settings, owner)
    meta["labels"] = labels
    meta["annotations"][ATTEMPT_ANNOTATION] = str(attempt)
    if workflow_image:
        meta["annotations"][IMAGE_ANNOTATION] = settings.image
    spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": completions,
        "parallelism": completions,
        "backoffLimitPerIndex": settings.backoff_limit_per_index,
        "maxFailedIndexes": min(
            completions, max(1, math.ceil(settings.max_failed_indexes_ratio * completions))
        ),
        "backoffLimit": settings.backoff_limit,
        "podFailurePolicy": {
            "rules": [
                {
                    # Evictions, preemption, node drains: retry the index without using its
                    # budget (the agent handed its items back on SIGTERM anyway).
                    "action": "Ignore",
                    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                }
            ]
        },
        "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
        "template": {
            "metadata": {
                "labels": labels,
                "annotations": {**settings.annotations, WORKFLOW_ANNOTATION: wf},
            },
            "spec": _pod_spec(wf, phase, slots, settings, nats_env, secret_keys),
        },
    }
    if timeout_s is not None and timeout_s > 0:
        spec["activeDeadlineSeconds"] = math.ceil(timeout_s) + settings.deadline_margin_s
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}


AGENT_PASSTHROUGH = ("OTEL_", "JETREDUCE_LOG_FORMAT")
"""Settings in the launcher's environment that agent pods get as well (local agents inherit
the launcher's environment anyway), so agents export traces and log as the services do."""


def passthrough_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The observability settings to hand to pods: not ``OTEL_SERVICE_NAME`` (agents name
    themselves), and not ``*_HEADERS`` (collector credentials belong in a Secret, never in a
    Job's plain env)."""
    return {
        k: v
        for k, v in environ.items()
        if k.startswith(AGENT_PASSTHROUGH) and k != "OTEL_SERVICE_NAME" and "HEADERS" not in k
    }


def _secret_env_keys() -> list[str]:
    return [f"JETREDUCE_NATS_{name.upper()}" for name in sorted(SECRET_FIELDS)]


_CREDENTIAL_ENV = (
    "JETREDUCE_NATS_CREDS",
    "JETREDUCE_NATS_NKEY_SEED",
    "JETREDUCE_NATS_USER",
    "JETREDUCE_NATS_TLS_CERT",
    "JETREDUCE_NATS_TLS_KEY",
)
"""The launcher's own NATS identity (file paths and user name): not handed to agents that
have one of their own (``nats_env_secret``)."""


def agent_nats_env(
    nats: NatsSettings, settings: KubernetesSettings, environ: Mapping[str, str]
) -> dict[str, str]:
    """The agents' plain NATS environment: the launcher's own settings (never its secrets,
    which go through the workflow's Secret), the installation's agent URL and
    ``nats_env`` over them, and the observability pass-through."""
    env = {**passthrough_env(environ), **nats.to_env()}
    if settings.nats_url:
        env["JETREDUCE_NATS_URL"] = settings.nats_url
    dropped = [*_secret_env_keys(), *(_CREDENTIAL_ENV if settings.nats_env_secret else ())]
    for key in dropped:
        env.pop(key, None)
    env.update(settings.nats_env)
    return env


def _pod_spec(
    wf: str,
    phase: str,
    slots: int,
    settings: KubernetesSettings,
    nats_env: Mapping[str, str],
    secret_keys: list[str] | tuple[str, ...],
) -> dict[str, Any]:
    env: list[dict[str, Any]] = [
        {
            "name": "JOB_COMPLETION_INDEX",
            "valueFrom": {
                "fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}
            },
        },
        {"name": "JETREDUCE_WORKFLOW_ID", "value": wf},
        {"name": "JETREDUCE_PHASE", "value": phase},
        {"name": "JETREDUCE_SLOTS", "value": str(slots)},
        # Leave the agent a few seconds of the pod's grace period to hand items back.
        {"name": "JETREDUCE_GRACE_S", "value": str(max(1, settings.termination_grace_s - 5))},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    env += [{"name": k, "value": v} for k, v in sorted(nats_env.items())]
    env += [
        {"name": k, "valueFrom": {"secretKeyRef": {"name": secret_name(wf), "key": k}}}
        for k in sorted(secret_keys)
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "work", "mountPath": settings.workdir},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": _empty_dir(settings.tmp_size_limit)},
        {"name": "work", "emptyDir": _empty_dir(settings.workdir_size_limit)},
    ]
    if settings.nats_files_secret:
        mounts.append(
            {"name": "nats-files", "mountPath": settings.nats_files_mount, "readOnly": True}
        )
        volumes.append({"name": "nats-files", "secret": {"secretName": settings.nats_files_secret}})
    container: dict[str, Any] = {
        "name": AGENT_CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": list(settings.command),
        "env": env,
        "workingDir": settings.workdir,
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": settings.read_only_root_filesystem,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    resources = settings.resources.to_dict()
    if resources:
        container["resources"] = resources
    if settings.nats_env_secret:
        container["envFrom"] = [{"secretRef": {"name": settings.nats_env_secret}}]
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": settings.termination_grace_s,
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if settings.service_account:
        pod["serviceAccountName"] = settings.service_account
    if settings.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in settings.image_pull_secrets]
    if settings.node_selector:
        pod["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        pod["tolerations"] = [dict(t) for t in settings.tolerations]
    if settings.affinity:
        pod["affinity"] = dict(settings.affinity)
    if settings.topology_spread_constraints:
        pod["topologySpreadConstraints"] = [dict(t) for t in settings.topology_spread_constraints]
    if settings.priority_class_name:
        pod["priorityClassName"] = settings.priority_class_name
    return pod


def _empty_dir(size_limit: str | None) -> dict[str, str]:
    return {"sizeLimit": size_limit} if size_limit else {}


def phase_timeout_s(spec: StoredSpec, phase: str) -> float | None:
    """The phase's own time bound, when the workflow states one (setup's ``timeout``). The
    map phase has none yet: a workflow-level timeout is enforced by the janitor, and once
    ``SubmitOptions`` carries it, it should become the map Job's deadline too."""
    if phase == "setup" and spec.workflow.setup is not None:
        return spec.workflow.setup.timeout_s
    return None


# -- client ----------------------------------------------------------------------------------
def load_api_client() -> k8s.ApiClient:
    """In-cluster service-account credentials when running in a pod, else ``~/.kube/config``
    (or ``$KUBECONFIG``). Blocking file reads: call once at startup."""
    try:
        k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()  # type: ignore[no-untyped-call]
    return k8s.ApiClient()


@dataclass
class _JobSeen:
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
        api_client: k8s.ApiClient | None = None,
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
        self.api = api_client if api_client is not None else load_api_client()
        self.batch = k8s.BatchV1Api(self.api)
        self.core = k8s.CoreV1Api(self.api)
        self.secret_source = secret_source
        self.on_exit = on_exit
        self.on_status = on_status
        self._seen: dict[str, _JobSeen] = {}
        """Job name → what the poller last saw."""
        self._poller: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
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
        starts a second first run beside a relaunch (say, after the first run's TTL)."""
        settings = self._workflow_settings(spec)
        ns = settings.namespace
        existing = await self._call(
            self.batch.list_namespaced_job,
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
                    meta.get("name", ""), _JobSeen(wf, phase, _attempt(meta), namespace=ns)
                )
            self._ensure_poller()
            return 0
        root = await self._ensure_root(wf, spec, settings)
        owner = owner_reference(root)
        secret_values = self._nats_secret_env()
        if self.secret_source is not None:
            secret_values.update(await self.secret_source(wf, spec))
        if secret_values:
            await self._create(
                self.core.create_namespaced_secret,
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
        created = await self._create(self.batch.create_namespaced_job, job)
        name = job["metadata"]["name"]
        self._seen.setdefault(name, _JobSeen(wf, phase, namespace=ns))
        self._ensure_poller()
        return agents if created else 0

    async def stop(self, wf: str, phase: str | None = None, grace_s: float = 10.0) -> None:
        """Delete the workflow's Jobs (of ``phase``, or all, with Background propagation so
        their pods get their grace period) and, for the whole workflow, its ConfigMaps and
        Secrets. Idempotent; ``grace_s`` is unused: pods have ``terminationGracePeriodSeconds``."""
        selector = f"{WORKFLOW_LABEL}={workflow_slug(wf)},{INSTALLATION_LABEL}={self.installation}"
        if phase is not None:
            selector += f",{PHASE_LABEL}={phase}"
        # Every namespace a workflow may use: the workflow's own is not known here (a
        # janitor sweep has no spec), and one call per allowed namespace is cheap.
        for ns in self.settings.namespaces:
            if self.on_status is not None:
                await self._announce_stopped(ns, selector)
            await self._call(
                self.batch.delete_collection_namespaced_job,
                ns,
                label_selector=selector,
                propagation_policy="Background",
            )
            if phase is None:
                for delete in (
                    self.core.delete_collection_namespaced_secret,
                    self.core.delete_collection_namespaced_config_map,
                ):
                    await self._call(delete, ns, label_selector=selector)
        for name, seen in list(self._seen.items()):
            if seen.wf == wf and (phase is None or seen.phase == phase):
                del self._seen[name]

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
        selector = self._mine
        for ns, lister in (
            (ns, lister)
            for ns in self.settings.namespaces
            for lister in (
                self.batch.list_namespaced_job,
                self.core.list_namespaced_config_map,
                self.core.list_namespaced_secret,
            )
        ):
            listed = await self._call(lister, ns, label_selector=selector)
            for item in listed.get("items", []):
                wf = item.get("metadata", {}).get("annotations", {}).get(WORKFLOW_ANNOTATION)
                if wf:
                    found.add(wf)
        return found

    # -- internals ------------------------------------------------------------------------
    def _nats_plain_env(self) -> dict[str, str]:
        return agent_nats_env(self.nats, self.settings, os.environ)

    def _nats_secret_env(self) -> dict[str, str]:
        if self.settings.nats_env_secret:
            return {}  # agents have a NATS identity of their own
        env = self.nats.to_env()
        return {k: env[k] for k in _secret_env_keys() if k in env}

    async def _ensure_root(
        self, wf: str, spec: StoredSpec, settings: KubernetesSettings
    ) -> dict[str, Any]:
        body = build_root_configmap(wf, spec, settings)
        created: dict[str, Any] | None = await self._create(
            self.core.create_namespaced_config_map, body
        )
        if created is not None:
            return created
        existing: dict[str, Any] = await self._call(
            self.core.read_namespaced_config_map, body["metadata"]["name"], settings.namespace
        )
        return existing

    async def _create(self, create: Callable[..., Any], body: dict[str, Any]) -> Any:
        """Create in the body's namespace; None if it already exists (409)."""
        try:
            return await self._call(create, body["metadata"]["namespace"], body)
        except KubernetesBackendError as exc:
            if exc.status == 409:
                return None
            raise

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one API call off the event loop with a bounded timeout; the raw JSON answer
        (no model round trip). 404 on a delete counts as done."""

        def call() -> Any:
            response = fn(
                *args,
                _preload_content=False,
                _request_timeout=self.settings.request_timeout_s,
                **kwargs,
            )
            data = response.data
            return json.loads(data) if data else {}

        try:
            return await asyncio.to_thread(call)
        except ApiException as exc:
            if exc.status == 404 and fn.__name__.startswith("delete"):
                return {}
            raise KubernetesBackendError(
                f"kubernetes {fn.__name__}: {exc.status} {exc.reason}", exc.status
            ) from None
        except Exception as exc:  # urllib3 / connection errors
            raise KubernetesBackendError(f"kubernetes {fn.__name__}: {exc}") from None

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
        """One look at every Job of this installation (one LIST per namespace): report newly
        failed pods through ``on_exit`` (with the container's exit code) and ``on_status``
        (with the pod's reason), announce Jobs that started running or finished, and
        replace (or give up on) a phase whose current Job failed as a whole."""
        jobs: list[tuple[str, str, str, str, int, dict[str, Any]]] = []
        current: dict[tuple[str, str], int] = {}
        """(workflow, phase) → the highest attempt listed: that phase's current Job."""
        for ns in self.settings.namespaces:
            listed = await self._call(
                self.batch.list_namespaced_job,
                ns,
                label_selector=self._mine,
            )
            for job in listed.get("items", []):
                meta = job.get("metadata", {})
                wf = meta.get("annotations", {}).get(WORKFLOW_ANNOTATION)
                phase = meta.get("labels", {}).get(PHASE_LABEL)
                if not wf or not phase:
                    continue
                attempt = _attempt(meta)
                jobs.append((ns, meta.get("name", ""), wf, phase, attempt, job))
                current[(wf, phase)] = max(current.get((wf, phase), 0), attempt)
        for ns, name, wf, phase, attempt, job in jobs:
            seen = self._seen.setdefault(name, _JobSeen(wf, phase, attempt, namespace=ns))
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
            # A failed Job's pods come back when a newer run of the phase exists or will.
            superseded = attempt < current[(wf, phase)]
            relaunch = superseded or (job_failed and self._may_relaunch(seen, reason))
            reported = 0
            failed = int(status.get("failed") or 0)
            # Any change of the Job (a pod ended, was replaced, became ready) is a reason to
            # look at its pods: a disrupted pod is replaced without counting as ``failed``.
            version = f"{job.get('metadata', {}).get('resourceVersion', '')}:" + json.dumps(
                status, sort_keys=True
            )
            changed, seen.version = version != seen.version, version
            if failed > seen.failed or (changed and self.on_status is not None):
                pods = await self._call(
                    self.core.list_namespaced_pod,
                    ns,
                    label_selector=f"batch.kubernetes.io/job-name={name}",
                )
                await self._pod_events(name, seen, pods)
                if failed > seen.failed:
                    seen.failed = failed
                    completions = int((job.get("spec") or {}).get("completions") or 1)
                    reported = await self._report_pods(
                        seen, job_failed, relaunch, status, completions, pods, reason
                    )
            await self._job_events(name, seen, status, conditions)
            if job_failed and not superseded:
                await self._after_job_failed(seen, job, reason, relaunch, reported)
        present = {name for _, name, *_ in jobs}
        for name in set(self._seen) - present:
            del self._seen[name]  # deleted (by us, the janitor, or its TTL)
        self._polled.set()

    def _may_relaunch(self, seen: _JobSeen, reason: str) -> bool:
        """Within the phase's budget: a relaunch left, and time left (a Job that hit its
        ``activeDeadlineSeconds`` used the phase's time; another run would only extend it)."""
        return reason != "DeadlineExceeded" and seen.attempt < self.settings.max_relaunches

    @staticmethod
    def _give_up_reason(seen: _JobSeen, reason: str, code: int) -> str:
        """The end of ``AgentExited.reason`` when the phase is given up: the aggregator
        fails the workflow with "<phase> agents <this>"."""
        job = job_name(seen.wf, seen.phase, seen.attempt)
        if reason == "DeadlineExceeded":
            return f"ran out of time: Job {job} failed with DeadlineExceeded"
        runs = f" after {seen.attempt} relaunch(es)" if seen.attempt else ""
        return (
            f"kept crashing (last exit code {code}): Job {job} failed with "
            f"{reason or 'no reason given'}{runs}"
        )

    async def _after_job_failed(
        self, seen: _JobSeen, job: Mapping[str, Any], reason: str, relaunch: bool, reported: int
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

    async def _relaunch(self, seen: _JobSeen, failed: Mapping[str, Any]) -> None:
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
        await self._create(self.batch.create_namespaced_job, body)
        name = body["metadata"]["name"]
        self._seen.setdefault(
            name, _JobSeen(seen.wf, seen.phase, seen.attempt + 1, namespace=settings.namespace)
        )
        log.warning("workflow %s: relaunched the %s phase as Job %s", seen.wf, seen.phase, name)

    async def _report_pods(
        self,
        seen: _JobSeen,
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
        failed_indexes = _parse_indexes(str(status.get("failedIndexes") or ""))
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
            index = _pod_index(meta)
            code = _exit_code(pod_status)
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

    async def _pod_events(self, job: str, seen: _JobSeen, pods: Mapping[str, Any]) -> None:
        """One ``PodFailed`` per pod that failed or was disrupted (evicted, preempted,
        drained: such a pod may even have succeeded, having handed its items back)."""
        if self.on_status is None:
            return
        for pod in pods.get("items", []):
            meta = pod.get("metadata", {})
            name = meta.get("name", "")
            pod_status = pod.get("status") or {}
            disruption = _condition(pod_status, "DisruptionTarget")
            if name in seen.pod_events or (
                pod_status.get("phase") != "Failed" and disruption is None
            ):
                continue
            seen.pod_events.add(name)
            reason, message = _pod_reason(pod_status, disruption)
            code = _exit_code(pod_status)
            await self._status(
                PodFailed(
                    workflow_id=seen.wf,
                    phase=seen.phase,
                    job=job,
                    pod=name,
                    index=_pod_index(meta),
                    reason=reason,
                    exit_code=None if code == -1 else code,
                    disruption=disruption is not None,
                    message=message[:256],
                )
            )

    async def _job_events(
        self,
        job: str,
        seen: _JobSeen,
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
        await self._status(_job_status(seen.wf, seen.phase, job, state, status, reason))

    async def _announce_stopped(self, ns: str, selector: str) -> None:
        """Before ``stop`` deletes Jobs: the last word on each this launcher has not yet
        seen finish: ``complete``/``failed`` if it had, else ``stopped`` (deleted while its
        pods ran, because its phase or its workflow ended)."""
        listed = await self._call(self.batch.list_namespaced_job, ns, label_selector=selector)
        for job in listed.get("items", []):
            meta = job.get("metadata", {})
            wf = meta.get("annotations", {}).get(WORKFLOW_ANNOTATION)
            phase = meta.get("labels", {}).get(PHASE_LABEL)
            name = meta.get("name", "")
            if not wf or not phase:
                continue
            seen = self._seen.get(name) or _JobSeen(wf, phase, _attempt(meta), namespace=ns)
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
            await self._status(_job_status(wf, phase, name, "stopped", status, ""))

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


def _job_status(
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


def _pod_index(meta: Mapping[str, Any]) -> int:
    try:
        return int((meta.get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION, "-1"))
    except ValueError:
        return -1


def _condition(pod_status: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for c in pod_status.get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return dict(c)
    return None


def _pod_reason(
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


def _attempt(meta: Mapping[str, Any]) -> int:
    """A Job's run number (0 for Jobs made before relaunches existed, or by hand)."""
    try:
        return int((meta.get("annotations") or {}).get(ATTEMPT_ANNOTATION) or 0)
    except ValueError:
        return 0


def _exit_code(pod_status: Mapping[str, Any]) -> int:
    """The agent container's exit code; -1 when the pod failed without one (evicted, lost)."""
    for cs in pod_status.get("containerStatuses") or []:
        if cs.get("name") == AGENT_CONTAINER:
            terminated = (cs.get("state") or {}).get("terminated") or {}
            if "exitCode" in terminated:
                return int(terminated["exitCode"])
    return -1


def _parse_indexes(text: str) -> set[int]:
    """``"1,3-5"`` → ``{1, 3, 4, 5}`` (the Job status's compressed index lists)."""
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out
