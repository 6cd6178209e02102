"""NATS as the overlays ship it. Dev: the rendered server configuration, run by a real
nats-server with the rendered Secrets in its environment, refuses anonymous clients and
lets in each role as its own user (services with their containers' settings, agents with
what the launcher gives their pods, clients with theirs), each allowed only its role's
publishes; the users are generated from runtime/permissions.py. Prod: TLS and the same
users, the Secrets provided by the installation, and a policy that admits only jetreduce to
NATS. The network policies admit only jetreduce's pods to NATS while agents may reach only
DNS and NATS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import connected_as, stored_or_refused
from jetreduce.contract import events as ev
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.embedded import find_nats_server
from jetreduce.launcher.k8s_settings import KubernetesSettings, from_file_data
from jetreduce.launcher.kubernetes import agent_nats_env, build_map_job
from jetreduce.runtime.connection import ConnectFailed, connect
from jetreduce.runtime.permissions import (
    ROLES,
    helm_values,
    password_variable,
    publish_allowed,
    server_conf,
)
from jetreduce.runtime.settings import NatsSettings
from kustomize import KUSTOMIZE, container_env, render, secret_data, with_provided_secrets
from support import wait_for

pytestmark = pytest.mark.anyio


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _named(docs: list[dict[str, Any]], kind: str, prefix: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(prefix)]
    return doc


def _agent_env(docs: list[dict[str, Any]], job: dict[str, Any]) -> dict[str, str]:
    """The agent container's environment as the kubelet would give it: plain values and
    ``envFrom`` Secrets (a missing Secret fails, as the pod would not start); variables
    from the per-workflow Secret are listed by name with no value (the launcher fills it)."""
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        env.update(secret_data(docs, source["secretRef"]["name"]))
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var["valueFrom"]:
            env[var["name"]] = ""
    return env


def _launcher(docs: list[dict[str, Any]], root: Path) -> tuple[NatsSettings, KubernetesSettings]:
    """The launcher container's NATS settings and agent pod settings, as it resolves them."""
    launcher = _named(docs, "Deployment", "jetreduce-launcher")
    (container,) = launcher["spec"]["template"]["spec"]["containers"]
    env = container_env(docs, launcher, container, root)
    agents = yaml.safe_load(Path(env["JETREDUCE_K8S_SETTINGS"]).read_text())
    return NatsSettings.from_env(env), from_file_data(agents)


def _agent_job(nats: NatsSettings, k8s: KubernetesSettings) -> dict[str, Any]:
    """The map Job the launcher would create, with the NATS environment it hands agents."""
    return build_map_job(
        "wf", agents=1, slots=1, settings=k8s, nats_env=agent_nats_env(nats, k8s, {})
    )


def test_the_shipped_users_are_generated_from_the_roles() -> None:
    """The committed NATS users are exactly what runtime/permissions.py gives (regenerate
    them with `make nats-users`), and the server configuration includes them."""
    dev = KUSTOMIZE / "overlays" / "dev"
    assert (dev / "nats-users.conf").read_text() == server_conf("")
    prod = KUSTOMIZE / "overlays" / "prod" / "nats-users-values.yaml"
    assert prod.read_text() == helm_values("")
    values = yaml.safe_load(prod.read_text())
    users = values["config"]["merge"]["authorization"]["users"]
    assert [u["user"] for u in users] == list(ROLES)
    for user in users:
        assert user["permissions"]["publish"]["allow"] == publish_allowed(Subjects(), user["user"])
        assert user["password"] == f"<< ${password_variable(user['user'])} >>"
    assert 'include "nats-users.conf"' in (dev / "nats.conf").read_text()


async def test_the_dev_nats_gives_each_role_its_own_user(tmp_path: Path) -> None:
    """The dev overlay's server, run by a real nats-server with the rendered configuration
    and the environment its pod would get: anonymous clients are refused; the services
    connect as `services` with their containers' settings; an agent pod built by the launcher
    from the shipped settings connects as `agents` (its Secret, never the services'
    password) and may store a result but not `map.complete`; a client with the clients'
    Secret may cancel but not store a result."""
    docs = render("overlays/dev")
    files = _named(docs, "ConfigMap", "nats-config")["data"]
    port = _free_port()
    conf = re.sub(r"(?m)^port: \d+", f"port: {port}", files["nats.conf"])
    conf = re.sub(r"(?m)^http_port: \d+", f"http_port: {_free_port()}", conf)
    conf = conf.replace("/data", str(tmp_path / "js")).replace("/var/run/nats", str(tmp_path))
    (tmp_path / "nats.conf").write_text(conf)
    (tmp_path / "nats-users.conf").write_text(files["nats-users.conf"])
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
            await connect(NatsSettings(url=url), forever=False, timeout_s=1)
        services, k8s = _launcher(docs, tmp_path / "launcher")
        services = replace(services, url=url)
        assert services.user == "services" and services.password
        subjects = Subjects(services.prefix)
        done = ev.encode(
            ev.ItemDone(
                workflow_id="wf",
                index=0,
                item_id="item_0",
                output="",
                exit_code=0,
                duration_s=0,
                attempts=1,
                agent="a",
            )
        )
        complete = ev.encode(ev.MapComplete(workflow_id="wf", total=1, done=1, dead=0))
        nc = await connect(services, forever=False, timeout_s=5)
        try:
            await declare(nc.jetstream(), subjects)
        finally:
            await nc.close()

        job = _agent_job(services, k8s)
        agent_env = _agent_env(docs, job)
        assert agent_env["JETREDUCE_NATS_USER"] == "agents"
        agent = replace(NatsSettings.from_env(agent_env), url=url)
        assert agent.password and agent.password != services.password
        # The services' password reaches no agent: not in the Job, nor its Secret's keys.
        assert services.password not in json.dumps(job)
        assert "JETREDUCE_NATS_PASSWORD" not in {
            v["name"] for v in job["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        async with _as(agent) as (nc, errors):
            assert await _stored(nc, errors, subjects.item_done("wf", 0), done)
            assert not await _stored(nc, errors, subjects.map("complete", "wf"), complete)

        clients = replace(
            NatsSettings.from_env(secret_data(docs, "jetreduce-clients-nats")), url=url
        )
        assert clients.user == "clients"
        cancel = ev.encode(ev.WorkflowCancelRequested(workflow_id="wf", reason="r"))
        async with _as(clients) as (nc, errors):
            assert await _stored(nc, errors, subjects.workflow("cancel", "wf"), cancel)
            assert not await _stored(nc, errors, subjects.item_done("wf", 1), done)
        # No password is a literal anywhere in the Deployments.
        assert not any(
            e.get("name") == "JETREDUCE_NATS_PASSWORD" and "value" in e
            for d in docs
            if d["kind"] == "Deployment"
            for e in d["spec"]["template"]["spec"]["containers"][0]["env"]
        )
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


def _as(settings: NatsSettings) -> contextlib.AbstractAsyncContextManager[tuple[Any, list[str]]]:
    """A connection with ``settings``, and the errors the server sent it."""
    return connected_as(settings.url, settings.user, settings.password)


async def _stored(nc: Any, errors: list[str], subject: str, payload: bytes) -> bool:
    return await stored_or_refused(nc, errors, subject, payload, timeout_s=0.5)


def test_the_prod_services_and_agents_use_tls_and_their_own_users(tmp_path: Path) -> None:
    """Production: every service connects over TLS, verifying with the provided CA, as the
    `services` user; agent pods as `agents` with the same CA mounted; no value of a Secret
    is shipped; the Helm values turn TLS on for clients and routes."""
    rendered = render("overlays/prod")
    shipped = {d["metadata"]["name"] for d in rendered if d["kind"] == "Secret"}
    assert shipped == set()
    docs = with_provided_secrets(rendered)
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = container_env(docs, deployment, container, tmp_path / deployment["metadata"]["name"])
        settings = NatsSettings.from_env(env)
        assert settings.url.startswith("tls://") and settings.user == "services"
        assert settings.tls_ca == "/etc/jetreduce/nats-tls/ca.crt"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        ca = volumes[mounts["/etc/jetreduce/nats-tls"]]["secret"]
        assert ca["secretName"] == "nats-ca" and ca["items"] == [
            {"key": "ca.crt", "path": "ca.crt"}
        ]
    services, k8s = _launcher(docs, tmp_path / "launcher")
    job = _agent_job(services, k8s)
    env = _agent_env(docs, job)
    assert env["JETREDUCE_NATS_USER"] == "agents" and env["JETREDUCE_NATS_PASSWORD"] == "a"
    assert env["JETREDUCE_NATS_URL"].startswith("tls://")
    pod = job["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["nats-files"]["secret"]["secretName"] == "nats-ca"
    assert env["JETREDUCE_NATS_TLS_CA"] == mounts["nats-files"] + "/ca.crt"
    values = yaml.safe_load((KUSTOMIZE / "overlays" / "prod" / "nats-values.yaml").read_text())
    assert values["config"]["nats"]["tls"] == {"enabled": True, "secretName": "nats-server-tls"}
    assert values["config"]["cluster"]["tls"]["enabled"] is True
    users = yaml.safe_load((KUSTOMIZE / "overlays" / "prod" / "nats-users-values.yaml").read_text())
    secrets = {v["valueFrom"]["secretKeyRef"]["name"] for v in users["container"]["env"].values()}
    assert secrets == {"nats-users"}


def test_only_jetreduce_reaches_the_prod_nats() -> None:
    """The policy of the NATS release's namespace admits the services (the installation's
    namespace) and agent pods (any namespace) on the client port, the servers to each other
    on the route port, and no one else."""
    (policy,) = render("overlays/prod/nats")
    assert policy["kind"] == "NetworkPolicy" and policy["metadata"]["namespace"] == "nats"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    client, routes = policy["spec"]["ingress"]
    assert [p["port"] for p in client["ports"]] == [4222]
    assert [p["port"] for p in routes["ports"]] == [6222]
    service_labels = _named(render("overlays/prod"), "Deployment", "jetreduce-planner")["spec"][
        "template"
    ]["metadata"]["labels"]
    agent_job = build_map_job("wf", agents=1, slots=1, settings=KubernetesSettings(), nats_env={})
    agent_labels = agent_job["spec"]["template"]["metadata"]["labels"]
    peers = client["from"]
    assert any(
        _selects(p["podSelector"], service_labels)
        and p["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "jetreduce"}
        for p in peers
    )
    assert any(_selects(p["podSelector"], agent_labels) for p in peers)
    assert not any(_selects(p["podSelector"], {"app.kubernetes.io/name": "other"}) for p in peers)
    nats_pods = policy["spec"]["podSelector"]["matchLabels"]
    assert routes["from"] == [{"podSelector": {"matchLabels": nats_pods}}]


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


@pytest.mark.parametrize("prefix", ["", "team.a"])
def test_the_generated_users_are_a_valid_server_configuration(tmp_path: Path, prefix: str) -> None:
    """What `jetreduce nats-users [--prefix]` prints is accepted by nats-server (``-t``:
    check the configuration and exit), with the passwords from its environment."""
    (tmp_path / "users.conf").write_text(server_conf(prefix))
    (tmp_path / "nats.conf").write_text('port: -1\ninclude "users.conf"\n')
    env = {password_variable(role): f"pw-{role}" for role in ROLES}
    out = subprocess.run(
        [find_nats_server(), "-t", "-c", str(tmp_path / "nats.conf")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr + out.stdout
    if prefix:
        assert '"team.a.item.*.*.*"' in server_conf(prefix)


async def test_prod_roles_connect_over_tls_with_what_their_containers_get(tmp_path: Path) -> None:
    """A nats-server as the prod values configure it (TLS on the client port, the generated
    users, passwords from the environment as the `nats-users` Secret gives them): the
    services connect with the settings their rendered containers resolve (URL and CA path
    moved to this test's server and CA), an agent with what the launcher puts in its pod; a
    client without TLS or without a user is refused."""
    from integration.test_auth_tls import _certs

    ca, cert, key = _certs(tmp_path)
    port = _free_port()
    (tmp_path / "nats-users.conf").write_text(server_conf(""))
    (tmp_path / "nats.conf").write_text(
        f"port: {port}\njetstream {{ store_dir: {json.dumps(str(tmp_path / 'js'))} }}\n"
        f"tls {{ cert_file: {json.dumps(str(cert))}, key_file: {json.dumps(str(key))} }}\n"
        'include "nats-users.conf"\n'
    )
    docs = with_provided_secrets(render("overlays/prod"))
    passwords = {
        role: secret_data(docs, f"jetreduce-{role}-nats")["JETREDUCE_NATS_PASSWORD"]
        for role in ROLES
    }
    proc = await asyncio.create_subprocess_exec(
        str(find_nats_server()),
        "-c",
        str(tmp_path / "nats.conf"),
        env={password_variable(role): pw for role, pw in passwords.items()},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        await wait_for(listening, timeout_s=10)
        url = f"tls://127.0.0.1:{port}"
        services, k8s = _launcher(docs, tmp_path / "launcher")
        assert services.tls_ca and services.url.startswith("tls://")
        services = replace(services, url=url, tls_ca=str(ca))
        nc = await connect(services, forever=False, timeout_s=5)
        try:
            await declare(nc.jetstream(), Subjects())
        finally:
            await nc.close()
        agent_env = _agent_env(docs, _agent_job(services, k8s))
        agent = replace(NatsSettings.from_env(agent_env), url=url, tls_ca=str(ca))
        assert agent.user == "agents"
        nc = await connect(agent, forever=False, timeout_s=5)
        await nc.close()
        for refused in (
            replace(services, url=f"nats://127.0.0.1:{port}", tls_ca=None),  # no TLS
            NatsSettings(url=url, tls_ca=str(ca)),  # no user
        ):
            with pytest.raises(ConnectFailed):
                await connect(refused, forever=False, timeout_s=1)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
