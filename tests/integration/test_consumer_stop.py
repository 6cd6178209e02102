"""A service stops at once, not at the end of its long poll, and loses nothing by it: the
poll it abandons is dropped by the server (its interest is gone), so an event published
after the stop goes to the next consumer at once, not after ``ack_wait``."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from nats.aio.msg import Msg

from jetreduce.contract.subjects import Subjects
from jetreduce.runtime.connection import connect
from jetreduce.runtime.service import EventConsumer, ServiceContext
from jetreduce.runtime.settings import NatsSettings
from support import wait_for

pytestmark = pytest.mark.anyio


async def test_a_stop_abandons_the_poll_and_the_next_event_reaches_the_next_consumer(
    nats_url: str, prefix: str
) -> None:
    nc = await connect(NatsSettings(url=nats_url), forever=False)
    stream = f"STOP{uuid.uuid4().hex[:8]}"
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[f"{stream}.>"])
        ctx = ServiceContext(nc=nc, js=js, subjects=Subjects(prefix))
        handled: list[str] = []

        async def handler(msg: Msg) -> None:
            handled.append(msg.subject)

        def consumer() -> EventConsumer:
            c = EventConsumer(
                ctx,
                stream=stream,
                durable="d",
                filters=[f"{stream}.>"],
                handler=handler,
                ack_wait_s=60,
            )
            c.poll_s = 60.0  # a stop that waited for the poll would hang the test
            return c

        async def waiting() -> bool:
            info = await js.consumer_info(stream, "d")
            return (info.num_waiting or 0) >= 1

        stop = asyncio.Event()
        first = asyncio.create_task(consumer().run(stop))
        await js.publish(f"{stream}.a", b"1")
        await wait_for(lambda: handled == [f"{stream}.a"], timeout_s=10)
        await wait_for(waiting, timeout_s=10)
        stop.set()
        await asyncio.wait_for(first, 5)  # not the 60 s poll

        await js.publish(f"{stream}.b", b"2")  # the abandoned poll must not take it
        again = asyncio.Event()
        second = asyncio.create_task(consumer().run(again))
        try:
            await wait_for(lambda: f"{stream}.b" in handled, timeout_s=10)
        finally:
            again.set()
            await asyncio.wait_for(second, 5)
        assert handled == [f"{stream}.a", f"{stream}.b"]
    finally:
        await js.delete_stream(stream)
        await nc.close()
