"""The circuit breaker's state machine, on a controlled clock."""

from __future__ import annotations

from jetreduce.lang import parse_workflow
from jetreduce.worker.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_pauses_probes_and_closes() -> None:
    clock = Clock()
    b = CircuitBreaker(
        failure_threshold=3, success_threshold=2, timeout_s=30, half_open_requests=2, clock=clock
    )
    assert b.allowance(5) == 5
    assert [b.record(False) for _ in range(3)] == [None, None, "open"]
    assert b.allowance(5) == 0
    clock.now = 29.9
    assert b.allowance(5) == 0
    clock.now = 30.0
    assert b.allowance(5) == 2 and b.state == "half_open"
    b.started(2)
    assert b.allowance(5) == 0  # probes used up until they report back
    assert b.record(True) is None
    assert b.record(True) == "closed"
    assert b.allowance(5) == 5


def test_a_failed_probe_reopens_and_success_resets_the_count() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=2, timeout_s=5, clock=clock)
    b.record(False)
    b.record(True)  # not consecutive any more
    assert b.record(False) is None
    assert b.record(False) == "open"
    clock.now = 5
    b.allowance(1)
    assert b.record(False) == "open"
    assert b.allowance(1) == 0


def breaker_of(config: str) -> CircuitBreaker | None:
    """The breaker of a workflow whose ``error_policy.circuit_breaker`` is ``config``: the
    durations are read once, by the parser (one duration rule for the whole language)."""
    text = (
        "name: t\nmap:\n  input: x\n  agent_template: []\n"
        f"error_policy:\n  circuit_breaker: {config}\n"
    )
    return CircuitBreaker.from_config(parse_workflow(text).workflow.error_policy.circuit_breaker)


def test_config_accepts_prodigy_durations() -> None:
    b = breaker_of("{failure_threshold: 4, timeout: 2s}")
    assert b is not None and (b.failure_threshold, b.timeout_s) == (4, 2.0)
    b = breaker_of("{timeout: {secs: 1, nanos: 500000000}}")
    assert b is not None and b.timeout_s == 1.5
    b = breaker_of("{}")
    assert b is not None and (b.failure_threshold, b.success_threshold) == (5, 3)
    assert (b.timeout_s, b.half_open_requests) == (30.0, 3)
    assert CircuitBreaker.from_config(None) is None
