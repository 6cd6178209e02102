"""The embedded server binds loopback only by default; asked to listen beyond it, it
generates credentials (issue 8): an anonymous client is refused, one with the generated
user and password works, and the secret is only in owner-readable files."""

from __future__ import annotations

import os
from pathlib import Path

import nats
import pytest
from nats.errors import Error as NatsError

from jetreduce.embedded import EmbeddedServer
from jetreduce.runtime.connection import connect
from jetreduce.runtime.settings import NatsSettings

pytestmark = pytest.mark.anyio


def mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


async def test_loopback_server_needs_no_credentials(tmp_path: Path) -> None:
    with EmbeddedServer(tmp_path) as server:
        assert server.credentials_file is None and server.password is None
        assert server.url.startswith("nats://127.0.0.1:")
        nc = await nats.connect(server.url, connect_timeout=5, max_reconnect_attempts=0)
        await nc.close()


async def test_listening_beyond_loopback_generates_credentials(tmp_path: Path) -> None:
    with EmbeddedServer(tmp_path, host="0.0.0.0") as server:
        creds = server.credentials_file
        assert creds is not None and server.password
        assert mode(creds) == 0o600 and mode(tmp_path / "nats-server.conf") == 0o600
        env = dict(line.split("=", 1) for line in creds.read_text().split())
        with pytest.raises((NatsError, OSError)):
            await nats.connect(
                server.url, connect_timeout=5, max_reconnect_attempts=0, allow_reconnect=False
            )
        settings = NatsSettings.from_env(env, url=server.url)
        nc = await connect(settings, forever=False)
        try:
            js = nc.jetstream()
            await js.add_stream(name="PROBE", subjects=["probe.>"])
            ack = await js.publish("probe.x", b"ok")
            assert ack.seq == 1
        finally:
            await nc.close()
    assert server.password not in (tmp_path / "nats-server.log").read_text()
