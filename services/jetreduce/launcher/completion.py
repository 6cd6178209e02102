"""Whether a stored ``map.complete`` may be acted on: the launcher stops the map agents and
starts the reduce on it, so a false one (anyone allowed to publish events can store one)
must be recognised and removed, never obeyed. Kept apart from the launcher's event loop
because it is the one place the launcher counts results."""

from __future__ import annotations

import contextlib
import logging

from nats.js.errors import NotFoundError

from jetreduce.contract.events import MapComplete, decode_as
from jetreduce.contract.records import WorkflowRecord, counted_complete
from jetreduce.runtime.counts import count_items_in_range, count_subjects
from jetreduce.runtime.service import ServiceContext

__all__ = ["map_is_complete", "stored_map_complete"]

log = logging.getLogger(__name__)


async def stored_map_complete(ctx: ServiceContext, wf: str) -> tuple[MapComplete, int] | None:
    """The workflow's stored ``map.complete`` and its stream sequence, or None."""
    subject = ctx.subjects.map("complete", wf)
    try:
        stored = await ctx.js.get_last_msg(ctx.subjects.events_stream, subject)
    except NotFoundError:
        return None
    if stored.data is None or stored.seq is None:
        return None
    return decode_as(stored.data, MapComplete, subject=subject), stored.seq


async def map_is_complete(
    ctx: ServiceContext, record: WorkflowRecord, complete: MapComplete, seq: int
) -> bool:
    """Whether ``map.complete`` is true: the workflow's record vouches for it (the
    aggregator's count, ``counted_complete``: no request at all), or else its counts add up
    to the planned total and the server holds exactly that many terminal items in
    ``0..total-1`` (one exact count; the item-by-item one only when there are more results
    than items). A false one is removed from the stream, so that the aggregator's true one
    can be stored and the map agents are admitted as before."""
    if counted_complete(record, complete):
        return True
    wf, total = record.workflow_id, record.total
    s = ctx.subjects
    terminal = await count_subjects(ctx.nc, s.results_stream, s.terminal_of(wf))
    if total is not None and terminal > total:
        # More results than items: some name an index the workflow does not have
        # (forged). Only those in 0..total-1 count, as for the aggregator.
        terminal, _ = await count_items_in_range(ctx.nc, s.results_stream, s.terminal_of(wf), total)
    if complete.total == total == terminal and complete.done + complete.dead == total:
        return True
    log.error(
        "workflow %s: map.complete refused (says %d of %d, planned %s, %d terminal)",
        wf,
        complete.done + complete.dead,
        complete.total,
        total,
        terminal,
    )
    with contextlib.suppress(Exception):  # best effort: the forged event stays inert
        await ctx.js.delete_msg(s.events_stream, seq)
    return False
