"""NATS as the dev overlay ships it: the rendered server configuration, run by a real
nats-server with the rendered Secret in its environment, refuses anonymous clients and lets
in the services with exactly the settings their containers would resolve; and the network
policies admit only jetreduce's pods to NATS while agents may reach only DNS and NATS."""

from __future__ import annotations

import asyncio
import os
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from jetreduce.embedded import find_nats_server
from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.launcher.kubernetes import build_map_job
from jetreduce.runtime.connection import ConnectFailed, connect
from jetreduce.runtime.settings import NatsSettings
from kustomize import KUSTOMIZE, container_env, render, secret_data
from support import wait_for

pytestmark = pytest.mark.anyio


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _named(docs: list[dict[str, Any]], kind: str, prefix: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(prefix)]
    return doc


async def test_the_dev_nats_admits_the_services_and_no_one_else(tmp_path: Path) -> None:
    docs = render("overlays/dev")
    conf = _named(docs, "ConfigMap", "nats-config")["data"]["nats.conf"]
    port = _free_port()
    conf = re.sub(r"(?m)^port: \d+", f"port: {port}", conf)
    conf = re.sub(r"(?m)^http_port: \d+", f"http_port: {_free_port()}", conf)
    conf = conf.replace("/data", str(tmp_path / "js")).replace("/var/run/nats", str(tmp_path))
    (tmp_path / "nats.conf").write_text(conf)
    server = _named(docs, "StatefulSet", "nats")["spec"]["template"]["spec"]["containers"][0]
    env = container_env(docs, _named(docs, "StatefulSet", "nats"), server, tmp_path / "ns")
    proc = await asyncio.create_subprocess_exec(
        str(find_nats_server()),
        "-c",
        str(tmp_path / "nats.conf"),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        await wait_for(listening, timeout_s=10)
        url = f"nats://127.0.0.1:{port}"
        with pytest.raises(ConnectFailed):
            await connect(NatsSettings(url=url), forever=False, timeout_s=5)
        launcher = _named(docs, "Deployment", "jetreduce-launcher")
        (container,) = launcher["spec"]["template"]["spec"]["containers"]
        resolved = container_env(docs, launcher, container, tmp_path / "launcher")
        settings = NatsSettings.from_env({**resolved, "JETREDUCE_NATS_URL": url})
        assert settings.user == "jetreduce" and settings.password
        nc = await connect(settings, forever=False, timeout_s=5)
        await nc.close()
        # The password is the Secret's, not a literal anywhere in the manifests.
        auth = secret_data(docs, _named(docs, "Secret", "nats-auth")["metadata"]["name"])
        assert settings.password == auth["password"]
        assert not any(
            e.get("name") == "JETREDUCE_NATS_PASSWORD" and "value" in e
            for d in docs
            if d["kind"] == "Deployment"
            for e in d["spec"]["template"]["spec"]["containers"][0]["env"]
        )
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


@pytest.mark.parametrize("target", ["overlays/dev", "overlays/prod"])
def test_agents_reach_only_dns_and_nats_and_only_jetreduce_reaches_nats(target: str) -> None:
    docs = render(target)
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    agent_pod = build_map_job("wf", agents=1, slots=1, settings=KubernetesSettings(), nats_env={})
    agent_labels = agent_pod["spec"]["template"]["metadata"]["labels"]
    agents = policies["jetreduce-agents"]
    assert _selects(agents["spec"]["podSelector"], agent_labels)
    assert agents["spec"]["ingress"] == []
    ports = {p["port"] for rule in agents["spec"]["egress"] for p in rule["ports"]}
    assert ports == {53, 4222}
    if target == "overlays/prod":  # NATS only in the Helm release's namespace
        nats_rule = agents["spec"]["egress"][1]
        assert nats_rule["to"] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "nats"}}}
        ]
        return
    nats = policies["nats"]
    (rule,) = nats["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [4222]
    service_labels = _named(docs, "Deployment", "jetreduce-planner")["spec"]["template"][
        "metadata"
    ]["labels"]
    admitted = [peer["podSelector"] for peer in rule["from"]]
    assert any(_selects(s, agent_labels) for s in admitted)
    assert any(_selects(s, service_labels) for s in admitted)
    assert not any(_selects(s, {"app.kubernetes.io/name": "something-else"}) for s in admitted)


def test_agent_egress_can_be_opened_by_a_component(tmp_path: Path) -> None:
    overlay = tmp_path / "open"
    overlay.mkdir()
    rel = lambda p: os.path.relpath(p, overlay)  # noqa: E731 - kustomize wants relative paths
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {rel(KUSTOMIZE / 'overlays' / 'dev')}\n"
        f"components:\n  - {rel(KUSTOMIZE / 'components' / 'agent-egress-open')}\n"
    )
    policies = {d["metadata"]["name"]: d for d in render(overlay) if d["kind"] == "NetworkPolicy"}
    assert policies["jetreduce-agents-egress-open"]["spec"]["egress"] == [{}]
    assert "jetreduce-agents" in policies  # still there: policies add up
