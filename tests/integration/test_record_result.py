"""An item's terminal result on the real RESULTS stream (worker/record.py): first write wins
among twins, and what no lease can have written is replaced."""

from __future__ import annotations

from typing import Any

import nats
import pytest

from jetreduce.contract import events as ev
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.runtime.publish import AckMux
from jetreduce.worker.record import record_result
from support import wait_for

pytestmark = pytest.mark.anyio


def done(attempts: int, agent: str, output: str) -> ev.ItemDone:
    return ev.ItemDone(
        workflow_id="wf-rec",
        index=4,
        item_id="item_4",
        output=output,
        exit_code=0,
        duration_s=0.1,
        attempts=attempts,
        agent=agent,
    )


async def stored_output(js: Any, s: Subjects) -> str:
    msg = await js.get_last_msg(s.results_stream, s.item_done("wf-rec", 4))
    result = ev.decode(msg.data)
    assert isinstance(result, ev.ItemDone)
    return result.output


async def test_a_twins_result_stands_and_a_forged_one_is_replaced(
    nats_url: str, prefix: str
) -> None:
    nc = await nats.connect(nats_url)
    acks = await AckMux(nc).start()
    try:
        js = nc.jetstream()
        s = Subjects(prefix)
        await declare(js, s)
        # The later delivery finished first; the slow first one's write must leave it.
        assert await record_result(acks, js, s, done(2, "h/2/map-1", "twin"), {})
        assert not await record_result(acks, js, s, done(1, "h/1/map-0", "late"), {})
        assert await stored_output(js, s) == "twin"
        # Written by no agent: not a result any lease made. The next real one replaces it.
        seq = (await js.get_last_msg(s.results_stream, s.item_done("wf-rec", 4))).seq
        await js.delete_msg(s.results_stream, seq)
        await js.publish(s.item_done("wf-rec", 4), ev.encode(done(1, "", "forged")))
        assert await record_result(acks, js, s, done(1, "h/1/map-0", "real"), {})

        async def replaced() -> bool:
            return await stored_output(js, s) == "real"

        await wait_for(replaced, timeout_s=5)
    finally:
        await acks.close()
        await nc.drain()
