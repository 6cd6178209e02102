"""Running a phase's step list with the step semantics Prodigy documents (research §1.6, "D").

Prodigy's live map/reduce path ignores most step modifiers (⚠L rows: a non-zero exit is ignored,
``max_attempts`` and ``fail_workflow`` are dropped, no variables flow between steps). Users
write workflows against the documentation, so this module executes what the documentation
promises; ``docs/prodigy-compatibility.md`` lists each decision.

For each step, in order:

1. ``when``: a small boolean expression over the variables (:func:`evaluate_when`); false skips
   the step (it neither fails nor produces output).
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
6. Failure: ``on_failure`` in any of its five shapes (:func:`parse_on_failure`). A handler that
   succeeds means the step is recovered and the list continues, unless ``fail_workflow: true``.
   ``max_attempts`` (or ``max_retries``) > 1 re-runs the *original* step after the handler,
   up to that many runs in all.

Handler steps are full steps (they may have their own ``when``, ``capture``, ``on_failure``…),
nested at most :data:`MAX_HANDLER_DEPTH` deep.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from jetreduce.contract.workflow.durations import parse_duration
from jetreduce.contract.workflow.model import Step, WriteFile
from jetreduce.lang.interpolate import Variables, render_value
from jetreduce.worker.steps import StepOutcome

__all__ = [
    "MAX_HANDLER_DEPTH",
    "FailurePolicy",
    "RunOne",
    "StepRecord",
    "StepsResult",
    "WhenError",
    "evaluate_when",
    "parse_on_failure",
    "run_steps",
    "step_from_plain",
]

RunOne = Callable[[Step, dict[str, Any], "float | None"], Awaitable[StepOutcome]]
"""Runs one command: (step, variables, seconds left or None) → its outcome."""

MAX_HANDLER_DEPTH: Final = 8
"""Handlers may have handlers; deeper than this is refused (a workflow is finite, but a
generated one could still nest absurdly)."""

DEFAULT_STREAMS: Final[Mapping[str, bool]] = {
    "stdout": True,
    "stderr": False,
    "exit_code": True,
    "success": True,
    "duration": True,
}
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


# --- on_failure ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FailurePolicy:
    """``on_failure`` folded from any of its five shapes."""

    handlers: tuple[Step, ...] = ()
    continue_on_error: tuple[bool, ...] = ()
    """Per handler (``commands`` shape): a failing handler does not stop the others."""
    ignore: bool = False
    """``on_failure: true``: the failure is ignored."""
    fail_workflow: bool = False
    max_attempts: int = 1
    """Runs of the original step in all (1: no retry)."""
    timeout_s: float | None = None
    """Cap on each handler command (``commands`` shape ``timeout``)."""

    @property
    def active(self) -> bool:
        return self.ignore or bool(self.handlers) or self.max_attempts > 1


def _command_step(text: str) -> Step:
    """Prodigy's string handler: a ``/slash-command`` is claude, anything else shell."""
    text = text.strip()
    return Step(claude=text) if text.startswith("/") else Step(shell=text)


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"on_failure.{key}: expected a whole number, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"on_failure.{key}: expected a whole number, got {value!r}") from None
    return max(1, number)


def parse_on_failure(value: Any) -> FailurePolicy:
    """Fold ``on_failure`` (as the parser kept it: plain YAML values) into a policy.

    Shapes, tried in Prodigy's order: a bool; a command string; a list of command strings;
    ``{commands: [...], fail_workflow, handler_failure_fatal, strategy, timeout, capture}``;
    any other mapping is ``{shell|claude, fail_workflow, max_attempts|max_retries,
    retry_original}``. Raises ValueError for a shape none of these accept.
    """
    if value is None or value is False:
        return FailurePolicy()
    if value is True:
        return FailurePolicy(ignore=True)
    if isinstance(value, str):
        return FailurePolicy(handlers=(_command_step(value),), continue_on_error=(False,))
    if isinstance(value, list):
        steps = []
        for entry in value:
            if not isinstance(entry, str):
                raise ValueError(f"on_failure list entries must be strings, got {entry!r}")
            steps.append(_command_step(entry))
        return FailurePolicy(handlers=tuple(steps), continue_on_error=(False,) * len(steps))
    if not isinstance(value, Mapping):
        raise ValueError(f"on_failure: unsupported value {value!r}")
    fail_workflow = bool(value.get("fail_workflow", False))
    if "commands" in value:
        commands = value["commands"] or []
        if not isinstance(commands, list):
            raise ValueError("on_failure.commands must be a list of steps")
        handlers: list[Step] = []
        flags: list[bool] = []
        for entry in commands:
            if isinstance(entry, str):
                handlers.append(_command_step(entry))
                flags.append(False)
                continue
            if not isinstance(entry, Mapping):
                raise ValueError(f"on_failure.commands entries must be steps, got {entry!r}")
            body = {k: v for k, v in entry.items() if k != "continue_on_error"}
            handlers.append(step_from_plain(body))
            flags.append(bool(entry.get("continue_on_error", False)))
        timeout = value.get("timeout")
        return FailurePolicy(
            handlers=tuple(handlers),
            continue_on_error=tuple(flags),
            fail_workflow=fail_workflow,
            timeout_s=_seconds(timeout, "on_failure.timeout") if timeout is not None else None,
        )
    attempts = 1
    for key in ("max_attempts", "max_retries"):
        if value.get(key) is not None:
            attempts = max(attempts, _positive_int(value[key], key))
    if value.get("retry_original") and attempts == 1:
        attempts = 2  # deprecated flag: "retry the original once"
    handler_keys = {k: value[k] for k in ("shell", "claude") if value.get(k) is not None}
    if len(handler_keys) > 1:
        raise ValueError("on_failure: give shell or claude, not both")
    handlers_t: tuple[Step, ...] = ()
    if handler_keys:
        extra = {
            k: v
            for k, v in value.items()
            if k
            not in {
                "shell",
                "claude",
                "fail_workflow",
                "max_attempts",
                "max_retries",
                "retry_original",
            }
        }
        handlers_t = (step_from_plain({**extra, **handler_keys}),)
    return FailurePolicy(
        handlers=handlers_t,
        continue_on_error=(False,) * len(handlers_t),
        fail_workflow=fail_workflow,
        max_attempts=attempts,
    )


def _seconds(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected seconds, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, Mapping) and "secs" in value:
        return float(value["secs"]) + float(value.get("nanos", 0)) / 1e9
    if isinstance(value, str):
        return parse_duration(value)
    raise ValueError(f"{where}: expected seconds, got {value!r}")


_STEP_KEYS: Final = (
    "shell",
    "claude",
    "write_file",
    "name",
    "timeout",
    "capture_output",
    "capture",
    "capture_format",
    "working_dir",
    "env",
)


def step_from_plain(value: Any) -> Step:
    """A handler step (``on_success``, ``on_exit_code``, ``on_failure.commands``) from the
    plain YAML values the parser kept; modifiers beyond the model's fields go to ``extra``
    like the parser's own steps. Raises ValueError when it is not exactly one command."""
    if isinstance(value, str):
        return _command_step(value)
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a step mapping, got {value!r}")
    kinds = [k for k in ("shell", "claude", "write_file") if value.get(k) is not None]
    if len(kinds) != 1:
        raise ValueError(
            f"a handler step needs exactly one of shell, claude, write_file (got {kinds or 'none'})"
        )
    write_file = None
    if "write_file" in kinds:
        wf = value["write_file"]
        if not isinstance(wf, Mapping) or "path" not in wf:
            raise ValueError("write_file needs a mapping with path and content")
        write_file = WriteFile(
            path=str(wf["path"]),
            content=str(wf.get("content", "")),
            format=str(wf.get("format", "text")),
            mode=str(wf.get("mode", "0644")),
            create_dirs=bool(wf.get("create_dirs", False)),
        )
    capture_output = value.get("capture_output", False)
    env = value.get("env") or {}
    if not isinstance(env, Mapping):
        raise ValueError("a handler step's env must be a mapping")
    return Step(
        shell=str(value["shell"]) if "shell" in kinds else None,
        claude=str(value["claude"]) if "claude" in kinds else None,
        write_file=write_file,
        name=str(value["name"]) if value.get("name") is not None else None,
        timeout_s=_seconds(value["timeout"], "timeout")
        if value.get("timeout") is not None
        else None,
        capture_output=capture_output if isinstance(capture_output, bool | str) else False,
        capture=str(value["capture"]) if value.get("capture") else None,
        capture_format=str(value.get("capture_format") or "string"),
        working_dir=str(value["working_dir"]) if value.get("working_dir") else None,
        env={str(k): render_value(v) for k, v in env.items()},
        extra={k: v for k, v in value.items() if k not in _STEP_KEYS},
    )


def _exit_code_handlers(value: Any) -> dict[int, Any]:
    if not value:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError("on_exit_code must map exit codes to steps")
    handlers: dict[int, Any] = {}
    for code, step in value.items():
        try:
            handlers[int(code)] = step
        except (TypeError, ValueError):
            raise ValueError(f"on_exit_code: {code!r} is not an exit code") from None
    return handlers


# --- when ------------------------------------------------------------------------------------


class WhenError(ValueError):
    """A ``when`` expression that does not parse."""


_TOKEN: Final = re.compile(
    r"""\s*(?:
        (?P<ref>\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*|\$[0-9])
      | (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
      | (?P<op>&&|\|\||==|!=|>=|<=|=|>|<|!|\(|\))
      | (?P<word>[^\s()!=<>&|'"$]+)
    )""",
    re.VERBOSE,
)
_NUMBER_TEXT: Final = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_KEYWORDS: Final = {"and": "&&", "or": "||", "not": "!"}
_MISSING: Final = object()


class _WhenParser:
    """Recursive descent over ``or := and (|| and)*``, ``and := not (&& not)*``,
    ``not := ! not | cmp``, ``cmp := atom (op atom)?``, ``atom := ( or ) | literal | ref``.
    Values are Python JSON values; nothing is ever evaluated as code."""

    def __init__(self, text: str, variables: Variables) -> None:
        self.text = text
        self.variables = variables
        self.tokens: list[tuple[str, Any]] = []
        pos = 0
        while pos < len(text):
            if not text[pos:].strip():
                break
            m = _TOKEN.match(text, pos)
            if m is None or m.end() == pos:
                raise WhenError(f"unexpected {text[pos:].strip()[:20]!r} in when: {text!r}")
            pos = m.end()
            kind = m.lastgroup
            raw = m.group(kind or "word")
            if kind == "ref":
                self.tokens.append(("val", self._resolve(raw)))
            elif kind == "str":
                self.tokens.append(("val", _unquote(raw)))
            elif kind == "op":
                self.tokens.append(("op", "==" if raw == "=" else raw))
            else:
                self.tokens.append(self._word(raw))
        self.pos = 0

    def _resolve(self, raw: str) -> Any:
        if raw.startswith("${"):
            path, sep, default = raw[2:-1].partition(":-")
        else:
            path, sep, default = raw[1:], "", ""
        try:
            return self.variables.resolve(path.strip())
        except KeyError:
            return default if sep else None  # an undefined variable is null (false)

    @staticmethod
    def _word(raw: str) -> tuple[str, Any]:
        lower = raw.lower()
        if lower in _KEYWORDS:
            return ("op", _KEYWORDS[lower])
        if lower in ("true", "false"):
            return ("val", lower == "true")
        if lower == "null":
            return ("val", None)
        if _NUMBER_TEXT.fullmatch(raw):
            return ("val", float(raw) if any(c in raw for c in ".eE") else int(raw))
        return ("val", raw)  # a bare word is a string, as in Prodigy's filter grammar

    def peek(self) -> tuple[str, Any] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take_op(self, *ops: str) -> str | None:
        token = self.peek()
        if token is not None and token[0] == "op" and token[1] in ops:
            self.pos += 1
            return str(token[1])
        return None

    def parse(self) -> bool:
        if not self.tokens:
            raise WhenError("empty when expression")
        value = self.or_()
        if self.peek() is not None:
            raise WhenError(f"unexpected {self.peek()!r} in when: {self.text!r}")
        return _truthy(value)

    def or_(self) -> Any:
        value = self.and_()
        while self.take_op("||"):
            right = self.and_()
            value = _truthy(value) or _truthy(right)
        return value

    def and_(self) -> Any:
        value = self.not_()
        while self.take_op("&&"):
            right = self.not_()
            value = _truthy(value) and _truthy(right)
        return value

    def not_(self) -> Any:
        if self.take_op("!"):
            return not _truthy(self.not_())
        return self.cmp()

    def cmp(self) -> Any:
        left = self.atom()
        op = self.take_op("==", "!=", ">", "<", ">=", "<=")
        if op is None:
            return left
        return _compare(left, op, self.atom())

    def atom(self) -> Any:
        if self.take_op("("):
            value = self.or_()
            if not self.take_op(")"):
                raise WhenError(f"missing ')' in when: {self.text!r}")
            return value
        token = self.peek()
        if token is None or token[0] != "val":
            found = "end of expression" if token is None else repr(token[1])
            raise WhenError(f"expected a value, found {found} in when: {self.text!r}")
        self.pos += 1
        return token[1]


def _unquote(raw: str) -> str:
    body = raw[1:-1]
    return re.sub(r"\\(.)", r"\1", body)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and _NUMBER_TEXT.fullmatch(value.strip()):
        return float(value)
    return None


def _truthy(value: Any) -> bool:
    """Truthiness of a variable as a shell user expects it: ``false``, ``0``, ``no``, ``off``,
    empty and null are false; numbers are true unless zero; other strings are true."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0 and not (isinstance(value, float) and math.isnan(value))
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "false", "no", "off", "null"):
            return False
        number = _number(text)
        return number != 0 if number is not None else True
    return bool(value)


def _compare(left: Any, op: str, right: Any) -> bool:
    """Numbers compare as numbers (a captured ``"80"`` equals ``80``), anything else as its
    rendered text (``true`` equals ``"true"``); null equals only null, and orders nothing."""
    ln, rn = _number(left), _number(right)
    if op in ("==", "!="):
        if left is None or right is None:
            equal = left is None and right is None
        elif ln is not None and rn is not None:
            equal = ln == rn
        else:
            equal = render_value(left) == render_value(right)
        return equal if op == "==" else not equal
    if left is None or right is None:
        return False
    a: Any
    b: Any
    if ln is not None and rn is not None:
        a, b = ln, rn
    else:
        a, b = render_value(left), render_value(right)
    if op == ">":
        return bool(a > b)
    if op == "<":
        return bool(a < b)
    if op == ">=":
        return bool(a >= b)
    return bool(a <= b)


def evaluate_when(expression: str, variables: Mapping[str, Any] | Variables) -> bool:
    """Evaluate a ``when`` condition. Raises :class:`WhenError` if it does not parse.

    Forms: ``${flag}`` (truthiness), comparisons ``== = != > < >= <=``, ``&&``/``and``,
    ``||``/``or``, ``!``/``not``, parentheses; literals are quoted strings, numbers, ``true``,
    ``false``, ``null`` and bare words (strings). References are resolved to values, never
    pasted into the text, so a value cannot change the expression's structure.
    """
    scope = variables if isinstance(variables, Variables) else Variables(variables)
    return _WhenParser(expression, scope).parse()


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
        if not _NUMBER_TEXT.fullmatch(stripped):
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
        streams = dict(DEFAULT_STREAMS)
        given = step.extra.get("capture_streams")
        if isinstance(given, Mapping):
            streams.update({str(k): bool(val) for k, val in given.items()})
        stderr = outcome.stderr.rstrip("\n")
        raw = stdout if streams["stdout"] else (stderr if streams["stderr"] else "")
        problem = ""
        value: Any = raw
        try:
            value = _format_capture(raw, step.capture_format)
        except ValueError as exc:
            if outcome.ok:
                problem = f"capture {names[-1]} as {step.capture_format}: {exc}"
        fields: dict[str, Any] = {}
        if streams["exit_code"]:
            fields["exit_code"] = outcome.exit_code
        if streams["success"]:
            fields["success"] = outcome.ok
        if streams["duration"]:
            fields["duration"] = round(outcome.duration_s, 3)
        if streams["stderr"]:
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
        when = step.extra.get("when")
        if when is not None and str(when).strip():
            try:
                run = evaluate_when(str(when), self.variables)
            except WhenError as exc:
                return _Verdict(False, _error_outcome(str(exc)), reason=str(exc))
            if not run:
                return _Verdict(True, StepOutcome(0, "", "", 0.0), skipped=True)
        try:
            policy = parse_on_failure(step.extra.get("on_failure"))
            on_exit = _exit_code_handlers(step.extra.get("on_exit_code"))
        except ValueError as exc:
            return _Verdict(False, _error_outcome(str(exc)), reason=str(exc))
        attempts = max(1, policy.max_attempts)
        outcome = _error_outcome("not run")
        for attempt in range(1, attempts + 1):
            role = "step" if attempt == 1 else "retry"
            outcome = await self.execute(step, index, role)
            handled = outcome.exit_code in on_exit and not outcome.timed_out and not outcome.error
            if handled:
                verdict = await self.nested(
                    on_exit[outcome.exit_code], index, "on_exit_code", depth
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
                if step.extra.get("on_success") is not None:
                    verdict = await self.nested(
                        step.extra["on_success"], index, "on_success", depth
                    )
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

    async def handlers(self, policy: FailurePolicy, index: int, depth: int) -> bool:
        ok = True
        for handler, keep_going in zip(policy.handlers, policy.continue_on_error, strict=True):
            if depth + 1 > MAX_HANDLER_DEPTH:
                return False
            verdict = await self.step_capped(handler, index, depth + 1, policy.timeout_s)
            if not verdict.ok and not keep_going:
                return False
            ok = ok and (verdict.ok or keep_going)
        return ok

    async def step_capped(
        self, step: Step, index: int, depth: int, cap_s: float | None
    ) -> _Verdict:
        if cap_s is not None and (step.timeout_s is None or step.timeout_s > cap_s):
            step = dataclasses.replace(step, timeout_s=cap_s)
        return await self.step_as(step, index, depth, "on_failure")

    async def step_as(self, step: Step, index: int, depth: int, role: str) -> _Verdict:
        """A handler step: the same semantics, with its records labelled by ``role``."""
        start = len(self.records)
        verdict = await self.step(step, index, depth)
        for i in range(start, len(self.records)):
            rec = self.records[i]
            if rec.role in ("step", "retry") and rec.step is step:
                self.records[i] = dataclasses.replace(rec, role=role)
        return verdict

    async def nested(self, value: Any, index: int, role: str, depth: int) -> _Verdict:
        if depth + 1 > MAX_HANDLER_DEPTH:
            return _Verdict(False, _error_outcome("handlers nested too deeply"))
        try:
            step = step_from_plain(value)
        except ValueError as exc:
            return _Verdict(False, _error_outcome(f"invalid {role} step: {exc}"))
        return await self.step_as(step, index, depth + 1, role)


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
