"""An attempt's outcome as a value (issue 16): decided from the steps' result, the attempt
number and the policy, before anything is published; counted before the item runs."""

from __future__ import annotations

import pytest

from jetreduce.queues.base import UNVERDICTED_DELIVERIES
from jetreduce.worker.outcome import (
    AGENT_CRASHED,
    COMMAND_FAILED,
    MERGE_CONFLICT,
    TIMEOUT,
    Dead,
    Done,
    Retry,
    before_run,
    decide,
    failure,
)
from jetreduce.worker.stepflow import StepsResult
from jetreduce.worker.steps import StepOutcome

pytestmark = pytest.mark.unit


def backoff(attempt: int) -> float:
    return 10.0 * attempt


def failed(**kw: object) -> StepsResult:
    outcome = StepOutcome(3, "", "boom", 0.1, **kw)  # type: ignore[arg-type]
    return StepsResult(outcomes=[outcome], failed=outcome, failed_step=1)


def test_success_is_done_whatever_the_attempt() -> None:
    ok = StepsResult(outcomes=[StepOutcome(0, "out", "", 0.1)])
    assert decide(ok, reason="", attempt=9, max_attempts=1, backoff=backoff) == Done()


def test_a_failure_with_attempts_left_is_retried_after_the_backoff() -> None:
    outcome = decide(failed(), reason="x", attempt=2, max_attempts=3, backoff=backoff)
    assert outcome == Retry(20.0)


def test_the_last_attempt_is_dead_with_its_kind() -> None:
    assert decide(failed(), reason="x", attempt=3, max_attempts=3, backoff=backoff) == Dead(
        "x", COMMAND_FAILED
    )
    timed_out = failed(timed_out=True)
    assert decide(timed_out, reason="t", attempt=1, max_attempts=1, backoff=backoff) == Dead(
        "t", TIMEOUT
    )
    merge = failure("merge conflict: a.txt", MERGE_CONFLICT)
    outcome = decide(merge, reason="m", attempt=1, max_attempts=1, backoff=backoff)
    assert outcome == Dead("m", MERGE_CONFLICT)


def test_fail_workflow_is_dead_at_once_and_says_so() -> None:
    result = failed()
    result.fail_workflow = True
    outcome = decide(result, reason="f", attempt=1, max_attempts=5, backoff=backoff)
    assert outcome == Dead("f", COMMAND_FAILED, fail_workflow=True)


@pytest.mark.parametrize("max_attempts", [1, 3])
def test_a_delivery_is_counted_before_it_runs(max_attempts: int) -> None:
    last_allowed = max_attempts + UNVERDICTED_DELIVERIES
    assert before_run(1, max_attempts) is None
    assert before_run(last_allowed, max_attempts) is None
    crashed = before_run(last_allowed + 1, max_attempts)
    assert crashed == Dead(
        f"agent died {last_allowed} times while running this item", AGENT_CRASHED
    )
