"""The launcher's view of the workflows in their map phase (for admissions under a slot
cap), kept from the workflow records by every launcher replica, leader or not."""

from __future__ import annotations

import asyncio

from jetreduce.contract.records import Phase, WorkflowRecord
from jetreduce.runtime.state import StateStore

__all__ = ["MappingRecords"]


class MappingRecords:
    """The records of the workflows in their map phase, kept by a watch of the workflow
    records (the KV bucket), so that an admission with a slot cap reads no record but the
    one its event is about. The watch first delivers every current record (as the full
    read of a restarted launcher did), then each change; every launcher replica keeps its
    own, so none depends on seeing the events the others handled. Revisions keep it
    monotonic when a direct read and the watch report the same record."""

    def __init__(self, state: StateStore) -> None:
        self._state = state
        self.ready = asyncio.Event()
        """Set once the watch has delivered every record that existed when it started."""
        self.watching = False
        self._mapping: dict[str, WorkflowRecord] = {}
        self._revision: dict[str, int] = {}
        """Of every record seen (an int per workflow, kept after it maps: a read that
        raced a newer change must not bring an old phase back)."""
        self.priority: dict[str, str] = {}
        """Workflow → its priority (from the spec, read once while it maps)."""
        self.complete: set[str] = set()
        """Mapping workflows whose ``map.complete`` is stored (seen by an admission)."""

    def records(self) -> list[WorkflowRecord]:
        return list(self._mapping.values())

    def apply(self, wf: str, record: WorkflowRecord | None, revision: int) -> None:
        """``record`` (None: deleted) at ``revision``, unless a newer one was applied."""
        if revision <= self._revision.get(wf, 0):
            return
        self._revision[wf] = revision
        if record is not None and record.phase == Phase.MAPPING and record.total:
            self._mapping[wf] = record
            return
        self._mapping.pop(wf, None)
        self.priority.pop(wf, None)
        self.complete.discard(wf)

    async def refresh(self, wf: str) -> None:
        """Read ``wf``'s record now (an event is about it; the watch may not have it yet)."""
        found = await self._state.get_with_revision(wf)
        if found is not None:
            self.apply(wf, found[0], found[1])

    async def watch(self, stop: asyncio.Event, retry_s: float = 1.0) -> None:
        """Follow the records until ``stop`` (``ready`` once every existing one is in)."""
        self.watching = True
        try:
            await self._state.follow(
                stop, self.apply, on_caught_up=self.ready.set, who="launcher", retry_s=retry_s
            )
        finally:
            self.watching = False
