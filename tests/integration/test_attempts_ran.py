"""An item's retry budget counts the attempts that ran to a failure (its stored
``item.failed``), not its deliveries: a delivery an agent handed back unrun (stopped,
drained) or lost to its death must not cost the item one of its ``max_attempts``."""

from __future__ import annotations

import pytest

from jetreduce.contract import events as ev
from jetreduce.worker.recording import attempts_ran, dead_stands

from .test_services import context

pytestmark = pytest.mark.anyio


def _failed(wf: str, index: int, attempt: int) -> ev.ItemFailed:
    return ev.ItemFailed(
        workflow_id=wf,
        index=index,
        item_id=f"item_{index}",
        attempt=attempt,
        error="exit 3",
        exit_code=3,
        stderr_tail="",
        retry_in_s=1.0,
    )


async def test_attempts_ran_are_the_failures_stored_never_more_than_the_deliveries(
    nats_url: str, prefix: str
) -> None:
    async with context(nats_url, prefix) as ctx:
        s, js, wf = ctx.subjects, ctx.js, "wf-attempts"
        # First delivery ran and failed; the second was handed back unrun.
        await js.publish(s.item_failed(wf, 5), ev.encode(_failed(wf, 5, 1)))
        assert await attempts_ran(ctx, wf, 5, deliveries=2) == 1  # this one is attempt 2
        assert await attempts_ran(ctx, wf, 6, deliveries=2) == 0  # another item: none ran
        for attempt in (2, 3, 4):  # failures of an earlier run (a DLQ retry reopened it)
            await js.publish(s.item_failed(wf, 5), ev.encode(_failed(wf, 5, attempt)))
        assert await attempts_ran(ctx, wf, 5, deliveries=2) == 2


async def test_a_dead_result_stands_whoever_stored_it(nats_url: str, prefix: str) -> None:
    """An agent killed between recording an item dead and adding its DLQ entry leaves the
    entry to the next delivery, which finds the dead result stored (its own publish is
    refused) and adds the entry all the same (worker/recording.py ``_bury``)."""
    async with context(nats_url, prefix) as ctx:
        s, js, wf = ctx.subjects, ctx.js, "wf-dead-stands"
        dead = ev.ItemDead(
            workflow_id=wf,
            index=3,
            item_id="item_3",
            error="exit 9",
            exit_code=9,
            stderr_tail="",
            attempts=2,
            agent="a/1",
        )
        done = ev.ItemDone(
            workflow_id=wf,
            index=4,
            item_id="item_4",
            output="",
            exit_code=0,
            duration_s=0.1,
            attempts=1,
            agent="a/1",
        )
        await js.publish(s.item_dead(wf, 3), ev.encode(dead))
        await js.publish(s.item_done(wf, 4), ev.encode(done))
        assert await dead_stands(ctx, wf, 3)
        assert not await dead_stands(ctx, wf, 4)  # done: never dead-lettered
        assert not await dead_stands(ctx, wf, 5)  # nothing stored
