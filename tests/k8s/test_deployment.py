"""The deployment as shipped: every overlay is rendered, and each service container's args
and environment go through the CLI's own option parsing and settings resolution (the
settings file mounted from its ConfigMap included), stopping just before the services
would connect. What is asserted is what the pod would really run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from typer.testing import CliRunner

import jetreduce.cli.app as cli
import jetreduce.cli.serve as serve
from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.launcher.kubernetes import build_map_job
from kustomize import OVERLAYS, container_env, render, with_provided_secrets

K8S_SERVICES = ("launcher", "janitor")


def _resolved(
    target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The rendered objects, and for each service what ``jetreduce`` would serve with it:
    its names, backend and Kubernetes settings (``serve.host_services``, the seam between
    option parsing and serving, records instead of serving)."""
    for name in list(os.environ):
        if name.startswith(("JETREDUCE_", "OTEL_")):
            monkeypatch.delenv(name)
    served: dict[str, dict[str, Any]] = {}

    def record(
        names: tuple[str, ...],
        nats: str | None,
        log_dir: Any,
        backend: str,
        k8s: KubernetesSettings,
        *args: Any,
        **kwargs: Any,
    ) -> int:
        served[names[0]] = {"backend": backend, "k8s": k8s}
        return 0

    monkeypatch.setattr(serve, "host_services", record)
    docs = with_provided_secrets(render(target))  # prod ships no Secret: the installer's
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = container_env(docs, deployment, container, tmp_path / deployment["metadata"]["name"])
        result = CliRunner().invoke(cli.app, container["args"], env=env)
        assert result.exit_code == 0, f"{deployment['metadata']['name']}: {result.output}"
        served[container["args"][1]]["image"] = container["image"]
        served[container["args"][1]]["pod"] = deployment["spec"]["template"]["spec"]
    return docs, served


@pytest.mark.parametrize("target", OVERLAYS)
def test_launcher_and_janitor_run_the_kubernetes_backend(
    target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs, served = _resolved(target, tmp_path, monkeypatch)
    assert set(served) == {"planner", "launcher", "aggregator", "janitor"}
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    for name in K8S_SERVICES:
        k8s: KubernetesSettings = served[name]["k8s"]
        assert served[name]["backend"] == "kubernetes", name
        assert k8s.namespace == "jetreduce"
        # One source of truth: the agents run the image the overlay's `images:` names.
        assert k8s.image == served[name]["image"] != "jetreduce"
        assert k8s.workflow_namespaces == ()
        # The settings file reached them: agents' account exists, sizes are bounded.
        assert k8s.service_account in accounts
        assert k8s.resources.ephemeral_storage_limit and k8s.workdir_size_limit
    assert served["launcher"]["k8s"] == served["janitor"]["k8s"]
    # NATS: each service as the `services` user; agents get the `agents` user's Secret.
    secrets = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    assert served["launcher"]["k8s"].nats_env_secret == "jetreduce-agents-nats" in secrets
    for name, info in served.items():
        (container,) = info["pod"]["containers"]
        refs = {
            e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
            for e in container["env"]
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        assert refs == {
            "JETREDUCE_NATS_USER": "jetreduce-services-nats",
            "JETREDUCE_NATS_PASSWORD": "jetreduce-services-nats",
        }, name
    # Each runs as its own account, bound to its own Role; the others have no token.
    for name in ("planner", "aggregator", "launcher", "janitor"):
        pod = served[name]["pod"]
        if name in K8S_SERVICES:
            assert pod["serviceAccountName"] == f"jetreduce-{name}"
            assert pod["automountServiceAccountToken"] is True
        else:
            assert pod["serviceAccountName"] == "jetreduce"
            assert pod["automountServiceAccountToken"] is False
    # Probes on the port the service serves /healthz and /readyz on.
    for name, info in served.items():
        (container,) = info["pod"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["health"] == int(env["JETREDUCE_HEALTH_PORT"]), name
        for probe, path in (
            ("startupProbe", "/healthz"),
            ("livenessProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
        ):
            assert container[probe]["httpGet"] == {"path": path, "port": "health"}, (name, probe)
    bound = {
        (d["metadata"]["name"], s["name"])
        for d in docs
        if d["kind"] == "RoleBinding"
        for s in d["subjects"]
    }
    assert bound == {
        ("jetreduce-launcher", "jetreduce-launcher"),
        ("jetreduce-janitor", "jetreduce-janitor"),
    }


@pytest.mark.parametrize("target", OVERLAYS)
def test_the_agent_job_from_the_shipped_settings_is_valid(
    target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Job the launcher would create with the overlay's settings validates strictly and
    carries them (sizes, account, image)."""
    _, served = _resolved(target, tmp_path, monkeypatch)
    k8s: KubernetesSettings = served["launcher"]["k8s"]
    job = build_map_job("wf-1", agents=3, slots=1, settings=k8s, nats_env={})
    kubernetes_validate.validate(job, "1.31.0", strict=True)
    pod = job["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    assert agent["image"] == served["launcher"]["image"]
    assert pod["serviceAccountName"] == "jetreduce-agent"
    assert agent["resources"]["limits"]["ephemeral-storage"] == "4Gi"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["work"]["emptyDir"] == {"sizeLimit": "3Gi"}
