"""The local cluster itself (``jetreduce.cluster``, ``jetreduce server --cluster 3``) and
clients given a URL list: a command works while the first node of its list is down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from nats.js.api import StreamConfig

from jetreduce.cluster import LocalCluster
from jetreduce.runtime.connection import connect
from jetreduce.runtime.settings import NatsSettings
from support import env_without_jetreduce

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
