"""Admission of waiting workflows to limited agent slots (launcher/admission.py)."""

from __future__ import annotations

from jetreduce.launcher.admission import Candidate, admit, order

AGING = 100.0


def c(wf: str, priority: str, since: float, slots: int = 1) -> Candidate:
    return Candidate(wf, priority, since, slots)


def ids(cs: list[Candidate]) -> list[str]:
    return [x.workflow_id for x in cs]


def test_lanes_first_then_fifo() -> None:
    waiting = [c("low1", "low", 1), c("norm1", "normal", 2), c("high1", "high", 3)]
    waiting += [c("norm0", "normal", 0.5), c("high0", "high", 2.5)]
    expected = ["high0", "high1", "norm0", "norm1", "low1"]
    assert ids(order(waiting, now=10, aging_s=AGING)) == expected


def test_waiting_lifts_a_workflow_one_lane_per_aging_period() -> None:
    old_low = c("old-low", "low", 0)
    new_high = c("new-high", "high", 250)
    new_normal = c("new-normal", "normal", 240)
    # at 150 s old-low has waited one period: it counts as normal, ahead of newer normals
    assert ids(order([old_low, new_high, new_normal], now=150, aging_s=AGING)) == [
        "new-high",
        "old-low",
        "new-normal",
    ]
    # at 250 s it has waited two: as high as the high lane, and older than its workflows
    assert ids(order([old_low, new_high, new_normal], now=250, aging_s=AGING)) == [
        "old-low",
        "new-high",
        "new-normal",
    ]


def test_admits_in_order_while_slots_are_free() -> None:
    waiting = [c("a", "high", 1, slots=2), c("b", "normal", 2, slots=2), c("d", "low", 3, slots=1)]
    assert ids(admit(waiting, free=4, now=5, aging_s=AGING)) == ["a", "b"]
    assert ids(admit(waiting, free=5, now=5, aging_s=AGING)) == ["a", "b", "d"]
    assert ids(admit(waiting, free=0, now=5, aging_s=AGING)) == []


def test_nobody_jumps_the_line() -> None:
    """A big high-priority workflow that does not fit yet is not overtaken by a small one."""
    waiting = [c("big", "high", 1, slots=8), c("small", "low", 0, slots=1)]
    assert admit(waiting, free=4, now=5, aging_s=AGING) == []


def test_without_a_limit_everyone_starts() -> None:
    waiting = [c("a", "low", 1, slots=50), c("b", "high", 2, slots=50)]
    assert ids(admit(waiting, free=None, now=5, aging_s=AGING)) == ["b", "a"]
