"""Settings of the ``kubernetes`` launcher backend, one set per installation.

Kept apart from :mod:`jetreduce.launcher.kubernetes` so the CLI can build and validate them
without importing the ``kubernetes`` client. A workflow may override two of them at submit
time, ``SubmitOptions.image`` and ``SubmitOptions.namespace`` (one of :attr:`namespaces`),
merged over these in the backend; other per-workflow overrides (resources, node placement)
are not supported yet and would belong in ``SubmitOptions`` the same way, as names and sizes
only (never secrets).

An installation sets the agent pods' settings in one YAML file (the ``jetreduce-agents``
ConfigMap of ``deploy/kustomize``, ``agents.yaml``), read by :func:`from_file_data`: its keys
are Kubernetes' own spellings (``nodeSelector``, ``tolerations``, ``resources`` …), checked
all at once, and every key is documented in ``docs/kubernetes.md``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from jetreduce.contract.errors import PermanentError

__all__ = ["KubernetesSettings", "Resources", "SettingsFileError", "from_file_data"]


_RESOURCE_NAMES = ("cpu", "memory", "ephemeral-storage")


@dataclass(frozen=True)
class Resources:
    """Container requests/limits as Kubernetes quantities (``"500m"``, ``"512Mi"``)."""

    cpu_request: str | None = "250m"
    memory_request: str | None = "256Mi"
    cpu_limit: str | None = None
    """No CPU limit by default: throttling slows agents without protecting the node."""
    memory_limit: str | None = "1Gi"
    """A memory limit keeps a runaway agent from starving its neighbours (OOM-kill → retry)."""
    ephemeral_storage_request: str | None = None
    ephemeral_storage_limit: str | None = None
    """Node disk for the container's writable layer, logs and its emptyDirs (git checkouts
    in the workdir): beyond the limit the kubelet evicts the pod."""

    def to_dict(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for kind, values in (
            ("requests", (self.cpu_request, self.memory_request, self.ephemeral_storage_request)),
            ("limits", (self.cpu_limit, self.memory_limit, self.ephemeral_storage_limit)),
        ):
            given = {name: v for name, v in zip(_RESOURCE_NAMES, values, strict=True) if v}
            if given:
                out[kind] = given
        return out


@dataclass(frozen=True)
class KubernetesSettings:
    """Where and how agent pods run. Every field has a default that works on kind/minikube
    with the ``dev`` overlay; production sets ``image`` (a pinned tag or digest) at least."""

    namespace: str = "jetreduce"
    workflow_namespaces: tuple[str, ...] = ()
    """Namespaces besides ``namespace`` that a workflow may ask for (``--namespace`` on
    submit). A closed list: the launcher's Role must exist in each, and the poller, ``stop``
    and the janitor's sweep look in each (one call per namespace), since no cluster-wide
    access is wanted. A workflow asking for any other namespace fails with the reason."""
    image: str = "jetreduce:latest"
    workflow_images: tuple[str, ...] | None = None
    """The images a workflow may choose for its agents (``--image``): exact names, or
    prefixes ending in ``*``; empty: none (every workflow runs the installation's image);
    None: any. A workflow asking for another is refused with the reason. Agents run the
    workflow's commands either way; what this bounds is which code, from which registry."""
    image_pull_policy: str = "IfNotPresent"
    command: tuple[str, ...] = ("jetreduce", "worker")
    """The agent's argv; the image's entrypoint is ``jetreduce``, so this is explicit."""
    resources: Resources = field(default_factory=Resources)
    service_account: str | None = "jetreduce-agent"
    """Agents need no Kubernetes API access; a dedicated account without a Role, whose token
    is not mounted (``automountServiceAccountToken: false``)."""
    image_pull_secrets: tuple[str, ...] = ()
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    """Kubernetes toleration objects as dicts (``{"key": …, "operator": …, "effect": …}``)."""
    affinity: Mapping[str, Any] | None = None
    """A pod ``affinity`` object, as Kubernetes spells it."""
    topology_spread_constraints: tuple[Mapping[str, Any], ...] = ()
    """Pod ``topologySpreadConstraints``, as Kubernetes spells them."""
    priority_class_name: str | None = None
    nats_url: str | None = None
    """The NATS URL as seen from agent pods; None: the launcher's own URL."""
    nats_files_secret: str | None = None
    """An existing Secret holding NATS ``.creds``/NKEY/TLS files, mounted read-only at
    ``nats_files_mount``; point the NATS file settings at paths under that directory."""
    nats_files_mount: str = "/var/run/jetreduce/nats"
    nats_env: Mapping[str, str] = field(default_factory=dict)
    """Plain environment variables for agents, over the launcher's own NATS settings (say
    ``JETREDUCE_NATS_CREDS`` pointing into ``nats_files_mount``). Paths and names only:
    secrets belong in ``nats_env_secret``."""
    nats_env_secret: str | None = None
    """An existing Secret whose keys become the agents' environment (``envFrom``), e.g.
    ``JETREDUCE_NATS_USER``/``JETREDUCE_NATS_PASSWORD``: agents then get their own NATS
    identity, and none of the launcher's credentials (password, token, file paths)."""
    slots_per_pod: int = 1
    """Map slots per pod. 1 follows the Job model (``parallelism = max_parallel``); more
    packs several concurrent items into one pod when per-pod overhead matters."""
    backoff_limit_per_index: int = 3
    """Pod failures tolerated per index before the index is failed (needs k8s ≥ 1.29)."""
    max_failed_indexes_ratio: float = 0.5
    """``maxFailedIndexes = ceil(ratio * completions)``: beyond it the Job fails fast."""
    non_retriable_exit_codes: tuple[int, ...] = (2,)
    """Agent exit codes that no retry can change: the Job's ``podFailurePolicy`` fails the
    index at once (``FailIndex``) instead of spending its backoff, and the phase is not
    relaunched. 2: the agent found no such workflow or phase (``worker.agent.run_agent``).
    No ``backoffLimit`` is set: the API server then defaults it to MaxInt32 for Jobs with
    ``backoffLimitPerIndex``, and the controller checks ``failed > backoffLimit`` *before*
    the per-index rules, so any finite value would fail a large Job early."""
    max_relaunches: int = 2
    """Times a phase's Job that failed as a whole (``maxFailedIndexes`` exceeded, or every
    index failed) is replaced by a fresh Job before the workflow fails. A Job only fails after
    more than half its indexes each failed ``backoff_limit_per_index + 1`` times, which is a
    systematic fault (bad image, agents that cannot start) more often than bad luck, and no
    number of retries heals that; what a relaunch can outlast is a cluster-wide transient
    longer than the per-index backoff (NATS unreachable for minutes, a node pool replaced).
    Two relaunches, each after ``relaunch_delay_s``, give such a transient a few minutes, then
    the workflow fails with the reason instead of burning pods. At most 8 (Job names carry the
    run number as one digit). A Job that hit its ``activeDeadlineSeconds`` is never relaunched:
    the phase's time budget is spent."""
    relaunch_delay_s: float = 30.0
    """Pause before the n-th relaunch is ``n * relaunch_delay_s`` (a transient gets time to
    pass). Counted from when this launcher saw the failure; a restarted launcher waits anew."""
    startup_deadline_s: float = 180.0
    """How long a Job may go without any pod starting, and how long a pod may stay stuck on
    a start error no waiting cures (a missing ServiceAccount, Secret or ConfigMap, an image
    that cannot be pulled), before the phase fails with the API's reason. Agents start in
    seconds (the target is under 30 s); an image pull on a cold node or a cluster autoscaler
    adding a node takes a minute or two, hence three."""
    ttl_seconds_after_finished: int = 3600
    """A finished Job (and its pods, with their logs) stays this long for inspection."""
    deadline_margin_s: int = 300
    """Added to a known phase timeout for ``activeDeadlineSeconds``: JetStream-side timeouts
    (the janitor) should fire first, with the Job deadline only as a backstop."""
    termination_grace_s: int = 30
    """Pod grace period; the agent hands its items back on SIGTERM within ``grace_s``."""
    read_only_root_filesystem: bool = True
    """Agents get writable emptyDirs at ``/tmp`` and ``workdir`` only."""
    workdir: str = "/work"
    poll_interval_s: float = 5.0
    """How often Job status is polled for failures (one LIST per interval, all workflows)."""
    request_timeout_s: float = 30.0
    """Bound on every Kubernetes API call."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Extra labels on every object (cost attribution, team …)."""
    annotations: Mapping[str, str] = field(default_factory=dict)
    """Extra annotations on every object and on agent pods (a service mesh opt-out …)."""
    workdir_size_limit: str | None = None
    tmp_size_limit: str | None = None
    """``sizeLimit`` of the workdir and ``/tmp`` emptyDirs; None: bounded by the node (and
    ``ephemeral_storage_limit``)."""

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace this installation's workflows may use, its own first."""
        return tuple(dict.fromkeys((self.namespace, *self.workflow_namespaces)))

    def __post_init__(self) -> None:
        if self.slots_per_pod < 1:
            raise ValueError("slots_per_pod must be >= 1")
        if not 0 < self.max_failed_indexes_ratio <= 1:
            raise ValueError("max_failed_indexes_ratio must be in (0, 1]")
        if not 0 <= self.max_relaunches <= 8:
            raise ValueError("max_relaunches must be in [0, 8]")
        if self.relaunch_delay_s < 0:
            raise ValueError("relaunch_delay_s must be >= 0")
        if any(not 1 <= code <= 255 for code in self.non_retriable_exit_codes):
            raise ValueError("non_retriable_exit_codes must be in [1, 255]")
        if self.startup_deadline_s <= 0:
            raise ValueError("startup_deadline_s must be > 0")
        if self.poll_interval_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("poll_interval_s and request_timeout_s must be > 0")
        secret = {"JETREDUCE_NATS_PASSWORD", "JETREDUCE_NATS_TOKEN"} & set(self.nats_env)
        if secret:
            raise ValueError(
                f"nats env: {', '.join(sorted(secret))} would be plain text in every Job; "
                "put it in the Secret named by nats credentialsSecret"
            )


class SettingsFileError(PermanentError, ValueError):
    """The installation's settings file is wrong; the message names every bad key."""


_QUANTITY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[numkMGTPE]|[KMGTPE]i)?")
_PULL_POLICIES = ("Always", "IfNotPresent", "Never")

_Convert = Callable[[Any], Any]


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("a non-empty string")
    return value


def _optional_string(value: Any) -> str | None:
    return None if value in (None, "") else _string(value)


def _quantity(value: Any) -> str:
    text = str(value) if isinstance(value, int | float) else value
    if not isinstance(text, str) or not _QUANTITY.fullmatch(text):
        raise ValueError(f"a Kubernetes quantity (like 500m, 2Gi), not {value!r}")
    return text


def _optional_quantity(value: Any) -> str | None:
    return None if value in (None, "") else _quantity(value)


def _string_map(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError("a mapping of strings to strings (quote numbers)")
    return dict(value)


def _object(value: Any) -> dict[str, Any] | None:
    if value in (None, {}):
        return None
    if not isinstance(value, Mapping):
        raise ValueError("a mapping, as Kubernetes spells the object")
    return dict(value)


def _objects(value: Any) -> tuple[dict[str, Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise ValueError("a list of mappings, as Kubernetes spells them")
    return tuple(dict(v) for v in value)


def _names(value: Any) -> tuple[str, ...]:
    """``imagePullSecrets``: names, or ``{name: …}`` objects as in a pod spec."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError("a list of Secret names")
    return tuple(_string(v.get("name") if isinstance(v, Mapping) else v) for v in value)


def _pull_policy(value: Any) -> str:
    if value not in _PULL_POLICIES:
        raise ValueError(f"one of {', '.join(_PULL_POLICIES)}")
    return str(value)


def _number(kind: type[int] | type[float]) -> _Convert:
    def convert(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("a number")
        if kind is int and not float(value).is_integer():
            raise ValueError("a whole number")
        return kind(value)

    return convert


def _images(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise ValueError("a list of images (or prefixes ending in *), or null for any")
    return tuple(_string(v) for v in value)


def _codes(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ValueError("a list of exit codes")
    return tuple(value)


def _resources(value: Any) -> Resources:
    """A container ``resources`` object: it replaces the defaults as a whole (what the
    file says is what pods get)."""
    if value is None:
        return Resources(None, None, None, None)
    if not isinstance(value, Mapping) or set(value) - {"requests", "limits"}:
        raise ValueError("a mapping with requests and/or limits")
    out: dict[str, str | None] = {}
    for kind in ("requests", "limits"):
        given = value.get(kind) or {}
        if not isinstance(given, Mapping) or set(given) - set(_RESOURCE_NAMES):
            raise ValueError(f"{kind}: only {', '.join(_RESOURCE_NAMES)}")
        for name in _RESOURCE_NAMES:  # → cpu_request, ephemeral_storage_limit …
            quantity = given.get(name)
            field_name = f"{name.replace('-', '_')}_{kind.removesuffix('s')}"
            out[field_name] = None if quantity is None else _quantity(quantity)
    return Resources(**out)


_NATS_KEYS: dict[str, tuple[str, _Convert]] = {
    "url": ("nats_url", _optional_string),
    "filesSecret": ("nats_files_secret", _optional_string),
    "filesMount": ("nats_files_mount", _string),
    "credentialsSecret": ("nats_env_secret", _optional_string),
    "env": ("nats_env", _string_map),
}

FILE_KEYS: dict[str, tuple[str, _Convert]] = {
    "imagePullPolicy": ("image_pull_policy", _pull_policy),
    "serviceAccountName": ("service_account", _optional_string),
    "imagePullSecrets": ("image_pull_secrets", _names),
    "priorityClassName": ("priority_class_name", _optional_string),
    "resources": ("resources", _resources),
    "nodeSelector": ("node_selector", _string_map),
    "tolerations": ("tolerations", _objects),
    "affinity": ("affinity", _object),
    "topologySpreadConstraints": ("topology_spread_constraints", _objects),
    "labels": ("labels", _string_map),
    "annotations": ("annotations", _string_map),
    "workdirSizeLimit": ("workdir_size_limit", _optional_quantity),
    "tmpSizeLimit": ("tmp_size_limit", _optional_quantity),
    "workflowImages": ("workflow_images", _images),
    "slotsPerPod": ("slots_per_pod", _number(int)),
    "backoffLimitPerIndex": ("backoff_limit_per_index", _number(int)),
    "maxFailedIndexesRatio": ("max_failed_indexes_ratio", _number(float)),
    "nonRetriableExitCodes": ("non_retriable_exit_codes", _codes),
    "maxRelaunches": ("max_relaunches", _number(int)),
    "relaunchDelaySeconds": ("relaunch_delay_s", _number(float)),
    "startupDeadlineSeconds": ("startup_deadline_s", _number(float)),
    "ttlSecondsAfterFinished": ("ttl_seconds_after_finished", _number(int)),
    "terminationGracePeriodSeconds": ("termination_grace_s", _number(int)),
    "deadlineMarginSeconds": ("deadline_margin_s", _number(int)),
    "pollIntervalSeconds": ("poll_interval_s", _number(float)),
    "requestTimeoutSeconds": ("request_timeout_s", _number(float)),
}
"""The settings file's keys → (field, converter). Not here on purpose: ``image`` (one
source, the kustomization's ``images:``), ``namespace`` and ``workflowNamespaces`` (the
launcher's and janitor's RBAC must follow them, so they are deployment settings)."""


def from_file_data(data: Any, base: KubernetesSettings | None = None) -> KubernetesSettings:
    """``base`` (default: the defaults) with the settings file's values. Every problem is
    collected and raised together as :class:`SettingsFileError`, each naming its key."""
    base = base or KubernetesSettings()
    if data is None:
        return base
    if not isinstance(data, Mapping):
        raise SettingsFileError("the settings file must be a YAML mapping")
    changes: dict[str, Any] = {}
    problems: list[str] = []

    def take(
        scope: str, given: Mapping[str, Any], keys: Mapping[str, tuple[str, _Convert]]
    ) -> None:
        for key, value in given.items():
            if key not in keys:
                problems.append(f"{scope}{key}: unknown key (known: {', '.join(keys)})")
                continue
            name, convert = keys[key]
            try:
                changes[name] = convert(value)
            except ValueError as exc:
                problems.append(f"{scope}{key}: must be {exc}")

    nats = data.get("nats")
    take("", {k: v for k, v in data.items() if k != "nats"}, FILE_KEYS)
    if nats is not None:
        if isinstance(nats, Mapping):
            take("nats.", nats, _NATS_KEYS)
        else:
            problems.append("nats: must be a mapping")
    if not problems:
        try:
            return replace(base, **changes)
        except ValueError as exc:
            problems.append(str(exc))
    raise SettingsFileError("; ".join(problems))
