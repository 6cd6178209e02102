"""The per-role NATS users at work on whole workflows: services, agents and the CLI each
connect as their own user, and nothing any of them does is refused.

In process: an embedded server with roles, the services hosted as ``services`` with their
local agents given the ``agents`` identity, the workflow submitted and followed as
``clients``; the server's connection list (closed ones included) shows who connected as
whom. As a user runs it: ``jetreduce run`` with setup, map (one failing item, one output
stored as an object), reduce, then the queries on its store; the server logs no permission
violation."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import nats
import pytest
from test_cli import cli

from helpers import read_stream
from jetreduce.cli.host import ServiceHost
from jetreduce.cli.submit import submit
from jetreduce.cli.watch import Watcher
from jetreduce.contract import events as ev
from jetreduce.contract.subjects import Subjects
from jetreduce.embedded import EmbeddedServer, role_settings
from jetreduce.runtime.connection import connect
from jetreduce.runtime.settings import NatsSettings

pytestmark = pytest.mark.anyio

WORKFLOW = """
name: roles
setup:
  # the fifth item is larger than a message takes: the planner stores it as an object
  - shell: "printf '[1, 2, 3, 4, \\"%s\\"]' $(head -c 300000 /dev/zero | tr '\\\\0' y) > items.json"
map:
  input: items.json
  max_parallel: 2
  agent_template:
    # outputs beyond an event's text limit (64 KiB) are stored as objects, and read by reduce
    - shell: "test ${item_index} -ne 2 && head -c 70000 /dev/zero | tr '\\\\0' x"
reduce:
  - shell: "echo reduced ${map.successful} of ${map.total}"
error_policy:
  on_item_failure: dlq
  continue_on_failure: true
  max_failures: 5
"""


def _connections(server: EmbeddedServer) -> list[dict[str, Any]]:
    url = f"{server.monitor_url}/connz?state=all&auth=true&limit=1000"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return list(json.loads(resp.read())["connections"])


def _violations(server_dir: Path) -> list[str]:
    log = (server_dir / "nats-server.log").read_text()
    return [line for line in log.splitlines() if "violation" in line.lower()]


async def test_services_agents_and_client_each_connect_as_their_own_user(
    tmp_path: Path, prefix: str
) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    with EmbeddedServer(tmp_path / "nats", roles=prefix) as server:
        base = NatsSettings(url=server.url, prefix=prefix)
        services, agents, client = (
            role_settings(server.data_dir, role, base) for role in ("services", "agents", "clients")
        )
        assert services and agents and client
        host = ServiceHost(services, log_dir=tmp_path / "logs", agents=agents, max_processes=2)
        async with host.running():
            nc = await connect(replace(client, name="jetreduce-cli"), forever=False)
            try:
                s = Subjects(prefix)
                watcher = Watcher(nc, s, "wf-roles", quiet=True, show_events=False)
                await watcher.start()
                options = ev.SubmitOptions(workdir=str(workdir), max_parallel=2, max_attempts=1)
                reply = await submit(
                    nc, s, WORKFLOW, options, workflow_id="wf-roles", source="roles.yml"
                )
                assert reply.accepted, reply
                end = await asyncio.wait_for(watcher.until_done(), 60)
                # Read as a client too: the outputs that went to the object store.
                done = await read_stream(nc.jetstream(), s.results_stream, s.done_of("wf-roles"))
                assert sum(isinstance(r, ev.ItemDone) and r.output_stored for r in done) == 4
            finally:
                await nc.close()
        assert isinstance(end, ev.WorkflowCompleted), end
        assert (end.done, end.dead) == (4, 1)
        users: dict[str, set[str]] = {}
        for conn in _connections(server):
            name = conn.get("name", "")
            kind = "agent" if name.startswith("jetreduce-agent") else name
            users.setdefault(kind, set()).add(conn.get("authorized_user", ""))
        assert users["agent"] == {"agents"}, users  # setup, map and reduce agents alike
        assert users["jetreduce-services"] == {"services"}, users
        assert users["jetreduce-cli"] == {"clients"}, users
        assert _violations(server.data_dir) == []


def test_run_and_the_queries_on_its_store_are_never_refused(tmp_path: Path) -> None:
    (tmp_path / "roles.yml").write_text(WORKFLOW)
    out = cli("run", "roles.yml", "--id", "wf-run", "--max-attempts", "1", cwd=tmp_path)
    assert out.returncode == 3, out.stderr  # completed, one item dead-lettered
    assert "reduced 4 of 5" in out.stdout
    store = tmp_path / ".jetreduce" / "nats"
    for role in ("services", "agents", "clients"):
        assert (store / f"{role}.env").stat().st_mode & 0o777 == 0o600
    for query in (
        ["status", "wf-run"],
        ["dlq", "show", "wf-run", "2"],
        ["logs", "wf-run", "2"],
        ["dlq", "retry", "wf-run"],
        ["dlq", "purge", "wf-run"],
    ):
        done = cli(*query, cwd=tmp_path)
        assert done.returncode == 0, (query, done.stderr)
    assert _violations(store) == []


def test_services_up_gives_local_agents_the_identity_of_agent_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--agent-env FILE``: the launcher's local agents connect as the file says (its
    identity only: no credential of the services' is kept), where the services connect."""
    from typer.testing import CliRunner

    import jetreduce.cli.app as app
    import jetreduce.cli.serve as serve

    seen: dict[str, Any] = {}

    class Recorded:
        def __init__(self, settings: NatsSettings, *args: Any, **kwargs: Any) -> None:
            seen.update(settings=settings, agents=kwargs.get("agents"))
            raise ValueError("recorded")  # the command stops here, before connecting

    monkeypatch.setattr(serve, "ServiceHost", Recorded)
    agent_env = tmp_path / "agents.env"
    agent_env.write_text("JETREDUCE_NATS_USER=agents\nJETREDUCE_NATS_PASSWORD=pa\n")
    env = {
        "JETREDUCE_NATS_URL": "nats://10.0.0.1:4222",
        "JETREDUCE_NATS_USER": "services",
        "JETREDUCE_NATS_PASSWORD": "ps",
        "JETREDUCE_NATS_TLS_CERT": "/services.crt",
    }
    result = CliRunner().invoke(app.app, ["services", "up", "--agent-env", str(agent_env)], env=env)
    assert "recorded" in result.output
    services, agents = seen["settings"], seen["agents"]
    assert (services.user, services.password) == ("services", "ps")
    assert (agents.user, agents.password, agents.tls_cert) == ("agents", "pa", None)
    assert agents.url == services.url == "nats://10.0.0.1:4222"


def test_a_server_with_roles_refuses_anonymous_clients_and_writes_private_credentials(
    tmp_path: Path,
) -> None:
    from test_cli import JETREDUCE

    from support import env_without_jetreduce

    server = subprocess.Popen(
        [*JETREDUCE, "server", "--roles", "--port", "-1", "--data-dir", str(tmp_path / "d")],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env_without_jetreduce(),
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        assert url.startswith("nats://127.0.0.1:")
        store = tmp_path / "d" / "nats"

        async def check() -> None:
            with pytest.raises(Exception):  # noqa: B017 - no anonymous access
                await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0)
            for role in ("services", "agents", "clients"):
                assert (store / f"{role}.env").stat().st_mode & 0o777 == 0o600
                settings = role_settings(store, role, NatsSettings(url=url))
                assert settings is not None and settings.user == role
                nc = await connect(settings, forever=False, timeout_s=5)
                await nc.close()

        asyncio.run(check())
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
