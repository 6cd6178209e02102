"""Item queue on Redis Streams: one stream and one consumer group per workflow.

Mapping of the contract (DESIGN §7, research/jetstream.md §8):

* **lease** — ``XREADGROUP`` on the workflow's group; the stream entry stays in the group's
  pending list (PEL) until acked. Before reading new entries the same Lua script reclaims
  leases idle longer than the visibility timeout (``XAUTOCLAIM``), so a consumer that vanished
  mid-item gives its items back without anyone noticing it died.
* **heartbeat** — ``XCLAIM … JUSTID`` by the holder to itself with min-idle 0: it resets the
  entry's idle time without counting a delivery, and only if the caller still holds it (a lease
  already reclaimed by someone else is not stolen back).
* **retry(delay)** — the entry leaves the stream (``XACK`` + ``XDEL``) and the item index goes
  into a sorted set scored by its due time (server clock, ``TIME``); each ``lease`` first moves
  due members back into the stream, atomically, in the same script. No timers in clients.
* **attempts** — a hash ``index → deliveries`` incremented by the lease script at each delivery
  (``XPENDING``'s counter cannot be used: a retried item is a new stream entry).
* **enqueue** idempotent — a set of the indices enqueued and not yet finished; the enqueue
  script adds an entry only when ``SADD`` says the index is new. Same rule as the JetStream
  queue: an item pending, delayed or in flight is a duplicate; a finished one can be queued again.
* **ack / dead** — ``XACK`` + ``XDEL`` and forget the index (payload, attempts, set member).

The payload of an item is stored once, in a hash, and stream entries carry only the index: a
retry then needs no copy of the payload, and an entry whose item was finished meanwhile (a
stale copy) is recognised and dropped by the lease script.

Keys are ``jetreduce:<prefix>:{<workflow>}:<name>``; the braces are a Redis Cluster hash tag,
so every key a script touches hashes to one slot. The scripts are inline constants rather than
``.lua`` files beside this module because the package data of the distribution only ships
``py.typed``: a ``.lua`` file would be missing from an installed wheel.

Priority lanes are not implemented on Redis: every lane goes to the one stream (FIFO).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Iterable
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from jetreduce.contract.events import BadEvent, WorkItem, decode_as, encode
from jetreduce.queues.base import EnqueueResult, Lease, QueueDepth, QueueError

__all__ = ["RedisQueue"]

log = logging.getLogger(__name__)


GROUP = "jetreduce"
"""The one consumer group of a workflow's stream (the stream itself is per workflow)."""

DEFAULT_VISIBILITY_S = 30.0
"""Lease length used when ``prepare`` has not stored one (the planner always does)."""

ENQUEUE_CHUNK = 500
"""Items per enqueue script call; the calls of one ``enqueue`` share one pipeline."""

POLL_S = 0.25
"""Longest a waiting ``lease`` blocks before re-running the script: bounds how late an
expired lease or a due retry is noticed while the stream itself stays quiet."""

_ENQUEUE = """
-- KEYS: queued set, items hash, stream. ARGV: index1, payload1, index2, payload2, ...
local added = 0
for i = 1, #ARGV, 2 do
  if redis.call('SADD', KEYS[1], ARGV[i]) == 1 then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    redis.call('XADD', KEYS[3], '*', 'i', ARGV[i])
    added = added + 1
  end
end
return added
"""

_LEASE = """
-- KEYS: stream, delayed zset, items hash, attempts hash, claim cursor.
-- ARGV: group, consumer, max_n, visibility_ms.
-- Returns {entries, last_id, ms_to_next_due}; entries are {id, payload, attempt}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)
for _, idx in ipairs(due) do
  redis.call('XADD', KEYS[1], '*', 'i', idx)
  redis.call('ZREM', KEYS[2], idx)
end
local max_n = tonumber(ARGV[3])
local out = {}
local function take(entries)
  for _, e in ipairs(entries) do
    if e and e[2] then
      local idx = e[2][2]
      local payload = redis.call('HGET', KEYS[3], idx)
      if payload then
        local n = redis.call('HINCRBY', KEYS[4], idx, 1)
        out[#out + 1] = {e[1], payload, n}
      else
        -- a stale copy of an item finished meanwhile: drop it
        redis.call('XACK', KEYS[1], ARGV[1], e[1])
        redis.call('XDEL', KEYS[1], e[1])
      end
    end
  end
end
local cursor = redis.call('GET', KEYS[5]) or '0-0'
local claimed = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[4], cursor,
                           'COUNT', max_n)
redis.call('SET', KEYS[5], claimed[1])
take(claimed[2])
if #out < max_n then
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', max_n - #out,
                       'STREAMS', KEYS[1], '>')
  if r then take(r[1][2]) end
end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local last_id = '0-0'
if #last > 0 then last_id = last[1][1] end
local next_due = -1
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if #first > 0 then next_due = math.max(0, tonumber(first[2]) - now) end
return {out, last_id, next_due}
"""

_HEARTBEAT = """
-- KEYS: stream. ARGV: group, consumer, id. 1 if the caller still held the lease.
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""

_RETRY = """
-- KEYS: stream, delayed zset, queued set. ARGV: group, id, index, delay_ms.
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if redis.call('SISMEMBER', KEYS[3], ARGV[3]) == 1 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[3])
end
return 1
"""

_FINISH = """
-- KEYS: stream, delayed zset, queued set, items hash, attempts hash. ARGV: group, id, index.
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('SREM', KEYS[3], ARGV[3])
redis.call('HDEL', KEYS[4], ARGV[3])
redis.call('HDEL', KEYS[5], ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[3])
return 1
"""

_DEPTH = """
-- KEYS: stream, delayed zset. ARGV: group. Returns {pending, in_flight}.
local delayed = redis.call('ZCARD', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 0 then return {delayed, 0} end
local len = redis.call('XLEN', KEYS[1])
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1])
local pel = 0
if type(p) == 'table' and p.err == nil then pel = tonumber(p[1]) end
return {len - pel + delayed, pel}
"""


@contextlib.asynccontextmanager
async def _translated(what: str) -> AsyncIterator[None]:
    """Above ``queues/`` nothing knows redis: its failures become :class:`QueueError`."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise QueueError(f"redis {what} failed: {exc}") from exc


class RedisQueue:
    """The item queue of one workflow on Redis (see the module docstring for the mapping).

    ``client`` may be injected (tests, a shared pool); otherwise one is built from ``url`` (and
    ``password``, kept out of the URL stored with the workflow) and closed by :meth:`close`.
    """

    def __init__(
        self,
        workflow_id: str,
        *,
        url: str,
        prefix: str = "",
        password: str | None = None,
        client: aioredis.Redis | None = None,
    ) -> None:
        self.workflow_id = workflow_id
        self._own_client = client is None
        self._r: aioredis.Redis = (
            client if client is not None else aioredis.Redis.from_url(url, password=password)
        )
        base = f"jetreduce:{prefix}:{{{workflow_id}}}"
        self.k_stream = f"{base}:stream"
        self.k_delayed = f"{base}:delayed"
        self.k_queued = f"{base}:queued"
        self.k_items = f"{base}:items"
        self.k_attempts = f"{base}:attempts"
        self.k_cursor = f"{base}:cursor"
        self.k_config = f"{base}:config"
        self._keys = [
            self.k_stream,
            self.k_delayed,
            self.k_queued,
            self.k_items,
            self.k_attempts,
            self.k_cursor,
            self.k_config,
        ]
        # A consumer name of its own per queue object: the PEL then tells whose lease it is.
        self._consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._visibility_ms: int | None = None
        self._s_enqueue = self._r.register_script(_ENQUEUE)
        self._s_lease = self._r.register_script(_LEASE)
        self._s_heartbeat = self._r.register_script(_HEARTBEAT)
        self._s_retry = self._r.register_script(_RETRY)
        self._s_finish = self._r.register_script(_FINISH)
        self._s_depth = self._r.register_script(_DEPTH)

    async def prepare(self, *, visibility_s: float, max_attempts: int, parallel: int) -> None:
        """Store the lease length (agents never call ``prepare``: they read it back) and create
        the consumer group from the stream's start, so entries added before it are served."""
        async with _translated("prepare"):
            await self._r.hset(
                self.k_config,
                mapping={"visibility_ms": int(visibility_s * 1000), "max_attempts": max_attempts},
            )
            await self._create_group()
        self._visibility_ms = int(visibility_s * 1000)

    async def _create_group(self) -> None:
        try:
            await self._r.xgroup_create(self.k_stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def enqueue(self, items: Iterable[WorkItem], *, lane: str = "p1") -> EnqueueResult:
        args: list[list[bytes | int]] = [[]]
        total = 0
        for item in items:
            if len(args[-1]) >= 2 * ENQUEUE_CHUNK:
                args.append([])
            args[-1].extend((item.index, encode(item)))
            total += 1
        if total == 0:
            return EnqueueResult()
        async with _translated("enqueue"):
            pipe = self._r.pipeline(transaction=False)
            keys = [self.k_queued, self.k_items, self.k_stream]
            for chunk in args:
                await self._s_enqueue(keys=keys, args=chunk, client=pipe)
            results = await pipe.execute()
        added = sum(int(n) for n in results)
        return EnqueueResult(added=added, duplicates=total - added)

    async def _visibility(self) -> int:
        if self._visibility_ms is None:
            raw = await self._r.hget(self.k_config, "visibility_ms")
            self._visibility_ms = int(raw) if raw is not None else int(DEFAULT_VISIBILITY_S * 1000)
        return self._visibility_ms

    async def _lease_once(self, max_n: int) -> tuple[list[Lease], str, int]:
        visibility_ms = await self._visibility()
        keys = [self.k_stream, self.k_delayed, self.k_items, self.k_attempts, self.k_cursor]
        argv: list[str | int] = [GROUP, self._consumer, max_n, visibility_ms]
        try:
            reply = await self._s_lease(keys=keys, args=argv)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._create_group()  # an agent before (or after a purge by) the planner
            reply = await self._s_lease(keys=keys, args=argv)
        entries, last_id, next_due = cast(list[Any], reply)
        leases: list[Lease] = []
        for entry_id, payload, attempt in entries:
            try:
                item = decode_as(payload, WorkItem)
            except BadEvent:
                # not ours to run: never redeliver garbage
                log.warning("dropping undecodable item in %s", self.k_stream)
                await self._r.xack(self.k_stream, GROUP, entry_id)
                await self._r.xdel(self.k_stream, entry_id)
                continue
            leases.append(Lease(item=item, attempt=int(attempt), token=_text(entry_id)))
        return leases, _text(last_id), int(next_due)

    async def lease(self, max_n: int, wait_s: float) -> list[Lease]:
        """Reclaim expired leases, promote due retries, read new entries — then, if nothing
        came, block on the stream (``XREAD`` from its last id, which consumes nothing) for at
        most :data:`POLL_S` or until the next retry is due, and try again until ``wait_s``."""
        if max_n <= 0:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, wait_s)
        async with _translated("lease"):
            while True:
                leases, last_id, next_due_ms = await self._lease_once(max_n)
                remaining = deadline - loop.time()
                if leases or remaining <= 0:
                    return leases
                block_s = min(remaining, POLL_S)
                if next_due_ms >= 0:
                    block_s = min(block_s, next_due_ms / 1000)
                block_ms = int(block_s * 1000)
                if block_ms >= 1:  # BLOCK 0 would mean "forever"
                    await self._r.xread({self.k_stream: last_id}, count=1, block=block_ms)

    ack_concurrency = 16
    """Each ack is a script call: a few in flight keep the connection busy."""

    async def heartbeat(self, lease: Lease) -> None:
        async with _translated("heartbeat"):
            held = await self._s_heartbeat(
                keys=[self.k_stream], args=[GROUP, self._consumer, str(lease.token)]
            )
        if not held:
            log.debug("heartbeat for item %d: lease already lost", lease.item.index)

    async def ack(self, lease: Lease) -> None:
        await self._finish(lease, "ack")

    async def retry(self, lease: Lease, delay_s: float) -> None:
        delay_ms = max(1, int(delay_s * 1000))
        argv: list[str | int] = [GROUP, str(lease.token), lease.item.index, delay_ms]
        async with _translated("retry"):
            await self._s_retry(keys=[self.k_stream, self.k_delayed, self.k_queued], args=argv)

    async def dead(self, lease: Lease, reason: str) -> None:
        await self._finish(lease, "dead")

    async def _finish(self, lease: Lease, what: str) -> None:
        keys = [self.k_stream, self.k_delayed, self.k_queued, self.k_items, self.k_attempts]
        argv: list[str | int] = [GROUP, str(lease.token), lease.item.index]
        async with _translated(what):
            await self._s_finish(keys=keys, args=argv)

    async def depth(self) -> QueueDepth:
        """One script, O(1) in the items (``XLEN``, ``ZCARD`` and ``XPENDING``'s summary, which
        walks consumers, not entries): in flight is the group's pending list (leased), pending
        the stream entries not read yet plus the retries waiting for their due time."""
        async with _translated("depth"):
            pending, in_flight = await self._s_depth(
                keys=[self.k_stream, self.k_delayed], args=[GROUP]
            )
        return QueueDepth(pending=int(pending), in_flight=int(in_flight))

    async def purge(self) -> None:
        async with _translated("purge"):
            await self._r.delete(*self._keys)

    async def close(self) -> None:
        if self._own_client:
            with contextlib.suppress(RedisError, OSError):
                await self._r.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
