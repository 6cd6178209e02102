"""Deadlines of running workflows (``timeout_s``), followed through one watch of the records.

Listing the records every second (``kv.keys()``) made a JetStream consumer each time, which
the server kept for minutes: an idle installation piled them up (issue 15, item 11). One KV
watch follows every record instead: a workflow's deadline is learnt when its record
appears (its spec read once), and forgotten when the record turns terminal or goes away.
"""

from __future__ import annotations

import asyncio

from jetreduce.contract.records import WorkflowRecord
from jetreduce.runtime.state import StateStore

__all__ = ["Deadlines"]


class Deadlines:
    def __init__(self, state: StateStore) -> None:
        self._state = state
        self._created: dict[str, float] = {}
        """Running workflows whose spec is still to be read (when created)."""
        self._due: dict[str, tuple[float, float]] = {}
        """Running workflows with a timeout: (deadline, timeout_s)."""

    async def follow(self, stop: asyncio.Event, retry_s: float = 1.0) -> None:
        """Follow the records until ``stop``."""
        await self._state.follow(stop, self._on_record, who="janitor", retry_s=retry_s)

    def _on_record(self, wf: str, record: WorkflowRecord | None, revision: int) -> None:
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
