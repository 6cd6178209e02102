"""Deadlines of running workflows (``timeout_s``), followed through one watch of the records.

Listing the records every second (``kv.keys()``) made a JetStream consumer each time, which
the server kept for minutes: an idle installation piled them up (issue 15, item 11). One KV
watch follows every record instead: a workflow's deadline is learnt when its record
appears (its spec read once), and forgotten when the record turns terminal or goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from jetreduce.contract.records import WorkflowRecord
from jetreduce.contract.subjects import Subjects
from jetreduce.runtime.state import StateStore

__all__ = ["Deadlines"]

log = logging.getLogger(__name__)

_records = msgspec.json.Decoder(WorkflowRecord)


class Deadlines:
    def __init__(self, js: JetStreamContext, subjects: Subjects, state: StateStore) -> None:
        self._js = js
        self._bucket = subjects.workflows_bucket
        self._state = state
        self._created: dict[str, float] = {}
        """Running workflows whose spec is still to be read (when created)."""
        self._due: dict[str, tuple[float, float]] = {}
        """Running workflows with a timeout: (deadline, timeout_s)."""

    async def follow(self, stop: asyncio.Event, retry_s: float = 1.0) -> None:
        """Follow the records until ``stop``; a failed watch is started again (its first
        deliveries are every record, so nothing missed meanwhile is lost)."""
        while not stop.is_set():
            watcher = None
            try:
                kv = await self._js.key_value(self._bucket)
                watcher = await kv.watchall()
                while not stop.is_set():
                    try:
                        entry = await watcher.updates(timeout=1.0)  # type: ignore[no-untyped-call]
                    except NatsTimeout:
                        continue
                    if entry is not None:
                        self._on_entry(entry)
            except Exception as exc:
                log.warning("janitor: watching the workflow records failed (%r)", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), retry_s)
            finally:
                if watcher is not None:
                    with contextlib.suppress(Exception):
                        await watcher.stop()  # type: ignore[no-untyped-call]

    def _on_entry(self, entry: KeyValue.Entry) -> None:
        wf = entry.key
        record = None
        if entry.operation not in ("DEL", "PURGE") and entry.value:
            try:
                record = _records.decode(entry.value)
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.error("janitor: unreadable workflow record %s ignored", wf)
        if record is None or record.phase.terminal:
            self._created.pop(wf, None)
            self._due.pop(wf, None)
        elif wf not in self._due:
            self._created[wf] = record.created_ts

    async def due(self, now: float) -> list[tuple[str, float]]:
        """Running workflows past their deadline, with their ``timeout_s``. Specs of newly
        seen workflows are read here, once each (a spec not stored yet is read next time)."""
        for wf, created in list(self._created.items()):
            spec = await self._state.get_spec(wf)
            if spec is None:
                continue
            del self._created[wf]
            limit = spec.options.timeout_s
            if limit is not None:
                self._due[wf] = (created + limit, limit)
        return [(wf, limit) for wf, (deadline, limit) in self._due.items() if now > deadline]
