"""The SQS queue's batched deletes against moto's SQS server (and a real nats-server for the
dedup records): concurrent acks share DeleteMessageBatch calls, each caller gets its own
message's outcome, and a dedup record goes only with its message."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest

from jetreduce.contract.events import WorkItem
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.queues.base import Lease, LeaseLost, QueueDepth
from jetreduce.queues.resilient import ResilientQueue
from jetreduce.queues.sqs import SqsQueue
from jetreduce.runtime.service import ServiceContext

pytestmark = pytest.mark.anyio


def items(*indices: int) -> list[WorkItem]:
    return [WorkItem(workflow_id="wf", index=i, item={"n": i}) for i in indices]


@pytest.fixture
async def queue(nats_url: str, prefix: str, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    request.getfixturevalue("aws_env")
    moto = request.getfixturevalue("sqs_server")
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    subjects = Subjects(prefix)
    await declare(js, subjects)
    q = SqsQueue(
        ServiceContext(nc, js, subjects),
        f"wf-{secrets.token_hex(4)}",
        f"sqs://jrbatch?region=us-east-1&endpoint={moto.url}",
    )
    await q.prepare(visibility_s=30, max_attempts=3, parallel=4)
    try:
        yield q
    finally:
        await q.purge()
        await q.close()
        await nc.drain()


async def calls_of(q: SqsQueue) -> Counter[str]:
    """The SQS operations ``q``'s client makes from now on."""
    calls: Counter[str] = Counter()
    client = await q._sqs()
    client.meta.events.register("before-call.sqs.*", lambda model, **_: calls.update([model.name]))
    return calls


async def lease_n(q: SqsQueue, n: int) -> list[Lease]:
    got: list[Lease] = []
    for _ in range(50):
        got.extend(await q.lease(n - len(got), wait_s=1.0))
        if len(got) >= n:
            break
    assert len(got) == n
    return got


async def test_concurrent_acks_share_delete_batches(queue: SqsQueue) -> None:
    n = 25
    assert (await queue.enqueue(items(*range(n)))).added == n
    leases = await lease_n(queue, n)
    calls = await calls_of(queue)
    await asyncio.gather(*(queue.ack(lease) for lease in leases))
    # The first delete goes out alone; the 24 gathering behind it fill batches of 10.
    assert calls["DeleteMessage"] == 0
    assert 3 <= calls["DeleteMessageBatch"] <= 4, calls
    assert await queue.depth() == QueueDepth(pending=0, in_flight=0)
    assert await queue.lease(10, wait_s=0.0) == []
    # Every dedup record went with its message: the items can be queued again.
    again = await queue.enqueue(items(*range(n)))
    assert (again.added, again.duplicates) == (n, 0)


async def test_a_failed_entry_fails_only_its_own_caller(queue: SqsQueue) -> None:
    await queue.enqueue(items(0, 1, 2, 3))
    leases = sorted(await lease_n(queue, 4), key=lambda lease: lease.item.index)
    stale = Lease(item=leases[3].item, attempt=1, token="not-a-receipt-handle")
    calls = await calls_of(queue)
    outcomes = await asyncio.gather(
        queue.ack(leases[0]),
        queue.ack(stale),  # shares a batch with the next two
        queue.dead(leases[1], "exit 1"),
        queue.ack(leases[2]),
        return_exceptions=True,
    )
    assert calls["DeleteMessageBatch"] == 2, calls
    assert outcomes[0] is None and outcomes[2] is None and outcomes[3] is None, outcomes
    assert isinstance(outcomes[1], LeaseLost)  # a stale handle: no retry can settle it
    assert "ack" in str(outcomes[1]) and "ReceiptHandleIsInvalid" in str(outcomes[1])
    # The failed entry's item is still queued (in flight) and keeps its dedup record.
    assert await queue.depth() == QueueDepth(pending=0, in_flight=1)
    again = await queue.enqueue(items(0, 1, 2, 3))
    assert (again.added, again.duplicates) == (3, 1)
    await queue.ack(leases[3])  # the real handle still works


async def test_a_lone_ack_is_not_held_back(queue: SqsQueue) -> None:
    """With no delete in flight an ack goes out at once, not after the linger."""
    await queue.enqueue(items(0))
    (lease,) = await lease_n(queue, 1)
    queue._deleter.linger_s = 30.0  # would time the test out if a lone ack lingered
    await asyncio.wait_for(queue.ack(lease), 10.0)
    assert await queue.depth() == QueueDepth(pending=0, in_flight=0)


async def test_a_lost_lease_is_not_taken_for_an_outage(queue: SqsQueue) -> None:
    """Through the agent's ResilientQueue, acking a lease SQS no longer honours fails at
    once with LeaseLost (the slot is freed) instead of backing off forever as if the
    endpoint were down; nothing reports an outage."""
    changes: list[tuple[str, str]] = []

    async def on_change(state: str, error: str) -> None:
        changes.append((state, error))

    resilient = ResilientQueue(queue, asyncio.Event(), on_change)
    await queue.enqueue(items(0))
    (lease,) = await lease_n(queue, 1)
    stale = Lease(item=lease.item, attempt=1, token="not-a-receipt-handle")
    with pytest.raises(LeaseLost):
        await asyncio.wait_for(resilient.ack(stale), 10.0)
    assert changes == [] and not resilient.down
    await resilient.ack(lease)
