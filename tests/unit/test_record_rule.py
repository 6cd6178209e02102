"""Which stored result an agent whose create-only write was refused leaves standing
(worker/record.py): a twin's at another delivery, never one no lease can have written."""

from __future__ import annotations

from jetreduce.contract.events import ItemDead, ItemDone
from jetreduce.worker.record import _possible


def done(attempts: int, agent: str) -> ItemDone:
    return ItemDone(
        workflow_id="wf",
        index=3,
        item_id="item_3",
        output="x",
        exit_code=0,
        duration_s=0.1,
        attempts=attempts,
        agent=agent,
    )


def test_a_later_delivery_that_finished_first_stands() -> None:
    """A's lease (attempt 1) expired while it ran; B (attempt 2) recorded first: B's stays."""
    assert _possible(done(2, "host/2/map-1"), done(1, "host/1/map-0"))


def test_an_earlier_delivery_that_finished_first_stands() -> None:
    assert _possible(done(1, "host/1/map-0"), done(2, "host/2/map-1"))


def test_this_agents_own_result_stands() -> None:
    """A retried publish of this attempt, or another of its slots at another delivery."""
    assert _possible(done(2, "host/1/map-0"), done(2, "host/1/map-0"))
    assert _possible(done(2, "host/1/map-0"), done(1, "host/1/map-0"))


def test_what_no_lease_can_have_written_is_replaced() -> None:
    mine = done(1, "host/1/map-0")
    assert not _possible(done(1, "mallory/9/map-0"), mine)  # another agent, same delivery
    assert not _possible(done(1, ""), mine)  # no agent
    assert not _possible(done(0, "mallory/9/map-0"), mine)  # no delivery


def test_the_janitors_agent_crashed_verdict_stands() -> None:
    verdict = ItemDead(
        workflow_id="wf",
        index=3,
        item_id="item_3",
        error="agent kept dying",
        error_type="AgentCrashed",
        exit_code=-9,
        stderr_tail="",
        attempts=6,
        duration_s=0.0,
        agent="",
    )
    assert _possible(verdict, done(1, "host/1/map-0"))
