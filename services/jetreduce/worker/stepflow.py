"""Running a phase's step list with the step semantics Prodigy documents (research §1.6, "D").

Prodigy's live map/reduce path ignores most step modifiers (⚠L rows: a non-zero exit is ignored,
``max_attempts`` and ``fail_workflow`` are dropped, no variables flow between steps). Users
write workflows against the documentation, so this module executes what the documentation
promises; ``docs/prodigy-compatibility.md`` lists each decision.

For each step, in order:

1. ``when``: a small boolean expression over the variables (`jetreduce.lang.when`, parsed at
   submit); false skips the step (it neither fails nor produces output).
2. The command runs through the caller's ``run_one`` (which knows the process environment,
   working directory and secrets masking); the stepflow only decides *what* runs and *when*.
3. Captures: ``${shell.output}`` / ``${claude.output}`` / ``${last.output}`` /
   ``${last.exit_code}`` always; ``capture`` / ``capture_output: NAME`` store the stdout in the
   ``capture_format`` (string, json, lines, number, boolean) plus the ``capture_streams`` fields
   ``${NAME.exit_code}``, ``${NAME.success}``, ``${NAME.duration}``, ``${NAME.stderr}``.
   Captures happen whether the step failed or not, so handlers can read them.
4. ``on_exit_code``: the step for the exit code, if any. For a failed step, its success means
   the exit code was handled: the step counts as recovered.
5. Success: ``on_success`` runs; its failure fails the step.
6. Failure: ``on_failure`` (any of its five shapes, folded by the parser into `OnFailure`).
   A handler that succeeds means the step is recovered and the list continues, unless
   ``fail_workflow: true``. ``max_attempts`` (or ``max_retries``) > 1 re-runs the *original*
   step after the handler, up to that many runs in all.

Handler steps are full steps (they may have their own ``when``, ``capture``, ``on_failure``…),
nested at most ``MAX_HANDLER_DEPTH`` deep. Everything here reads the typed `Step` the parser
built: nothing is re-parsed per step, so a step cannot fail for a language reason.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from jetreduce.contract.workflow.model import CaptureStreams, OnFailure, Step
from jetreduce.lang import MAX_HANDLER_DEPTH
from jetreduce.lang.interpolate import render_value
from jetreduce.lang.when import NUMBER_TEXT, evaluate_when, parse_when
from jetreduce.worker.steps import StepOutcome

__all__ = ["RunOne", "StepRecord", "StepsResult", "run_steps"]

RunOne = Callable[[Step, dict[str, Any], "float | None"], Awaitable[StepOutcome]]
"""Runs one command: (step, variables, seconds left or None) → its outcome."""

NO_FAILURE_HANDLING = OnFailure()
"""A step without ``on_failure``: no handler, one run."""
DEFAULT_STREAMS = CaptureStreams()
"""Prodigy's ``capture_streams`` defaults."""


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepRecord:
    """One command that actually ran: the list step it belongs to and why it ran."""

    step_index: int
    """1-based position of the list step (handlers share their step's index)."""
    role: str
    """``step``, ``retry``, ``on_failure``, ``on_success`` or ``on_exit_code``."""
    step: Step
    outcome: StepOutcome


@dataclass
class StepsResult:
    outcomes: list[StepOutcome] = field(default_factory=list)
    """The final outcome of each list step that ran (skipped ones and handlers excluded):
    what a phase reports as its output."""
    records: list[StepRecord] = field(default_factory=list)
    """Every command run, handlers and retries included, in order (for failure logs)."""
    failed: StepOutcome | None = None
    """The failing list step's last outcome (its own, not its handler's)."""
    failed_step: int | None = None
    """1-based index of the failing list step."""
    fail_workflow: bool = False
    """The step failed because its ``on_failure`` said ``fail_workflow: true``."""
    reason: str = ""
    """Why the failure is final beyond the step's own result (``on_failure handler failed``…)."""
    skipped: list[int] = field(default_factory=list)
    """1-based indexes of steps whose ``when`` was false."""

    @property
    def ok(self) -> bool:
        return self.failed is None


@dataclass
class _Verdict:
    ok: bool
    outcome: StepOutcome
    fail_workflow: bool = False
    reason: str = ""
    skipped: bool = False


# --- captures --------------------------------------------------------------------------------


def _format_capture(text: str, fmt: str) -> Any:
    """Convert captured stdout; raises ValueError when it is not of that format."""
    if fmt == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"output is not valid JSON ({exc})") from None
    if fmt == "lines":
        return [line for line in text.splitlines() if line.strip()]
    if fmt == "number":
        stripped = text.strip()
        if not NUMBER_TEXT.fullmatch(stripped):
            raise ValueError(f"output {stripped[:40]!r} is not a number")
        number = float(stripped)
        return int(number) if number.is_integer() and "." not in stripped else number
    if fmt == "boolean":
        lower = text.strip().lower()
        if lower in ("true", "yes", "1"):
            return True
        if lower in ("false", "no", "0", ""):
            return False
        raise ValueError(f"output {text.strip()[:40]!r} is not a boolean")
    return text


# --- the flow --------------------------------------------------------------------------------


class _Flow:
    def __init__(
        self,
        variables: dict[str, Any],
        run_one: RunOne,
        deadline: float | None,
        captures: dict[str, str] | None,
    ) -> None:
        self.variables = variables
        self.run_one = run_one
        self.deadline = deadline
        self.captures = captures
        self.records: list[StepRecord] = []

    async def execute(
        self, step: Step, index: int, role: str, cap_s: float | None = None
    ) -> StepOutcome:
        """Run one command within the deadline, record it and capture its output."""
        remaining = None if self.deadline is None else self.deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            outcome = StepOutcome(124, "", "timed out", 0.0, timed_out=True)
        else:
            limit = min((t for t in (remaining, cap_s) if t is not None), default=None)
            outcome = await self.run_one(step, self.variables, limit)
        problem = self.capture(step, outcome)
        if problem and outcome.ok:
            outcome = dataclasses.replace(outcome, exit_code=1, error=problem)
        self.records.append(StepRecord(index, role, step, outcome))
        return outcome

    def capture(self, step: Step, outcome: StepOutcome) -> str:
        """Store the step's output in the variables; returns a capture problem, if any."""
        stdout = outcome.stdout.rstrip("\n")
        v = self.variables
        v[f"{step.kind}.output"] = stdout
        v["last.output"] = stdout
        v["last.exit_code"] = outcome.exit_code
        names = []
        if isinstance(step.capture_output, str) and step.capture_output:
            names.append(step.capture_output)
        if step.capture:
            names.append(step.capture)
        if not names:
            return ""
        streams = step.capture_streams or DEFAULT_STREAMS
        stderr = outcome.stderr.rstrip("\n")
        raw = stdout if streams.stdout else (stderr if streams.stderr else "")
        problem = ""
        value: Any = raw
        try:
            value = _format_capture(raw, step.capture_format)
        except ValueError as exc:
            if outcome.ok:
                problem = f"capture {names[-1]} as {step.capture_format}: {exc}"
        fields: dict[str, Any] = {}
        if streams.exit_code:
            fields["exit_code"] = outcome.exit_code
        if streams.success:
            fields["success"] = outcome.ok
        if streams.duration:
            fields["duration"] = round(outcome.duration_s, 3)
        if streams.stderr:
            fields["stderr"] = stderr
        for name in names:
            v[name] = value
            for key, val in fields.items():
                v[f"{name}.{key}"] = val
            if self.captures is not None:
                self.captures[name] = render_value(value)
                for key, val in fields.items():
                    self.captures[f"{name}.{key}"] = render_value(val)
        return problem

    async def step(self, step: Step, index: int, depth: int = 0) -> _Verdict:
        """One step with all its modifiers; the verdict says whether the list may go on."""
        # `when` was parsed with the workflow (lang.parse): parse_when finds the cached tree.
        if step.when is not None and not evaluate_when(parse_when(step.when), self.variables):
            return _Verdict(True, StepOutcome(0, "", "", 0.0), skipped=True)
        policy = step.on_failure or NO_FAILURE_HANDLING
        on_exit = step.on_exit_code
        attempts = max(1, policy.max_attempts)
        outcome = _error_outcome("not run")
        for attempt in range(1, attempts + 1):
            role = "step" if attempt == 1 else "retry"
            outcome = await self.execute(step, index, role)
            handled = outcome.exit_code in on_exit and not outcome.timed_out and not outcome.error
            if handled:
                verdict = await self.handler(
                    on_exit[outcome.exit_code], index, depth, "on_exit_code"
                )
                if not verdict.ok:
                    return _Verdict(
                        False,
                        outcome,
                        verdict.fail_workflow,
                        f"on_exit_code handler for exit code {outcome.exit_code} failed",
                    )
                if not outcome.ok:
                    return _Verdict(True, outcome)  # the exit code was handled: recovered
            if outcome.ok:
                if step.on_success is not None:
                    verdict = await self.handler(step.on_success, index, depth, "on_success")
                    if not verdict.ok:
                        return _Verdict(
                            False, outcome, verdict.fail_workflow, "on_success handler failed"
                        )
                return _Verdict(True, outcome)
            if policy.ignore:
                return _Verdict(True, outcome)
            handler_ok = await self.handlers(policy, index, depth)
            if attempt < attempts:
                continue  # retry the original step
            if not policy.handlers:
                return _Verdict(False, outcome, reason="" if attempts == 1 else _tries(attempts))
            if not handler_ok:
                return _Verdict(False, outcome, policy.fail_workflow, "on_failure handler failed")
            if policy.fail_workflow:
                return _Verdict(
                    False, outcome, True, "on_failure handler ran; fail_workflow is set"
                )
            return _Verdict(True, outcome)  # the handler recovered the step
        return _Verdict(False, outcome)

    async def handlers(self, policy: OnFailure, index: int, depth: int) -> bool:
        """``on_failure``'s handlers in order; False if one failed that may not."""
        ok = True
        for step, keep_going in zip(policy.handlers, policy.continue_on_error, strict=True):
            verdict = await self.handler(step, index, depth, "on_failure", policy.timeout_s)
            if not verdict.ok and not keep_going:
                return False
            ok = ok and (verdict.ok or keep_going)
        return ok

    async def handler(
        self, step: Step, index: int, depth: int, role: str, cap_s: float | None = None
    ) -> _Verdict:
        """A handler step of a step at ``depth``: the same semantics as any step, its
        commands capped at ``cap_s`` and recorded under ``role`` (``on_failure``,
        ``on_success``, ``on_exit_code``)."""
        if depth + 1 > MAX_HANDLER_DEPTH:  # the parser refuses deeper nesting
            return _Verdict(False, _error_outcome("handlers nested too deeply"))
        if cap_s is not None and (step.timeout_s is None or step.timeout_s > cap_s):
            step = msgspec.structs.replace(step, timeout_s=cap_s)
        start = len(self.records)
        verdict = await self.step(step, index, depth + 1)
        for i in range(start, len(self.records)):
            rec = self.records[i]
            if rec.role in ("step", "retry") and rec.step is step:
                self.records[i] = dataclasses.replace(rec, role=role)
        return verdict


def _tries(attempts: int) -> str:
    return f"failed {attempts} times"


def _error_outcome(message: str) -> StepOutcome:
    return StepOutcome(1, "", message, 0.0, error=message)


async def run_steps(
    steps: list[Step],
    variables: dict[str, Any],
    *,
    run_one: RunOne,
    deadline: float | None,
    captures: dict[str, str] | None = None,
) -> StepsResult:
    """Run ``steps`` in order with their modifiers; stop at the first step that stays failed.

    ``variables`` is updated in place (captures flow to later steps and back to the caller);
    ``captures`` (setup) collects the named captures as rendered text. ``deadline`` is a
    ``time.monotonic()`` instant bounding every command, handlers included.
    """
    flow = _Flow(variables, run_one, deadline, captures)
    result = StepsResult(records=flow.records)
    for index, step in enumerate(steps, 1):
        verdict = await flow.step(step, index)
        if verdict.skipped:
            result.skipped.append(index)
            continue
        result.outcomes.append(verdict.outcome)
        if not verdict.ok:
            result.failed = verdict.outcome
            result.failed_step = index
            result.fail_workflow = verdict.fail_workflow
            result.reason = verdict.reason
            break
    return result
