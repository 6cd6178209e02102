"""The local cluster itself (``jetreduce.cluster``, ``jetreduce server --cluster 3``) and
clients given a URL list: a command works while the first node of its list is down."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import StreamConfig

from jetreduce.cluster import LocalCluster, PortTaken, free_port
from jetreduce.contract.records import Phase, WorkflowRecord
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import TopologySettings, declare
from jetreduce.runtime.connection import connect
from jetreduce.runtime.settings import NatsSettings
from jetreduce.runtime.state import StateStore
from support import env_without_jetreduce, wait_for

pytestmark = pytest.mark.anyio


async def test_cluster_places_r3_streams_on_three_peers(
    nats_cluster: LocalCluster, cluster_url: str, prefix: str
) -> None:
    nc = await connect(NatsSettings(url=cluster_url), forever=False)
    try:
        js = nc.jetstream()
        info = await js.add_stream(
            StreamConfig(name=f"{prefix}R3", subjects=[f"{prefix}.r3"], num_replicas=3)
        )
        assert info.cluster is not None
        names = {info.cluster.leader} | {r.name for r in info.cluster.replicas or []}
        assert names == {n.name for n in nats_cluster.nodes}
        await js.delete_stream(f"{prefix}R3")
    finally:
        await nc.close()


def _jetreduce(
    *args: str, env: dict[str, str], timeout_s: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jetreduce", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
    )


async def test_client_command_works_with_first_node_down(
    nats_cluster: LocalCluster, cluster_url: str, prefix: str
) -> None:
    s = Subjects(prefix)
    # The victim leads nothing (not the meta group, none of this test's streams), so its loss
    # costs no raft election (4-9 s) and the test measures the client's fail-over alone.
    leader = nats_cluster.meta_leader()
    victim = next(n for n in nats_cluster.nodes if n.name != leader)
    nc = await connect(NatsSettings(url=cluster_url, prefix=prefix), forever=False)
    try:
        js = nc.jetstream()
        await declare(js, s, TopologySettings(replicas=3))
        now = time.time()
        record = WorkflowRecord(
            workflow_id="wf-ha", name="ha", phase=Phase.MAPPING, created_ts=now, updated_ts=now
        )
        assert await StateStore(js, s).create(record)
        await _lead_elsewhere(nc, js, prefix, victim.name)
    finally:
        await nc.close()
    victim.kill()
    urls = [victim.url] + [n.url for n in nats_cluster.nodes if n is not victim]
    env = env_without_jetreduce()
    # nats-py shuffles the list, so the dead node is tried first in some runs and not in
    # others: both commands must succeed either way.
    out = _jetreduce("--prefix", prefix, "status", "wf-ha", "--nats", ",".join(urls), env=env)
    assert out.returncode == 0, out.stderr
    assert "wf-ha" in out.stdout and "mapping" in out.stdout
    listed = _jetreduce("--prefix", prefix, "--nats", ",".join(urls), "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "wf-ha" in listed.stdout


async def _lead_elsewhere(nc: Any, js: Any, prefix: str, victim: str) -> None:
    """Step every stream of ``prefix`` led by ``victim`` down until another node leads it."""

    async def moved() -> bool:
        for info in await js.streams_info():
            name = info.config.name or ""
            if f"{prefix.upper()}_JR_" not in name:  # streams, KV_ and OBJ_ buckets
                continue
            current = await js.stream_info(name)
            if current.cluster is None or current.cluster.leader in (None, victim):
                if current.cluster is not None and current.cluster.leader == victim:
                    await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{name}", b"", timeout=5)
                return False
        return True

    await wait_for(moved, timeout_s=20, every_s=0.1)


async def test_server_cluster_command_runs_three_nodes_until_ctrl_c(tmp_path: Path) -> None:
    proc = _server_cluster(tmp_path)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()  # printed once the cluster has a meta leader
        urls = line.split(",")
        assert len(urls) == 3 and all(u.startswith("nats://127.0.0.1:") for u in urls), line
        nc = await connect(NatsSettings(url=line), forever=False)
        try:
            js = nc.jetstream()
            info = await js.add_stream(StreamConfig(name="HA", subjects=["ha.>"], num_replicas=3))
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2
        finally:
            await nc.close()
        servers = _children(proc.pid)
        assert len(servers) == 3, servers
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        assert all(not Path(f"/proc/{pid}").exists() for pid in servers)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _server_cluster(data_dir: Path) -> subprocess.Popen[str]:
    """``jetreduce server --cluster 3`` on free ports."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jetreduce",
            "server",
            "--cluster",
            "3",
            "--port",
            "-1",
            "--data-dir",
            str(data_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_without_jetreduce(),
        # As a shell starts a background job: SIGINT ignored, so Python installs no
        # KeyboardInterrupt. Ctrl-C (a supervisor's SIGINT) must stop the cluster anyway.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


@pytest.mark.parametrize("fixed", [False, True], ids=["chosen", "fixed"])
def test_a_port_taken_after_it_was_chosen(tmp_path: Path, fixed: bool) -> None:
    """Another process binds a node's port between choosing it and starting the node
    (fresh clone run 5: "bind: address already in use" failed the whole cluster tier). A
    chosen port is chosen again; a client port the user fixed is an error that says so."""
    with socket.socket() as squatter:
        for _ in range(20):  # a base whose second port is free for the squatter to take
            cluster = LocalCluster(tmp_path, size=3, base_port=free_port() if fixed else -1)
            taken = cluster.nodes[1].port if fixed else cluster.nodes[1].cluster_port
            try:
                squatter.bind(("127.0.0.1", taken))
                break
            except OSError:
                continue
        squatter.listen()
        if fixed:
            with pytest.raises(PortTaken, match="n2 exited"):
                cluster.start()
            assert not any(n.running for n in cluster.nodes)
            return
        with cluster:
            assert cluster.nodes[1].cluster_port != taken
            assert all(n.running for n in cluster.nodes)
            assert cluster.meta_leader() is not None
