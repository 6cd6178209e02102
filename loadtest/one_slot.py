"""The ceiling of one agent per slot (issue 18): bare nats-py processes, one item at a time.

``agents1000`` compares 200 one-slot jetreduce agents with the same slots in 2 processes.
What any one-slot agent must do per item is fixed by exactly-once: take one item (a pull
request and its delivery), store its result and wait for the server's answer (a publish and
its PubAck), then ack the item. Nothing can be batched with one item in hand. This measures
that protocol alone, with nothing else per item, in the same number of processes, each in
its own session as agents are, on a fresh server: the best a Python agent per slot can do
on this machine. Its rate over the few-process jetreduce rate bounds the ratio issue 18 asks
for (≥ 0.5); its CPU per item is the floor of the agents' ``agent_cpu_us_per_item``.

Workers are forked from this (already imported) process, so 200 of them start in a second
instead of 200 interpreter starts.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import resource
import time
from typing import Any

import nats
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from loadtest.ceilings import PAYLOAD
from loadtest.infra import nats_server

__all__ = ["one_slot_ceiling"]

WORK, RESULTS, DURABLE = "ONESLOT", "ONESLOT_RES", "slots"
PENDING = 4000
IDLE_S = 1.0
"""A worker that finds nothing for this long after the start leaves: the queue is empty."""


async def _fill(url: str, n: int, processes: int) -> None:
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    try:
        js = nc.jetstream(publish_async_max_pending=PENDING)
        await js.add_stream(
            StreamConfig(
                name=WORK,
                subjects=["oneslot.work.>"],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
            )
        )
        await js.add_stream(
            StreamConfig(name=RESULTS, subjects=["oneslot.res.>"], storage=StorageType.FILE)
        )
        await js.add_consumer(
            WORK,
            ConsumerConfig(
                durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT, max_ack_pending=processes * 2
            ),
        )
        for i in range(n):
            await js.publish_async(f"oneslot.work.{i}", PAYLOAD)
        await asyncio.wait_for(js.publish_async_completed(), 120)
    finally:
        await nc.close()


async def _work(url: str, ready: Any, go: Any) -> None:
    """One slot: fetch one item, store its result create-only and await the PubAck, ack."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        pull = await js.pull_subscribe_bind(DURABLE, stream=WORK)
        ready.release()
        await asyncio.to_thread(go.wait, 300)
        while True:
            try:
                msgs = await pull.fetch(1, timeout=IDLE_S)
            except nats.errors.TimeoutError:
                return
            for msg in msgs:
                index = msg.subject.rsplit(".", 1)[-1]
                await js.publish(
                    f"oneslot.res.{index}",
                    b'{"type":"item.done","exit_code":0}',
                    headers={"Nats-Expected-Last-Subject-Sequence": "0"},
                )
                await msg.ack()
    finally:
        await nc.close()


def _worker(url: str, ready: Any, go: Any) -> None:
    os.setsid()  # as agents are: each in its own session (and scheduler group)
    asyncio.run(_work(url, ready, go))


async def _results(url: str, n: int) -> int:
    """Wait until ``n`` results are stored (bounded); how many are."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + 600
        while True:
            stored = (await js.stream_info(RESULTS)).state.messages
            if stored >= n or time.monotonic() > deadline:
                return stored
            await asyncio.sleep(0.05)
    finally:
        await nc.close()


def _run(url: str, n: int, processes: int) -> dict[str, Any]:
    # Forked before any event loop runs here: a child would inherit a running one.
    ctx = multiprocessing.get_context("fork")
    ready, go = ctx.Semaphore(0), ctx.Event()
    workers = [
        ctx.Process(target=_worker, args=(url, ready, go), daemon=True) for _ in range(processes)
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        for w in workers:
            w.start()
        for _ in range(processes):
            if not ready.acquire(timeout=120):
                raise RuntimeError("one-slot workers did not connect")
        start = time.perf_counter()
        go.set()
        done = asyncio.run(_results(url, n))
        wall = time.perf_counter() - start
        for w in workers:
            w.join(60)
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
                w.join(5)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "processes": processes,
        "items": done,
        "per_s": round(done / wall, 1),
        "cpu_us_per_item": round(cpu / max(1, done) * 1e6, 1),
    }


def one_slot_ceiling(n: int, processes: int) -> dict[str, Any]:
    """``processes`` bare one-slot workers over ``n`` items on a fresh server: items/s and
    the workers' CPU per item (their start-up included, a few ms each)."""
    with nats_server() as server:
        asyncio.run(_fill(server.url, n, processes))
        return _run(server.url, n, processes)
