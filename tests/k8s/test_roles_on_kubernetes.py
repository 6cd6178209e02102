"""The NATS users of the shipped deployment, through the Kubernetes backend: NATS with a user
per role (runtime/permissions.py), the services connected as ``services``, the agents'
Secret named by the settings (``nats.credentialsSecret``, as agents.yaml ships it) and the
process kubelet running every pod with the env it would get. A workflow with setup, map and
reduce completes; every agent connected as ``agents``; the services' password is in no
object the launcher created; the server refused nothing."""

from __future__ import annotations

import asyncio
import json
import secrets
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from harness import orchestrator
from kmock_plus import EmulatorThread
from kubelet import ProcessKubelet
from kubernetes import client as k8s

from jetreduce.cli.submit import submit
from jetreduce.cli.watch import Watcher
from jetreduce.contract import events as ev
from jetreduce.contract.events import SubmitOptions
from jetreduce.embedded import EmbeddedServer, read_env_file, role_file, role_settings
from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.launcher.kubernetes import KubernetesBackend
from jetreduce.runtime.settings import NatsSettings
from support import wait_for

pytestmark = pytest.mark.anyio

WORKFLOW = """
name: k8s-roles
setup:
  - shell: "echo ready"
map:
  input: items.json
  json_path: "$.items[*]"
  max_parallel: 2
  agent_template:
    - shell: "echo ${item}"
reduce:
  - shell: "echo ${map.successful}/${map.total}"
"""


def _connections(server: EmbeddedServer) -> list[dict[str, Any]]:
    """Every client connection the server has seen (closed ones included), with its user."""
    url = f"{server.monitor_url}/connz?state=all&auth=true&limit=1000"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return list(json.loads(resp.read())["connections"])


async def test_agent_pods_connect_as_the_agents_user_from_its_secret(
    tmp_path: Path,
    workdir: Path,
    emulator: EmulatorThread,
    api_client: k8s.ApiClient,
    namespace: str,
    prefix: str,
) -> None:
    (workdir / "items.json").write_text(json.dumps({"items": list(range(4))}))
    with EmbeddedServer(tmp_path / "nats", roles=prefix) as server:
        base = NatsSettings(url=server.url, prefix=prefix)
        services = role_settings(server.data_dir, "services", base)
        assert services is not None and services.password
        # The installation's Secret of the agents' user, in the workflow namespace.
        agents_env = read_env_file(role_file(server.data_dir, "agents"))
        k8s.CoreV1Api(api_client).create_namespaced_secret(
            namespace,
            {"metadata": {"name": "jetreduce-agents-nats"}, "stringData": agents_env},
        )
        created: dict[str, list[dict[str, Any]]] = {}
        backend = KubernetesBackend(
            services,
            KubernetesSettings(
                namespace=namespace,
                image="jetreduce:test",
                poll_interval_s=0.2,
                nats_env_secret="jetreduce-agents-nats",
            ),
            api_client=api_client,
        )
        kubelet = ProcessKubelet(
            api_client, namespace, tmp_path / "pods", poll_s=0.05, nice=0, retry_s=0.1
        )
        (tmp_path / "pods").mkdir()
        stop = asyncio.Event()
        task = asyncio.create_task(kubelet.run(stop))
        wf = f"roles-{secrets.token_hex(3)}"
        try:
            async with orchestrator(services, backend, sweep_every_s=1) as ctx:
                watcher = Watcher(ctx.nc, ctx.subjects, wf, show_events=False, tty=False)
                await watcher.start()
                try:
                    await submit(
                        ctx.nc,
                        ctx.subjects,
                        WORKFLOW,
                        SubmitOptions(workdir=str(workdir), backend="kubernetes"),
                        workflow_id=wf,
                        source="test",
                    )

                    def launched() -> bool:
                        for r in ("v1/secrets", "batch/v1/jobs", "v1/configmaps"):
                            created.setdefault(r, []).extend(emulator.live(r, namespace))
                        return bool(created["batch/v1/jobs"])

                    await wait_for(launched, timeout_s=30)
                    done = await watcher.until_done(90)
                finally:
                    await watcher.stop()
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await backend.stop_all()
        assert isinstance(done, ev.WorkflowCompleted), done
        assert (done.done, done.dead) == (4, 0) and done.reduce_output.strip() == "4/4"
        connections = await asyncio.to_thread(_connections, server)
        agents = {
            c.get("authorized_user")
            for c in connections
            if c.get("name", "").startswith("jetreduce-agent")
        }
        assert agents == {"agents"}, connections
        assert services.password not in json.dumps(created)
        (agent,) = created["batch/v1/jobs"][0]["spec"]["template"]["spec"]["containers"]
        assert agent["envFrom"] == [{"secretRef": {"name": "jetreduce-agents-nats"}}]
        assert "JETREDUCE_NATS_PASSWORD" not in {e["name"] for e in agent["env"]}
        log = (server.data_dir / "nats-server.log").read_text()
        assert "violation" not in log.lower(), log
        assert kubelet.errors == []
