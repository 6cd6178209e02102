"""A service whose JetStream does not answer when it starts (a cluster electing a leader,
issue 19) waits for it instead of dying: its durable consumer's first ``ensure`` is retried
like every later fetch. Here the server has no JetStream at all, so every API request finds
no responder, the same answer as a leaderless moment."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from jetreduce.cli.host import ServiceHost
from jetreduce.contract.subjects import Subjects
from jetreduce.embedded import find_nats_server
from jetreduce.runtime.connection import connect
from jetreduce.runtime.service import EventConsumer, ServiceContext
from jetreduce.runtime.settings import NatsSettings
from support import wait_for

pytestmark = pytest.mark.anyio


@pytest.fixture
def core_only_url() -> Iterator[str]:
    """A nats-server without JetStream."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [find_nats_server(), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "nats-server did not listen"
            time.sleep(0.02)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


async def test_consumer_start_without_an_answering_jetstream_waits_instead_of_failing(
    core_only_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    nc = await connect(NatsSettings(url=core_only_url), forever=False)
    try:
        js = nc.jetstream(timeout=0.5)
        subjects = Subjects(prefix)
        ctx = ServiceContext(nc=nc, js=js, subjects=subjects)

        async def handler(msg: object) -> None:
            raise AssertionError("nothing can be delivered")

        consumer = EventConsumer(
            ctx,
            stream=subjects.events_stream,
            durable="waits",
            filters=[subjects.workflow("planned", "*")],
            handler=handler,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(consumer.run(stop))

        def retried_twice() -> bool:
            if task.done():  # the old behaviour: the first request's error ended the service
                raise AssertionError(f"the consumer gave up: {task.exception()!r}")
            return sum("not reachable yet" in r.message for r in caplog.records) >= 2

        with caplog.at_level(logging.WARNING, logger="jetreduce.runtime.service"):
            await wait_for(retried_twice, timeout_s=10)
        stop.set()
        await asyncio.wait_for(task, 5)  # and it still stops when asked
    finally:
        await nc.close()


async def test_services_start_without_an_answering_jetstream_waits_instead_of_failing(
    core_only_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``services up`` declares the topology first: that waits too, and still stops."""
    host = ServiceHost(NatsSettings(url=core_only_url, prefix=prefix), ("janitor",))
    entered = asyncio.Event()

    async def start() -> None:
        async with host.running():
            entered.set()

    with caplog.at_level(logging.WARNING, logger="jetreduce.cli.host"):
        task = asyncio.create_task(start())

        def retried_twice() -> bool:
            if task.done():
                raise AssertionError(f"the services gave up: {task.exception()!r}")
            return sum("not answering yet" in r.message for r in caplog.records) >= 2

        await wait_for(retried_twice, timeout_s=15)
    assert not entered.is_set()
    host.stop.set()
    with pytest.raises(Exception):  # noqa: B017 - the last attempt's error, once stopped
        await asyncio.wait_for(task, 5)
