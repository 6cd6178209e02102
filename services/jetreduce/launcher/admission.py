"""Which waiting workflows get map agents when an installation's agent slots are limited.

Agents belong to one workflow (its template, secrets, Kubernetes Job), so priority across
workflows is decided here, by who gets slots, rather than inside a queue (see
docs/architecture.md, departures). Without a limit every workflow starts at once and
priorities have nothing to decide.

Order: the lane (``high`` before ``normal`` before ``low``), then submission time (FIFO within
a lane). Guard against starvation: every ``aging_s`` a workflow has waited lifts it one lane,
so a low workflow waits at most two aging periods behind a stream of high ones. Admission is
strictly in that order: when the first in line does not fit, nobody behind it jumps ahead
(small workflows would otherwise starve a large one forever).

Pure functions; the launcher feeds them from the workflow records (no state of its own, so
a restarted launcher decides the same).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["LANE_RANK", "Candidate", "admit", "order"]

LANE_RANK = {"high": 0, "normal": 1, "low": 2}


@dataclass(frozen=True)
class Candidate:
    workflow_id: str
    priority: str
    waiting_since: float
    """Wall-clock time (s) the workflow was submitted."""
    slots: int


def _rank(c: Candidate, now: float, aging_s: float) -> tuple[int, float]:
    lane = LANE_RANK.get(c.priority, LANE_RANK["normal"])
    lifted = int(max(0.0, now - c.waiting_since) // aging_s) if aging_s > 0 else 0
    return max(0, lane - lifted), c.waiting_since


def order(waiting: Iterable[Candidate], now: float, aging_s: float) -> list[Candidate]:
    return sorted(waiting, key=lambda c: (*_rank(c, now, aging_s), c.workflow_id))


def admit(
    waiting: Iterable[Candidate], free: int | None, now: float, aging_s: float
) -> list[Candidate]:
    """The candidates to start now, in order, with ``free`` slots (None: no limit)."""
    line = order(waiting, now, aging_s)
    if free is None:
        return line
    chosen = []
    for c in line:
        if c.slots > free:
            break
        chosen.append(c)
        free -= c.slots
    return chosen
