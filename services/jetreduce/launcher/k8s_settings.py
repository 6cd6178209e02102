"""Settings of the ``kubernetes`` launcher backend, one set per installation.

Kept apart from :mod:`jetreduce.launcher.kubernetes` so the CLI can build and validate them
without importing the ``kubernetes`` client. A workflow may override two of them at submit
time, ``SubmitOptions.image`` and ``SubmitOptions.namespace`` (one of :attr:`namespaces`),
merged over these in the backend; other per-workflow overrides (resources, node placement)
are not supported yet and would belong in ``SubmitOptions`` the same way, as names and sizes
only (never secrets).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KubernetesSettings", "Resources"]


@dataclass(frozen=True)
class Resources:
    """Container requests/limits as Kubernetes quantities (``"500m"``, ``"512Mi"``)."""

    cpu_request: str | None = "250m"
    memory_request: str | None = "256Mi"
    cpu_limit: str | None = None
    """No CPU limit by default: throttling slows agents without protecting the node."""
    memory_limit: str | None = "1Gi"
    """A memory limit keeps a runaway agent from starving its neighbours (OOM-kill → retry)."""

    def to_dict(self) -> dict[str, dict[str, str]]:
        requests = {
            k: v for k, v in (("cpu", self.cpu_request), ("memory", self.memory_request)) if v
        }
        limits = {k: v for k, v in (("cpu", self.cpu_limit), ("memory", self.memory_limit)) if v}
        out: dict[str, dict[str, str]] = {}
        if requests:
            out["requests"] = requests
        if limits:
            out["limits"] = limits
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
    nats_url: str | None = None
    """The NATS URL as seen from agent pods; None: the launcher's own URL."""
    nats_files_secret: str | None = None
    """An existing Secret holding NATS ``.creds``/NKEY/TLS files, mounted read-only at
    ``nats_files_mount``; point the NATS file settings at paths under that directory."""
    nats_files_mount: str = "/var/run/jetreduce/nats"
    slots_per_pod: int = 1
    """Map slots per pod. 1 follows the Job model (``parallelism = max_parallel``); more
    packs several concurrent items into one pod when per-pod overhead matters."""
    backoff_limit_per_index: int = 3
    """Pod failures tolerated per index before the index is failed (needs k8s ≥ 1.29)."""
    max_failed_indexes_ratio: float = 0.5
    """``maxFailedIndexes = ceil(ratio * completions)``: beyond it the Job fails fast."""
    backoff_limit: int = 100
    """Overall pod-failure budget of a Job (the per-index limit is the real one)."""
    max_relaunches: int = 2
    """Times a phase's Job that failed as a whole (``backoffLimit`` or ``maxFailedIndexes``
    exceeded) is replaced by a fresh Job before the workflow fails. A Job only fails after
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
        if self.poll_interval_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("poll_interval_s and request_timeout_s must be > 0")
