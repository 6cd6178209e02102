"""``retry_config.backoff``: every kind Prodigy documents gives its own delays (issue 16: all
of them used to run as exponential x2)."""

from __future__ import annotations

import pytest

from jetreduce.contract.workflow import RetryConfig
from jetreduce.lang import parse_workflow

pytestmark = pytest.mark.unit


def retry_of(backoff: str, max_delay: str = "") -> RetryConfig:
    text = (
        "name: t\nmap:\n  input: x.json\n  agent_template:\n    - shell: echo\n"
        f"error_policy:\n  retry_config:\n    max_attempts: 9\n    backoff: {backoff}\n"
        + (f"    max_delay: {max_delay}\n" if max_delay else "")
    )
    return parse_workflow(text).workflow.error_policy.retry


@pytest.mark.parametrize(
    ("backoff", "delays"),
    [
        ("{fixed: {delay: 2s}}", [2, 2, 2, 2, 2]),
        ("{linear: {initial: 1s, increment: 3s}}", [1, 4, 7, 10, 13]),
        ("{exponential: {initial: 0.5s, multiplier: 3}}", [0.5, 1.5, 4.5, 13.5, 40.5]),
        ("{fibonacci: {initial: 2s}}", [2, 2, 4, 6, 10]),
        ("{fibonacci: {initial: {secs: 1, nanos: 0}}}", [1, 1, 2, 3, 5]),
    ],
)
def test_each_backoff_kind_gives_its_delays(backoff: str, delays: list[float]) -> None:
    retry = retry_of(backoff)
    assert [retry.delay(n) for n in range(1, 6)] == pytest.approx(delays)


@pytest.mark.parametrize(
    "backoff",
    [
        "{fixed: {delay: 90s}}",
        "{linear: {initial: 1s, increment: 30s}}",
        "{exponential: {initial: 1s, multiplier: 10}}",
        "{fibonacci: {initial: 10s}}",
    ],
)
def test_every_kind_is_capped_by_max_delay(backoff: str) -> None:
    retry = retry_of(backoff, max_delay="45s")
    assert all(retry.delay(n) <= 45.0 for n in range(1, 12))
    assert retry.delay(11) == 45.0


def test_the_default_is_exponential_from_one_second_doubling() -> None:
    retry = RetryConfig()
    assert [retry.delay(n) for n in range(1, 5)] == [1.0, 2.0, 4.0, 8.0]
    assert retry.delay(0) == 1.0  # no attempt before the first: treated as the first


def test_a_huge_attempt_number_neither_overflows_nor_loops_for_long() -> None:
    for kind in ("exponential", "fibonacci", "linear"):
        retry = RetryConfig(backoff=kind, multiplier=2.0, increment_s=1.0, max_delay_s=60.0)
        assert retry.delay(10**6) == 60.0
