"""Reading and changing the workflow record and stored spec (KV), with compare-and-set.

``transition`` is the only way a phase changes: it re-reads on a lost race and gives up
quietly when the record has already moved on, so a redelivered event is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import msgspec
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KeyValue

from jetreduce.contract.errors import TemporaryError
from jetreduce.contract.records import Phase, StoredSpec, WorkflowRecord
from jetreduce.contract.subjects import Subjects

__all__ = [
    "Contention",
    "RecordCallback",
    "StateStore",
]

log = logging.getLogger(__name__)

RecordCallback = Callable[[str, WorkflowRecord | None, int], None]
"""``(workflow id, record or None when deleted, revision)``: one change of a record."""

_rec_dec = msgspec.json.Decoder(WorkflowRecord)
_spec_dec = msgspec.json.Decoder(StoredSpec)
_enc = msgspec.json.Encoder()


class Contention(TemporaryError, RuntimeError):
    """A record kept changing under a compare-and-set: try the whole operation later."""


class StateStore:
    def __init__(self, js: JetStreamContext, subjects: Subjects) -> None:
        self._js = js
        self._subjects = subjects
        self._records: KeyValue | None = None
        self._specs: KeyValue | None = None

    async def _rec_kv(self) -> KeyValue:
        if self._records is None:
            self._records = await self._js.key_value(self._subjects.workflows_bucket)
        return self._records

    async def _spec_kv(self) -> KeyValue:
        if self._specs is None:
            self._specs = await self._js.key_value(self._subjects.specs_bucket)
        return self._specs

    async def follow(
        self,
        stop: asyncio.Event,
        on_record: RecordCallback,
        *,
        on_caught_up: Callable[[], None] | None = None,
        who: str = "",
        retry_s: float = 1.0,
    ) -> None:
        """Follow every workflow record until ``stop`` through one KV watch: instead of
        listing them (``kv.keys()`` makes a consumer each call, which the server keeps for
        minutes). ``on_caught_up`` is called when the watch has delivered every record that
        existed when it started. A failed watch is started again; its first deliveries are
        every record, so nothing missed meanwhile is lost. An unreadable record is logged
        and skipped."""
        while not stop.is_set():
            watcher = None
            try:
                watcher = await (await self._rec_kv()).watchall()
                while not stop.is_set():
                    try:
                        entry = await watcher.updates(timeout=1.0)  # type: ignore[no-untyped-call]
                    except NatsTimeout:
                        continue
                    if entry is None:
                        if on_caught_up is not None:
                            on_caught_up()
                        continue
                    record = None
                    if entry.operation not in ("DEL", "PURGE") and entry.value:
                        try:
                            record = _rec_dec.decode(entry.value)
                        except (msgspec.DecodeError, msgspec.ValidationError):
                            log.error("%s: unreadable workflow record %s ignored", who, entry.key)
                            continue
                    on_record(entry.key, record, entry.revision or 0)
            except Exception as exc:
                log.warning("%s: watching the workflow records failed (%r)", who, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), retry_s)
            finally:
                if watcher is not None:
                    with contextlib.suppress(Exception):  # cleanup: the connection may be closing
                        await watcher.stop()  # type: ignore[no-untyped-call]

    async def get(self, wf: str) -> WorkflowRecord | None:
        found = await self.get_with_revision(wf)
        return found[0] if found else None

    async def get_with_revision(self, wf: str) -> tuple[WorkflowRecord, int] | None:
        kv = await self._rec_kv()
        try:
            entry = await kv.get(wf)
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        return _rec_dec.decode(entry.value), entry.revision

    async def create(self, record: WorkflowRecord) -> bool:
        """True if created, False if a record with this id exists already."""
        kv = await self._rec_kv()
        try:
            await kv.create(record.workflow_id, _enc.encode(record))
        except KeyWrongLastSequenceError:
            return False
        except Exception as exc:  # nats-py raises a generic APIError (10071) on some versions
            if "10071" in str(exc) or "wrong last sequence" in str(exc):
                return False
            raise
        return True

    async def update(
        self, wf: str, change: Callable[[WorkflowRecord], WorkflowRecord | None]
    ) -> WorkflowRecord | None:
        """Apply ``change`` with CAS, re-reading on conflict. ``change`` returns None to leave
        the record alone. Returns the stored record (None if absent or unchanged)."""
        kv = await self._rec_kv()
        for _ in range(50):
            found = await self.get_with_revision(wf)
            if found is None:
                return None
            record, revision = found
            new = change(record)
            if new is None:
                return None
            new.updated_ts = time.time()
            try:
                await kv.update(wf, _enc.encode(new), last=revision)
                return new
            except KeyWrongLastSequenceError:
                continue
        raise Contention(f"workflow record {wf}: too much contention")

    async def transition(
        self, wf: str, to: Phase, *, allowed_from: set[Phase] | None = None, **fields: object
    ) -> WorkflowRecord | None:
        """Move to ``to`` unless the record is terminal or already at/after ``to``."""

        def change(rec: WorkflowRecord) -> WorkflowRecord | None:
            if rec.phase.terminal or rec.phase == to:
                return None
            if allowed_from is not None and rec.phase not in allowed_from:
                return None
            if not to.terminal and rec.phase.order > to.order:
                return None
            new = msgspec.structs.replace(rec, phase=to, **fields)
            if to.terminal:
                new.finished_ts = time.time()
            return new

        return await self.update(wf, change)

    async def reopen(self, wf: str) -> WorkflowRecord | None:
        """Back to mapping from any phase (a DLQ retry): the one transition that may leave a
        terminal phase, so it is kept apart from :meth:`transition`."""

        def change(rec: WorkflowRecord) -> WorkflowRecord | None:
            if rec.phase == Phase.MAPPING:
                return None
            return msgspec.structs.replace(
                rec,
                phase=Phase.MAPPING,
                reason="",
                reduce_output="",
                finished_ts=None,
                map_counted=False,  # its old count vouches for no new map.complete
            )

        return await self.update(wf, change)

    async def _record_keys(self) -> list[str]:
        """Every workflow id, from the server's count of the bucket's subjects: no consumer,
        where ``kv.keys()`` made one per call that the server kept for minutes (every
        replica's periodic re-reading of the records piled them up). Deleted records are
        among them (their delete marker is a message): ``list`` skips what reads as none.
        Past one page of subjects (the server details at most ``SUBJECT_PAGE``), the keys
        are listed the old way."""
        bucket = self._subjects.workflows_bucket
        for attempt in range(KEYS_ATTEMPTS):  # an election on a cluster times a request out
            try:
                info = await self._js.stream_info(f"KV_{bucket}", subjects_filter=f"$KV.{bucket}.>")
                break
            except (NatsTimeout, TimeoutError):
                if attempt == KEYS_ATTEMPTS - 1:
                    raise
        subjects = info.state.subjects or {}
        if len(subjects) >= SUBJECT_PAGE:
            return await _keys(await self._rec_kv())
        cut = len(f"$KV.{bucket}.")
        return [subject[cut:] for subject in subjects]

    async def list(self) -> list[WorkflowRecord]:
        keys = await self._record_keys()
        out = []
        for key in keys:
            rec = await self.get(key)
            if rec is not None:
                out.append(rec)
        return sorted(out, key=lambda r: r.created_ts)

    async def put_spec(self, wf: str, spec: StoredSpec) -> None:
        kv = await self._spec_kv()
        await kv.put(wf, _enc.encode(spec))

    async def get_spec(self, wf: str) -> StoredSpec | None:
        kv = await self._spec_kv()
        try:
            entry = await kv.get(wf)
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return _spec_dec.decode(entry.value)


SUBJECT_PAGE = 100_000
"""The most subjects a JetStream stream-info reply details (nats-server's limit)."""

KEYS_ATTEMPTS = 3


async def _keys(kv: KeyValue) -> list[str]:
    """Every key; [] only for an empty bucket. On a cluster the ordered consumer behind
    ``keys()`` can be placed on a node that has just died and time out: ask again (a new
    consumer lands elsewhere). A failure is never reported as "no workflows": callers
    would act on it (``jetreduce list`` printed nothing, issue 19)."""
    for attempt in range(KEYS_ATTEMPTS):
        try:
            return await kv.keys()
        except NoKeysError:
            return []
        except (NatsTimeout, TimeoutError):
            if attempt == KEYS_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")
