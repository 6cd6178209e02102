"""Names, labels and the pure builders of the objects the ``kubernetes`` backend creates.

Objects per workflow (all in the workflow's namespace, all labelled
``jetreduce.io/workflow=<slug>``)::

    ConfigMap jr-<slug>            the root: workflow id, name, agent template (for people)
     ├── Secret jr-<slug>-env      NATS password/token and workflow secrets (secretKeyRef only)
     ├── Job jr-<slug>-setup       Indexed, completions 1
     ├── Job jr-<slug>-map         Indexed, completions = parallelism = number of agents
     ├── Job jr-<slug>-map-2 …     the same, relaunched after the first failed as a whole
     └── Job jr-<slug>-reduce      Indexed, completions 1

Children carry an ``ownerReference`` to the root (created first, so every child has one),
so deleting the root ConfigMap lets the garbage collector remove everything;
:meth:`KubernetesBackend.stop` deletes the Jobs by label (their pods get their grace period
at once) and the root by name, and leaves the Secret to the collector: the Role needs no
``deletecollection`` on ConfigMaps or Secrets, nor any read of a Secret.
Setup and reduce are Indexed Jobs of one completion so that every agent
pod reads ``JOB_COMPLETION_INDEX`` the same way.

The builders (:func:`build_root_configmap`, :func:`build_secret`, :func:`build_map_job`,
:func:`build_phase_job`) are pure functions returning plain dicts, so tests validate them
against the Kubernetes OpenAPI schemas without a cluster.

Nothing here talks to a cluster or imports the ``kubernetes`` client.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec

from jetreduce.contract.records import StoredSpec
from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.runtime.settings import SECRET_FIELDS, NatsSettings

WORKFLOW_LABEL = "jetreduce.io/workflow"
PHASE_LABEL = "jetreduce.io/phase"
WORKFLOW_ANNOTATION = "jetreduce.io/workflow-id"
"""The exact workflow id (the label holds a slug that fits label and name rules)."""
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
        # No backoffLimit: see KubernetesSettings.non_retriable_exit_codes.
        "podFailurePolicy": {"rules": pod_failure_rules(settings)},
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


def pod_failure_rules(settings: KubernetesSettings) -> list[dict[str, Any]]:
    """The Job's ``podFailurePolicy``, first match wins: a disruption (eviction, preemption,
    node drain) retries the index without using its budget (the agent handed its items back
    on SIGTERM); an exit no retry can change fails the index at once."""
    rules: list[dict[str, Any]] = [
        {
            "action": "Ignore",
            "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
        }
    ]
    if settings.non_retriable_exit_codes:
        rules.append(
            {
                "action": "FailIndex",
                "onExitCodes": {
                    "containerName": AGENT_CONTAINER,
                    "operator": "In",
                    "values": sorted(set(settings.non_retriable_exit_codes)),
                },
            }
        )
    return rules


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


def secret_env_keys() -> list[str]:
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
    dropped = [*secret_env_keys(), *(_CREDENTIAL_ENV if settings.nats_env_secret else ())]
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
    """The phase's time bound, for its Job's ``activeDeadlineSeconds``: the workflow's whole
    budget (``--timeout``, which the janitor enforces first) bounds every phase, setup's own
    ``timeout`` bounds setup; None when neither is stated."""
    bounds = [spec.options.timeout_s]
    if phase == "setup" and spec.workflow.setup is not None:
        bounds.append(spec.workflow.setup.timeout_s)
    known = [b for b in bounds if b is not None and b > 0]
    return min(known) if known else None
