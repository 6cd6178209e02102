"""Event lines as `jetreduce watch` and `run` print them: readable for every event type."""

from __future__ import annotations

import re

from jetreduce.cli.watch import describe
from jetreduce.contract import events as ev


def test_every_event_type_reads_as_words() -> None:
    samples = [
        ev.ReduceStarted(workflow_id="w"),
        ev.WorkflowAccepted(workflow_id="w", name="n"),
        ev.WorkflowReopened(workflow_id="w", retried=2),
        ev.CircuitChanged(workflow_id="w", state="half_open", agent="a", consecutive_failures=3),
        ev.MapComplete(workflow_id="w", total=3, done=2, dead=1),
        ev.AgentUsage(
            workflow_id="w",
            phase="map",
            agent="h/7/map-1",
            index=1,
            slots=4,
            held_s=40.0,
            busy_s=30.04,
            items=12,
            drained=True,
        ),
        ev.AgentUsage(
            workflow_id="w", phase="map", agent="h/8/map-0", index=0, slots=1, held_s=0, busy_s=0
        ),
    ]
    done = {"workflow_id": "w", "total": 3, "done": 3, "dead": 0, "duration_s": 2.04}
    samples += [
        ev.WorkflowCompleted(**done, utilisation=0.754, busy_slot_s=30.2, held_slot_s=40.0),
        ev.WorkflowCompleted(**done),  # no map agent reported
    ]
    lines = [describe(e) for e in samples]
    assert lines[:3] == ["reduce started", "workflow accepted", "reopened: 2 dead item(s) retried"]
    assert lines[3] == "agent a: circuit half-open"
    assert lines[4] == "map complete: 2 done, 1 failed of 3"
    assert lines[5] == (
        "agent h/7/map-1 usage: 4 slot(s), busy 30.0 of 40.0 slot-seconds held (75%), "
        "12 item(s), drained early"
    )
    # Nothing held (an agent gone at once): no share to compute.
    assert lines[6] == (
        "agent h/8/map-0 usage: 1 slot(s), busy 0.0 of 0.0 slot-seconds held, 0 item(s), "
        "not drained"
    )
    assert lines[7] == (
        "completed: 3 done, 0 failed of 3 in 2.0s, map slots busy 75% of the time held"
    )
    assert lines[8] == "completed: 3 done, 0 failed of 3 in 2.0s"
    assert all(not re.search(r"[a-z][A-Z]", line) for line in lines)
