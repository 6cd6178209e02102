"""``/healthz`` and ``/readyz`` of a service host (what the Deployments' probes ask), against
a real nats-server of the test's own, which the test then stops: readiness fails at once,
liveness only once the outage outlasts its grace (a short NATS outage restarts nothing)."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from jetreduce.cli.host import ServiceHost
from jetreduce.embedded import EmbeddedServer
from jetreduce.runtime.settings import NatsSettings
from support import wait_for

pytestmark = pytest.mark.anyio


async def _get(port: int, path: str) -> tuple[int, str]:
    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return r.status, r.read().decode().strip()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode().strip()

    return await asyncio.to_thread(get)


async def test_health_and_readiness_follow_nats_and_the_services(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "nats").start()
    try:
        settings = NatsSettings(url=server.url, prefix="health")
        host = ServiceHost(settings, ("planner",), health_port=0, metrics_host="127.0.0.1")
        async with host.running():
            port = host.health_port
            assert port
            assert await _get(port, "/healthz") == (200, "ok")
            assert await _get(port, "/readyz") == (200, "ok")
            assert (await _get(port, "/metrics"))[0] == 404

            server.stop()  # NATS goes away

            async def unready() -> bool:
                return (await _get(port, "/readyz")) == (503, "NATS not connected")

            await wait_for(unready, timeout_s=10)
            assert await _get(port, "/healthz") == (200, "ok")  # within the outage grace
            host.nats_grace_s = 0.2
            await asyncio.sleep(0.3)
            status, text = await _get(port, "/healthz")
            assert status == 503 and text.startswith("NATS unreachable for"), text
    finally:
        server.stop()


async def test_no_health_endpoint_unless_asked(tmp_path: Path, nats_url: str, prefix: str) -> None:
    host = ServiceHost(NatsSettings(url=nats_url, prefix=prefix), ("planner",))
    assert host.health_port is None
