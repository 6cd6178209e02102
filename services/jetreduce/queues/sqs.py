"""Item queue on Amazon SQS (or a compatible endpoint): one standard queue per workflow.

URL: ``sqs://STEM?region=REGION&endpoint=URL`` — ``STEM`` starts the name of every workflow
queue (``STEM-<prefix>-<workflow>``, shortened with a hash past SQS's 80 characters); region
and endpoint are optional (the AWS chain's region, AWS's endpoint). Credentials come from the
standard AWS chain only (environment, shared files, instance/pod roles), never from the URL.

Mapping of the contract (research/jetstream.md §8):

* the queue's ``VisibilityTimeout`` is the lease (set by ``prepare`` from ``visibility_s``,
  whole seconds, at least 1); ``ChangeMessageVisibility`` to the same value is the heartbeat
  and to ``delay_s`` the delayed retry (SQS counts the next receive as a delivery);
* ``Lease.attempt`` is ``ApproximateReceiveCount``;
* ack and dead delete the message, through ``DeleteMessageBatch``: deletes of concurrent
  callers are coalesced (up to 10 per call, see ``queues/batching.py``), each caller still
  waits for its own message's outcome and gets a QueueError if that entry failed; the dedup
  record is dropped only after its message is gone. enqueue uses ``SendMessageBatch`` (10 per
  call, several calls in parallel threads). boto3 is blocking: every call runs in a worker
  thread, at most ``MAX_CALLS`` at once per queue object, as many as its client's connection
  pool holds (so connections are reused, never discarded).

**Idempotent enqueue.** Standard queues do not deduplicate, and a FIFO queue's deduplication
id only lasts 5 minutes (and FIFO queues lack per-message delays and cap throughput), so the
queue keeps its own record of the items enqueued and not yet finished: a JetStream KV bucket
(state stays on JetStream whichever queue carries the items, DESIGN §7), key
``<workflow>.<index>``, written after the send succeeds and deleted on ack/dead. Sending
before recording means a crash in between can only queue an item twice (at-least-once: the
terminal write is create-only), never lose it; two enqueues of the same item racing each other
can also both send it. Same rule as the JetStream queue otherwise: a pending, delayed or in-flight
item is a duplicate, a finished one can be queued again.

Not mapped: priority lanes (SQS has no priority; every lane goes to the one queue), and a
redrive policy (the agent dead-letters an item itself after ``max_attempts``). AWS refuses to
re-create a deleted queue's name for 60 s: a workflow id is not reused, so ``purge`` followed by
``prepare`` of the same workflow is not expected outside tests (moto does not enforce it).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import anyio
import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from nats.errors import Error as NatsError
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from jetreduce.contract.events import BadEvent, WorkItem, decode_as, encode
from jetreduce.queues.base import EnqueueResult, Lease, LeaseLost, QueueDepth, QueueError
from jetreduce.queues.batching import Batcher
from jetreduce.runtime.service import ServiceContext

__all__ = ["SqsQueue", "SqsTarget", "parse_sqs_url"]

log = logging.getLogger(__name__)

T = TypeVar("T")
LEASE_LOST_CODES = frozenset(
    {
        "ReceiptHandleIsInvalid",
        "InvalidReceiptHandle",
        "MessageNotInflight",
        "AWS.SimpleQueueService.MessageNotInflight",
    }
)
"""SQS error codes meaning the receipt handle (our lease) is stale: the visibility timeout
ran out and the message was received again, or it is gone."""


NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
MAX_NAME = 80
SEND_BATCH = 10
"""SQS's limit of entries per SendMessageBatch / messages per ReceiveMessage."""
SEND_PARALLEL = 8
"""SendMessageBatch calls in flight at once (each in its own thread)."""
MAX_CALLS = 24
"""boto3 calls in flight at once per queue object, and the size of its connection pool: room
for enqueue's ``SEND_PARALLEL`` sends, a long poll, ``DELETE_PARALLEL`` deletes and beats."""
DELETE_PARALLEL = 4
"""DeleteMessageBatch calls in flight at once."""
DELETE_LINGER_S = 0.02
"""Longest wait of a partial delete batch while another delete call is in flight (with none in
flight a delete goes out at once)."""
RECORD_PARALLEL = 256
"""Dedup-record writes in flight at once."""
MAX_WAIT_S = 20
"""SQS's longest long poll."""
MAX_VISIBILITY_S = 43_200
"""SQS's longest visibility timeout (12 h)."""
RETENTION_S = 1_209_600
"""Keep queued items the longest SQS allows (14 days): a slow workflow must not lose items."""
DEFAULT_VISIBILITY_S = 30


@dataclass(frozen=True)
class SqsTarget:
    stem: str
    region: str | None
    endpoint: str | None


def parse_sqs_url(url: str) -> SqsTarget:
    """``sqs://STEM?region=…&endpoint=…`` → its parts; ValueError saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme != "sqs":
        raise ValueError(f"not an sqs:// URL: {url!r}")
    if parts.username or parts.password:
        raise ValueError("sqs:// URLs carry no credentials: use the AWS environment/chain")
    stem = parts.hostname or parts.netloc or "jetreduce"
    if not NAME_RE.match(stem) or len(stem) > 40:
        raise ValueError(f"sqs queue stem {stem!r}: use 1-40 characters of A-Z a-z 0-9 _ -")
    query = parse_qs(parts.query, keep_blank_values=False)
    unknown = set(query) - {"region", "endpoint"}
    if unknown:
        raise ValueError(f"unknown sqs:// option(s): {', '.join(sorted(unknown))}")
    region = query.get("region", [None])[-1]
    endpoint = query.get("endpoint", [None])[-1]
    if endpoint is not None and urlsplit(endpoint).scheme not in ("http", "https"):
        raise ValueError(f"sqs endpoint {endpoint!r} must be an http(s) URL")
    return SqsTarget(stem=stem, region=region, endpoint=endpoint)


def queue_name(stem: str, prefix: str, workflow_id: str) -> str:
    """A valid SQS name per (installation prefix, workflow): unique, at most 80 characters."""
    parts = [stem, prefix.replace(".", "_"), workflow_id] if prefix else [stem, workflow_id]
    name = "-".join(parts)
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{name[: MAX_NAME - len(digest) - 1]}-{digest}"


def _client_error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def _entry_error(message: str, cause: BaseException) -> QueueError:
    error = QueueError(message)
    error.__cause__ = cause
    return error


_MISSING_QUEUE = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"}


class SqsQueue:
    """The item queue of one workflow on SQS (see the module docstring for the mapping)."""

    def __init__(self, ctx: ServiceContext, workflow_id: str, url: str) -> None:
        self.ctx = ctx
        self.workflow_id = workflow_id
        self.target = parse_sqs_url(url)
        self.name = queue_name(self.target.stem, ctx.subjects.prefix, workflow_id)
        # Named after the installation's work stream: one bucket per installation prefix.
        self._bucket = f"{ctx.subjects.work_stream}_SQS"
        self._client: Any = None
        self._client_lock = asyncio.Lock()
        self._url: str | None = None
        self._visibility_s: int | None = None
        self._kv: KeyValue | None = None
        self._limiter = anyio.CapacityLimiter(MAX_CALLS)
        self._deleter: Batcher[tuple[str, str]] = Batcher(
            self._delete_batch,
            max_batch=SEND_BATCH,
            linger_s=DELETE_LINGER_S,
            max_in_flight=DELETE_PARALLEL,
        )

    # -- plumbing ---------------------------------------------------------------------------
    async def _call(self, what: str, fn: Callable[..., T], /, **kwargs: Any) -> T:
        """Run one blocking boto3 call in a worker thread; its errors become QueueError
        (``LeaseLost`` when SQS says the receipt handle is no longer valid)."""
        try:
            return await self._thread(partial(fn, **kwargs))
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            kind = LeaseLost if code in LEASE_LOST_CODES else QueueError
            raise kind(f"sqs {what} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise QueueError(f"sqs {what} failed: {exc}") from exc

    async def _thread(self, fn: Callable[[], T]) -> T:
        """One blocking call in a worker thread, within the client's connection budget."""
        return await anyio.to_thread.run_sync(fn, limiter=self._limiter)

    async def _sqs(self) -> Any:
        async with self._client_lock:
            if self._client is None:
                config = Config(
                    retries={"max_attempts": 5, "mode": "standard"},
                    max_pool_connections=MAX_CALLS,
                    connect_timeout=5,
                    read_timeout=MAX_WAIT_S + 10,
                )

                def build() -> Any:
                    return boto3.session.Session().client(
                        "sqs",
                        region_name=self.target.region,
                        endpoint_url=self.target.endpoint,
                        config=config,
                    )

                self._client = await self._call("client setup", build)
            return self._client

    async def _queue_url(self) -> str:
        url = await self._queue_url_or_none()
        if url is None:
            raise QueueError(f"sqs queue {self.name} does not exist: prepare() creates it")
        return url

    async def _queue_url_or_none(self) -> str | None:
        if self._url is None:
            sqs = await self._sqs()
            try:
                reply = await self._thread(partial(sqs.get_queue_url, QueueName=self.name))
            except ClientError as exc:
                if _client_error_code(exc) in _MISSING_QUEUE:
                    return None
                raise QueueError(f"sqs get_queue_url failed: {exc}") from exc
            except BotoCoreError as exc:
                raise QueueError(f"sqs get_queue_url failed: {exc}") from exc
            self._url = str(reply["QueueUrl"])
        return self._url

    async def _visibility(self) -> int:
        if self._visibility_s is None:
            url = await self._queue_url()
            sqs = await self._sqs()
            reply = await self._call(
                "get_queue_attributes",
                sqs.get_queue_attributes,
                QueueUrl=url,
                AttributeNames=["VisibilityTimeout"],
            )
            raw = reply.get("Attributes", {}).get("VisibilityTimeout")
            self._visibility_s = int(raw) if raw is not None else DEFAULT_VISIBILITY_S
        return self._visibility_s

    async def _records(self, *, create: bool) -> KeyValue | None:
        """The dedup-record bucket; None if it does not exist and ``create`` is false."""
        if self._kv is None:
            try:
                try:
                    self._kv = await self.ctx.js.key_value(self._bucket)
                except BucketNotFoundError:
                    if not create:
                        return None
                    self._kv = await self.ctx.js.create_key_value(
                        KeyValueConfig(bucket=self._bucket, history=1)
                    )
            except (NatsError, OSError) as exc:
                raise QueueError(f"sqs dedup bucket {self._bucket}: {exc}") from exc
        return self._kv

    def _key(self, index: int) -> str:
        return f"{self.workflow_id}.{index}"

    async def _recorded(self, kv: KeyValue) -> set[int]:
        """Indices with a live record: one ordered-consumer scan, not a get per item."""
        found: set[int] = set()
        watcher = await kv.watch(f"{self.workflow_id}.>", ignore_deletes=True, meta_only=True)
        try:
            while True:
                entry = await watcher.updates(timeout=10.0)  # type: ignore[no-untyped-call]
                if entry is None:
                    break
                found.add(int(entry.key.rsplit(".", 1)[1]))
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return found

    async def _forget(self, index: int) -> None:
        kv = await self._records(create=False)
        if kv is None:
            return
        try:
            await kv.delete(self._key(index))
        except (NatsError, OSError) as exc:
            raise QueueError(f"sqs dedup record of item {index}: {exc}") from exc

    # -- the contract -----------------------------------------------------------------------
    async def prepare(self, *, visibility_s: float, max_attempts: int, parallel: int) -> None:
        """Create (or reconcile the lease length of) the workflow's queue and the dedup bucket."""
        visibility = min(MAX_VISIBILITY_S, max(1, math.ceil(visibility_s)))
        attributes = {
            "VisibilityTimeout": str(visibility),
            "MessageRetentionPeriod": str(RETENTION_S),
        }
        sqs = await self._sqs()
        try:
            reply = await self._thread(
                partial(sqs.create_queue, QueueName=self.name, Attributes=attributes)
            )
            self._url = str(reply["QueueUrl"])
        except ClientError as exc:
            if _client_error_code(exc) not in {"QueueAlreadyExists", "QueueNameExists"}:
                raise QueueError(f"sqs create_queue failed: {exc}") from exc
            url = await self._queue_url()
            await self._call(
                "set_queue_attributes",
                sqs.set_queue_attributes,
                QueueUrl=url,
                Attributes=attributes,
            )
        except BotoCoreError as exc:
            raise QueueError(f"sqs create_queue failed: {exc}") from exc
        self._visibility_s = visibility
        await self._records(create=True)

    async def enqueue(self, items: Iterable[WorkItem], *, lane: str = "p1") -> EnqueueResult:
        """Send the items without a live record, then record them (see the module docstring).
        Partial failures raise QueueError after the sent items are recorded, so calling again
        sends only what is missing."""
        unique: dict[int, WorkItem] = {}
        total = 0
        for item in items:
            total += 1
            unique.setdefault(item.index, item)
        if total == 0:
            return EnqueueResult()
        kv = await self._records(create=True)
        assert kv is not None
        try:
            recorded = await self._recorded(kv)
        except (NatsError, OSError) as exc:
            raise QueueError(f"sqs dedup records unreadable: {exc}") from exc
        todo = [item for index, item in unique.items() if index not in recorded]
        url = await self._queue_url()
        sqs = await self._sqs()

        sent: list[int] = []
        errors: list[str] = []
        limiter = anyio.CapacityLimiter(SEND_PARALLEL)

        async def send(batch: list[WorkItem]) -> None:
            entries = [
                {"Id": str(item.index), "MessageBody": encode(item).decode()} for item in batch
            ]
            async with limiter:
                try:
                    reply = await self._call(
                        "send_message_batch",
                        sqs.send_message_batch,
                        QueueUrl=url,
                        Entries=entries,
                    )
                except QueueError as exc:
                    errors.append(str(exc))
                    return
            sent.extend(int(ok["Id"]) for ok in reply.get("Successful", []))
            errors.extend(
                f"item {bad['Id']}: {bad.get('Code')} {bad.get('Message', '')}"
                for bad in reply.get("Failed", [])
            )

        async with anyio.create_task_group() as tg:
            for start in range(0, len(todo), SEND_BATCH):
                tg.start_soon(send, todo[start : start + SEND_BATCH])

        await self._record(kv, sent)
        if errors:
            raise QueueError(
                f"sqs enqueue: {len(errors)} batch(es)/entries failed; first: {errors[0]}"
            )
        return EnqueueResult(added=len(sent), duplicates=total - len(sent))

    async def _record(self, kv: KeyValue, indices: list[int]) -> None:
        sem = asyncio.Semaphore(RECORD_PARALLEL)

        async def put(index: int) -> None:
            async with sem:
                await kv.put(self._key(index), b"")

        try:
            await asyncio.gather(*(put(i) for i in indices))
        except (NatsError, OSError) as exc:
            raise QueueError(f"sqs dedup records not written: {exc}") from exc

    async def lease(self, max_n: int, wait_s: float) -> list[Lease]:
        """Long-poll for the first messages (whole seconds: SQS's unit), then take what else is
        visible without waiting, up to ``max_n`` (10 per ReceiveMessage)."""
        if max_n <= 0:
            return []
        url = await self._queue_url()
        sqs = await self._sqs()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, wait_s)
        leases: list[Lease] = []
        while len(leases) < max_n:
            remaining = deadline - loop.time()
            wait = 0 if leases else int(min(MAX_WAIT_S, max(0.0, remaining)))
            reply = await self._call(
                "receive_message",
                sqs.receive_message,
                QueueUrl=url,
                MaxNumberOfMessages=min(SEND_BATCH, max_n - len(leases)),
                WaitTimeSeconds=wait,
                MessageSystemAttributeNames=["ApproximateReceiveCount"],
            )
            messages = reply.get("Messages", [])
            for msg in messages:
                lease = await self._lease_of(url, sqs, msg)
                if lease is not None:
                    leases.append(lease)
            if leases and len(messages) < SEND_BATCH:
                break  # nothing more visible right now
            if not leases:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                if wait == 0:  # under a second left: SQS cannot long-poll that, so nap
                    await asyncio.sleep(min(remaining, 0.1))
        return leases

    async def _lease_of(self, url: str, sqs: Any, msg: dict[str, Any]) -> Lease | None:
        try:
            item = decode_as(str(msg["Body"]).encode(), WorkItem)
        except BadEvent:
            log.warning("dropping undecodable message in %s", self.name)
            await self._deleter.submit((str(msg["ReceiptHandle"]), "drop"))
            return None
        attempt = int(msg.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
        return Lease(item=item, attempt=attempt, token=msg["ReceiptHandle"])

    async def _change_visibility(self, what: str, lease: Lease, seconds: int) -> None:
        url = await self._queue_url()
        sqs = await self._sqs()
        await self._call(
            what,
            sqs.change_message_visibility,
            QueueUrl=url,
            ReceiptHandle=lease.token,
            VisibilityTimeout=seconds,
        )

    ack_concurrency = 40
    """Concurrent acks coalesce into ``DeleteMessageBatch`` calls of 10 (``batching``)."""

    async def heartbeat(self, lease: Lease) -> None:
        await self._change_visibility("heartbeat", lease, await self._visibility())

    async def ack(self, lease: Lease) -> None:
        await self._delete(lease, "ack")

    async def retry(self, lease: Lease, delay_s: float) -> None:
        """Visible again after ``delay_s`` rounded up to whole seconds (at least 1: no hot
        loop); the item keeps its dedup record, it is still queued."""
        seconds = min(MAX_VISIBILITY_S, max(1, math.ceil(delay_s)))
        await self._change_visibility("retry", lease, seconds)

    async def dead(self, lease: Lease, reason: str) -> None:
        await self._delete(lease, "dead")

    async def _delete(self, lease: Lease, what: str) -> None:
        """Delete the message (batched with concurrent deletes), then its dedup record."""
        await self._deleter.submit((str(lease.token), what))
        await self._forget(lease.item.index)

    async def _delete_batch(self, entries: list[tuple[str, str]]) -> list[BaseException | None]:
        """One DeleteMessageBatch for up to 10 (receipt handle, what) entries: the outcome of
        each (None: deleted). A handle given twice is sent once and shares its outcome."""
        ids: dict[str, str] = {}
        for handle, _ in entries:
            ids.setdefault(handle, str(len(ids)))
        try:
            url = await self._queue_url()
            sqs = await self._sqs()
            reply = await self._call(
                "delete_message_batch",
                sqs.delete_message_batch,
                QueueUrl=url,
                Entries=[{"Id": i, "ReceiptHandle": h} for h, i in ids.items()],
            )
        except QueueError as exc:
            return [_entry_error(f"sqs {what}: {exc}", exc) for _, what in entries]
        done = {str(ok["Id"]) for ok in reply.get("Successful", [])}
        failed = {str(bad["Id"]): bad for bad in reply.get("Failed", [])}
        outcomes: list[BaseException | None] = []
        for handle, what in entries:
            entry_id = ids[handle]
            if entry_id in done:
                outcomes.append(None)
            elif entry_id in failed:
                bad = failed[entry_id]
                kind = LeaseLost if str(bad.get("Code")) in LEASE_LOST_CODES else QueueError
                outcomes.append(
                    kind(f"sqs {what} failed: {bad.get('Code')} {bad.get('Message', '')}")
                )
            else:
                outcomes.append(QueueError(f"sqs {what} failed: no outcome for the message"))
        return outcomes

    async def depth(self) -> QueueDepth:
        """SQS's approximate counts, one ``GetQueueAttributes``: visible + delayed are pending;
        invisible ones (leased, waiting out a retry delay, or acked with their delete still
        being batched) are in flight. Approximate (eventually consistent): ``idle`` is a
        hint to count exactly, never proof that the map is done."""
        url = await self._queue_url_or_none()
        if url is None:
            return QueueDepth(pending=0, in_flight=0)
        sqs = await self._sqs()
        reply = await self._call(
            "get_queue_attributes",
            sqs.get_queue_attributes,
            QueueUrl=url,
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesDelayed",
                "ApproximateNumberOfMessagesNotVisible",
            ],
        )
        attrs = reply.get("Attributes", {})
        visible = int(attrs.get("ApproximateNumberOfMessages", 0))
        delayed = int(attrs.get("ApproximateNumberOfMessagesDelayed", 0))
        invisible = int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0))
        return QueueDepth(pending=visible + delayed, in_flight=invisible)

    async def purge(self) -> None:
        """Delete the workflow's queue (with its messages) and its dedup records."""
        url = await self._queue_url_or_none()
        if url is not None:
            sqs = await self._sqs()
            try:
                await self._thread(partial(sqs.delete_queue, QueueUrl=url))
            except ClientError as exc:
                if _client_error_code(exc) not in _MISSING_QUEUE:
                    raise QueueError(f"sqs delete_queue failed: {exc}") from exc
            except BotoCoreError as exc:
                raise QueueError(f"sqs delete_queue failed: {exc}") from exc
        self._url = None
        self._visibility_s = None
        kv = await self._records(create=False)
        if kv is not None:
            try:
                await self.ctx.js.purge_stream(
                    f"KV_{self._bucket}", subject=f"$KV.{self._bucket}.{self.workflow_id}.>"
                )
            except NotFoundError:
                pass
            except (NatsError, OSError) as exc:
                raise QueueError(f"sqs dedup records not purged: {exc}") from exc

    async def close(self) -> None:
        """Finish the deletes under way, then close the client."""
        await self._deleter.drain()
        client, self._client = self._client, None
        if client is not None:
            await anyio.to_thread.run_sync(client.close)
