"""Raw ceilings, measured in the same run as the scenarios that are compared with them.

Absolute rates on a shared 2-core machine drift by ±30% between runs (research/baselines.md),
so a scenario's figure only means something as a ratio to what the bare tools achieve on the
same machine at the same moment:

* ``publish`` — nats-py ``publish_async`` with 4,000 outstanding into a WorkQueue stream on
  file storage (~200-byte payload, one subject per message), then
  ``publish_async_completed``: the best an enqueue can do from Python.
* ``fetch_ack`` — one durable pull consumer, ``fetch(100)`` + ``ack()`` per message: the best
  one Python process drains that stream.
* ``spawn`` — ``sh -c true`` through ``asyncio.create_subprocess_exec`` at concurrency 8:
  the floor cost of one shell step, which every shell item pays.

Each runs on its own fresh nats-server, so no scenario's leftovers skew it.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass

import nats
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from loadtest.infra import nats_server

__all__ = ["Ceilings", "measure"]

PAYLOAD = json.dumps(
    {
        "type": "work.item",
        "workflow_id": "bench-0000",
        "ts": 1.0,
        "v": 1,
        "index": 0,
        "item": {"path": "src/module/file_0000.py", "size": 1234, "lang": "python", "n": 0},
    }
).encode()
PENDING = 4000
FETCH_BATCH = 100
SPAWN_CONCURRENCY = 8


@dataclass
class Ceilings:
    publish_per_s: float
    fetch_ack_per_s: float
    spawn_per_s: float
    n_messages: int
    n_spawns: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


async def _publish_and_drain(url: str, n: int) -> tuple[float, float]:
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    try:
        js = nc.jetstream(publish_async_max_pending=PENDING)
        await js.add_stream(
            StreamConfig(
                name="CEIL",
                subjects=["ceil.>"],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
            )
        )
        start = time.perf_counter()
        for i in range(n):
            await js.publish_async(f"ceil.{i}", PAYLOAD)
        await asyncio.wait_for(js.publish_async_completed(), 120)
        pub_rate = n / (time.perf_counter() - start)

        await js.add_consumer(
            "CEIL",
            ConsumerConfig(durable_name="c", ack_policy=AckPolicy.EXPLICIT, max_ack_pending=20000),
        )
        sub = await js.pull_subscribe_bind("c", stream="CEIL")
        got = 0
        start = time.perf_counter()
        deadline = time.monotonic() + 180
        while got < n and time.monotonic() < deadline:
            msgs = await sub.fetch(FETCH_BATCH, timeout=5)
            for msg in msgs:
                await msg.ack()
            got += len(msgs)
        fetch_rate = got / (time.perf_counter() - start)
        await nc.flush()
        return pub_rate, fetch_rate
    finally:
        await nc.close()


async def _spawn(n: int) -> float:
    sem = asyncio.Semaphore(SPAWN_CONCURRENCY)

    async def one() -> None:
        async with sem:
            proc = await asyncio.create_subprocess_exec(
                "sh",
                "-c",
                "true",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            await proc.communicate()

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), 300)
    return n / (time.perf_counter() - start)


_cached: Ceilings | None = None


def measure(quick: bool) -> Ceilings:
    """The three ceilings, measured once per harness run (cached for later scenarios)."""
    global _cached
    if _cached is None:
        n = 20_000 if quick else 100_000
        spawns = 500 if quick else 2_000
        with nats_server() as server:
            pub, fetch = asyncio.run(_publish_and_drain(server.url, n))
        spawn = asyncio.run(_spawn(spawns))
        _cached = Ceilings(pub, fetch, spawn, n, spawns)
    return _cached
