"""deploy/kustomize/components/otel: an overlay using it (over base and over prod) renders,
validates strictly against the Kubernetes schemas (oldest and newest supported), and gives
every service container the OTEL_* variables, the metrics port and a policy that lets the
collector be reached. (tests/k8s/test_manifests.py renders the shipped overlays; none of
them includes this optional component, so it is rendered here.)"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from kustomize import KUSTOMIZE, render

VERSIONS = ("1.31.0", "1.37.0")
WIRED = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_TRACES_EXPORTER",
    "OTEL_METRICS_EXPORTER",
    "OTEL_RESOURCE_ATTRIBUTES",
    "JETREDUCE_METRICS_PORT",
    "JETREDUCE_LOG_FORMAT",
)


def render_with_component(tmp_path: Path, target: str) -> list[dict[str, Any]]:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    rel = lambda p: os.path.relpath(p, overlay)  # noqa: E731 - kustomize wants relative paths
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {rel(KUSTOMIZE / target)}\n"
        f"components:\n  - {rel(KUSTOMIZE / 'components' / 'otel')}\n"
    )
    return render(overlay)


@pytest.mark.parametrize("target", ["base", "overlays/prod"])
def test_otel_component_renders_validates_and_wires_every_service(
    tmp_path: Path, target: str
) -> None:
    docs = render_with_component(tmp_path, target)
    for version in VERSIONS:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert len(deployments) == 4
    for d in deployments:
        pod = d["spec"]["template"]
        container = pod["spec"]["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert set(WIRED) <= set(env)
        assert "JETREDUCE_NATS_URL" in env  # the base's variables are kept
        # Added beside the base's health port (its probes name it), not over it.
        assert container["ports"] == [
            {"name": "health", "containerPort": 8080},
            {"name": "metrics", "containerPort": 9464, "protocol": "TCP"},
        ]
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9464"
        ref = env["OTEL_EXPORTER_OTLP_ENDPOINT"]["valueFrom"]["configMapKeyRef"]["name"]
        assert ref == "jetreduce-otel"
    (otel,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == ref]
    assert otel["data"]["endpoint"].endswith(":4318")
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    policy = policies["jetreduce-services"]
    agent_egress = {
        p["port"] for r in policies["jetreduce-agents"]["spec"]["egress"] for p in r["ports"]
    }
    assert 4318 in agent_egress  # agents export traces to the collector too
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])}
    ingress_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])}
    assert 4318 in egress_ports and 9464 in ingress_ports and 4222 in egress_ports
