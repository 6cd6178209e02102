"""What an item's attempt came to, as a value: `Done`, `Retry` (after a delay) or `Dead` (with
a reason and Prodigy's error kind), decided apart from the events and acks that record it
(kopf's TemporaryError/PermanentError, dramatiq's and arq's Retry).

Attempts are counted before they run (arq's ``job_try``): `before_run` turns a delivery past
``max_attempts`` + `UNVERDICTED_DELIVERIES` into `Dead` (``AgentCrashed``) without running the
item again, so an item whose agents keep dying on it is dead-lettered on every queue backend,
not only on JetStream (whose ``max_deliver`` stops at the same count and whose advisory the
janitor turns into the same verdict).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from jetreduce.queues.base import UNVERDICTED_DELIVERIES
from jetreduce.worker.stepflow import StepsResult
from jetreduce.worker.steps import StepOutcome

__all__ = [
    "AGENT_CRASHED",
    "COMMAND_FAILED",
    "COMMIT_VALIDATION_FAILED",
    "ERROR_TAIL",
    "EVENT_TEXT_LIMIT",
    "MERGE_CONFLICT",
    "TIMEOUT",
    "WORKTREE_ERROR",
    "Dead",
    "Done",
    "Outcome",
    "Retry",
    "before_run",
    "clip",
    "decide",
    "error_tail",
    "failure",
    "failure_kind",
]

ERROR_TAIL: Final = 2048
"""Bytes of a failed step's output an event carries."""
EVENT_TEXT_LIMIT: Final = 64 * 1024
"""Longest text (an output) an event carries whole; longer ones keep their tail."""
STDOUT_LABEL: Final = "stdout (stderr was empty):\n"

# Prodigy's DLQ error kinds (research §3.2), as ItemDead.error_type carries them.
TIMEOUT: Final = "Timeout"
COMMAND_FAILED: Final = "CommandFailed"
COMMIT_VALIDATION_FAILED: Final = "CommitValidationFailed"
MERGE_CONFLICT: Final = "MergeConflict"
WORKTREE_ERROR: Final = "WorktreeError"
AGENT_CRASHED: Final = "AgentCrashed"
UNKNOWN: Final = "Unknown"


@dataclass(frozen=True)
class Done:
    """The item's steps succeeded: record ``item.done`` and ack."""


@dataclass(frozen=True)
class Retry:
    """The attempt failed and another is allowed: redeliver after ``delay_s`` seconds."""

    delay_s: float


@dataclass(frozen=True)
class Dead:
    """No attempt is left (or the failure is declared fatal): ``item.dead`` and the DLQ."""

    reason: str
    kind: str
    """Prodigy's error kind (``Timeout``, ``CommandFailed``…, ``AgentCrashed``)."""
    fail_workflow: bool = False
    """An ``on_failure`` with ``fail_workflow: true`` said so: the map fails too."""


Outcome = Done | Retry | Dead


def error_tail(outcome: StepOutcome, limit: int = ERROR_TAIL) -> str:
    """The last ``limit`` characters of a failed step's stderr; if it wrote none, of its
    stdout, labelled so that no one reads it as the step's errors."""
    if outcome.stderr.strip():
        return clip(str(outcome.stderr)[-limit:], limit)
    if outcome.stdout.strip():
        return STDOUT_LABEL + clip(str(outcome.stdout)[-limit:], limit)
    return ""


def clip(text: str, limit: int = EVENT_TEXT_LIMIT) -> str:
    """``text`` if it fits in ``limit`` bytes, else its tail, marked as truncated."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return "[... truncated ...]\n" + data[-limit:].decode("utf-8", errors="ignore")


def failure(message: str, kind: str = COMMAND_FAILED) -> StepsResult:
    """A failed result for a problem outside the steps (no step index): the workspace, a
    merge, the environment, unreadable item data."""
    return StepsResult(failed=StepOutcome(1, "", message, 0.0, error=message, kind=kind))


def failure_kind(result: StepsResult) -> str:
    failed = result.failed
    if failed is None:
        return UNKNOWN
    if failed.timed_out:
        return TIMEOUT
    return failed.kind or COMMAND_FAILED


def before_run(attempt: int, max_attempts: int) -> Dead | None:
    """`Dead` for a delivery that must not run: every attempt it was allowed, and the
    deliveries allowed for agents that die or hand items back, have passed without a
    verdict (each one would have recorded a result or a retry)."""
    if attempt <= max_attempts + UNVERDICTED_DELIVERIES:
        return None
    ran = attempt - 1
    return Dead(f"agent died {ran} times while running this item", AGENT_CRASHED)


def decide(
    result: StepsResult,
    *,
    reason: str,
    attempt: int,
    max_attempts: int,
    backoff: Callable[[int], float],
) -> Outcome:
    """The attempt's outcome. ``reason`` describes the failure (ignored on success);
    ``backoff(attempt)`` is the delay before the next attempt."""
    if result.ok:
        return Done()
    # fail_workflow: the author declared this failure fatal, so no item retries either.
    if attempt >= max_attempts or result.fail_workflow:
        return Dead(reason, failure_kind(result), fail_workflow=result.fail_workflow)
    return Retry(backoff(attempt))
