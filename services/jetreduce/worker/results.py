"""Assembling the map results for reduce, in input order, with bounded memory.

Results arrive from the RESULTS stream in completion order. They are spooled into a SQLite
file keyed by item index (on disk, not in memory), then read back in order into a JSON Lines
file: ``${map.results_file}``. ``${map.results}`` is built from that file only when a reduce
step asks for it, and large values reach the shell through a spill file, never the argv.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from jetreduce.contract.events import ItemDead, ItemDone, decode
from jetreduce.contract.objects import output_object
from jetreduce.contract.subjects import Subjects

__all__ = ["ResultsSpool", "agent_result"]

log = logging.getLogger(__name__)

_enc = msgspec.json.Encoder()


def agent_result(event: ItemDone | ItemDead) -> dict[str, Any]:
    """One entry of ``map.results``: Prodigy's AgentResult shape (``status`` "Success" or
    ``{"Failed": msg}``, ``duration`` as ``{secs, nanos}``) plus our plain fields."""
    secs = int(event.duration_s)
    base: dict[str, Any] = {
        "item_id": event.item_id,
        "index": event.index,
        "duration": {"secs": secs, "nanos": int((event.duration_s - secs) * 1e9)},
        "duration_s": round(event.duration_s, 6),
        "attempts": event.attempts,
    }
    if isinstance(event, ItemDone):
        base.update(status="Success", success=True, output=event.output, exit_code=event.exit_code)
    else:
        base.update(
            status={"Failed": event.error},
            success=False,
            output="",
            error=event.error,
            exit_code=event.exit_code,
        )
    return base


class ResultsSpool:
    def __init__(self, directory: Path) -> None:
        self.path = directory / "results.sqlite"
        self.db = sqlite3.connect(self.path)
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS r (idx INTEGER PRIMARY KEY, ok INTEGER, body BLOB)"
        )
        self.done = 0
        self.dead = 0

    async def fill(
        self,
        js: JetStreamContext,
        subjects: Subjects,
        wf: str,
        expected: int,
        timeout_s: float = 600.0,
    ) -> None:
        """Read every terminal result of ``wf`` (``expected`` of them) from the stream."""
        if expected == 0:
            return
        got = asyncio.Event()
        seen = 0
        batch: list[tuple[int, int, bytes]] = []
        whole: list[int] = []  # outputs too large for their event: read from the store

        async def on_msg(msg: Any) -> None:
            nonlocal seen
            try:
                event = decode(msg.data)
            except Exception:
                return
            if not isinstance(event, ItemDone | ItemDead):
                return
            if isinstance(event, ItemDone) and event.output_stored:
                whole.append(event.index)
            batch.append(
                (event.index, int(isinstance(event, ItemDone)), _enc.encode(agent_result(event)))
            )
            seen += 1
            if len(batch) >= 1000 or seen >= expected:
                self._flush(batch)
            if seen >= expected:
                got.set()

        sub = await js.subscribe(
            subjects.terminal_of(wf),
            stream=subjects.results_stream,
            ordered_consumer=True,
            cb=on_msg,
        )
        try:
            await asyncio.wait_for(got.wait(), timeout_s)
        finally:
            with contextlib.suppress(Exception):  # cleanup: the connection may be closing
                await sub.unsubscribe()
        self._flush(batch)
        if whole:
            await self._whole_outputs(js, subjects, wf, whole)
        row = self.db.execute("SELECT COUNT(*), COALESCE(SUM(ok), 0) FROM r").fetchone()
        self.done = int(row[1])
        self.dead = int(row[0]) - self.done

    async def _whole_outputs(
        self, js: JetStreamContext, subjects: Subjects, wf: str, indexes: list[int]
    ) -> None:
        """Put the stored whole output in place of the tail, one row at a time. An object
        that is gone (a workflow reopened after its cleanup) leaves the tail."""
        store = await js.object_store(subjects.objects_bucket)
        for index in indexes:
            try:
                obj = await store.get(output_object(wf, index))
            except NotFoundError:
                log.warning("whole output of item %d is gone; reduce gets its tail", index)
                continue
            (body,) = self.db.execute("SELECT body FROM r WHERE idx = ?", (index,)).fetchone()
            row = msgspec.json.decode(body)
            row["output"] = (obj.data or b"").decode("utf-8", errors="replace")
            self.db.execute("UPDATE r SET body = ? WHERE idx = ?", (_enc.encode(row), index))
            self.db.commit()

    def _flush(self, batch: list[tuple[int, int, bytes]]) -> None:
        if batch:
            self.db.executemany("INSERT OR IGNORE INTO r VALUES (?, ?, ?)", batch)
            self.db.commit()
            batch.clear()

    def rows(self) -> Iterator[bytes]:
        for (body,) in self.db.execute("SELECT body FROM r ORDER BY idx"):
            yield bytes(body)

    def write_jsonl(self, path: Path) -> None:
        with open(path, "wb") as f:
            for body in self.rows():
                f.write(body)
                f.write(b"\n")

    def as_json_array(self) -> str:
        return "[" + ",".join(b.decode() for b in self.rows()) + "]"

    def close(self) -> None:
        self.db.close()
