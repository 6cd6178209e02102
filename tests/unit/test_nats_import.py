"""nats-py is loaded without aiohttp (jetreduce/__init__.py): every process start, agents
included, saves the ~0.2-0.4 s aiohttp costs, and a WebSocket URL, which would need it, is
refused with a clear error instead of nats-py's ImportError."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jetreduce.runtime.connection import ConnectFailed, connect
from jetreduce.runtime.settings import NatsSettings


def test_agents_and_the_cli_load_without_aiohttp_and_it_stays_importable() -> None:
    code = (
        "import sys\n"
        "import jetreduce.cli.agent_main, jetreduce.cli.app\n"
        "assert 'aiohttp' not in sys.modules, 'aiohttp was imported'\n"
        "import aiohttp, kubernetes\n"  # whoever needs it later still gets it
        "import nats.aio.transport as t\n"
        "assert t.aiohttp is None\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.anyio
@pytest.mark.parametrize("url", ["ws://127.0.0.1:8080", "nats://a:4222, wss://b:443"])
async def test_a_websocket_url_is_refused_with_what_to_use(url: str) -> None:
    with pytest.raises(ConnectFailed, match=r"WebSocket URLs are not supported.*nats://"):
        await connect(NatsSettings(url=url), timeout_s=1)
