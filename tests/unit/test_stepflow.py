"""Step modifiers as Prodigy documents them (when, captures, on_failure in its five shapes,
on_success, on_exit_code), run through real ``sh`` steps."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from jetreduce.contract.workflow import WorkflowInvalid
from jetreduce.contract.workflow.model import OnFailure, Step
from jetreduce.lang import parse_workflow
from jetreduce.lang.interpolate import Variables
from jetreduce.lang.when import WhenError, evaluate_when
from jetreduce.worker.stepflow import StepsResult, run_steps
from jetreduce.worker.steps import StepOutcome, base_env, run_step

pytestmark = pytest.mark.anyio


def steps_of(yaml_steps: str) -> list[Step]:
    """Steps parsed by the real parser (so ``extra`` has the parser's shapes)."""
    indented = "\n".join("    " + line for line in yaml_steps.strip("\n").splitlines())
    text = f"name: t\nmode: mapreduce\nmap:\n  input: x.json\n  agent_template:\n{indented}\n"
    return parse_workflow(text).workflow.map.agent_template


async def run(
    tmp_path: Path,
    yaml_steps: str,
    variables: dict[str, Any] | None = None,
    *,
    deadline: float | None = None,
    captures: dict[str, str] | None = None,
) -> tuple[StepsResult, dict[str, Any]]:
    scope = dict(variables or {})

    async def run_one(step: Step, v: dict[str, Any], timeout_s: float | None) -> StepOutcome:
        return await run_step(
            step,
            Variables(v),
            env=base_env(),
            cwd=str(tmp_path),
            timeout_s=timeout_s,
            spill_dir=tmp_path,
        )

    result = await run_steps(
        steps_of(yaml_steps), scope, run_one=run_one, deadline=deadline, captures=captures
    )
    return result, scope


def log(tmp_path: Path) -> list[str]:
    path = tmp_path / "log"
    return path.read_text().split() if path.exists() else []


# --- when ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "scope", "expected"),
    [
        ("${flag}", {"flag": True}, True),
        ("${flag}", {"flag": "false"}, False),
        ("${flag}", {}, False),
        ("!${flag}", {"flag": "0"}, True),
        ("${n} >= 80", {"n": "81"}, True),
        ("${n} > 100 || ${ok}", {"n": 5, "ok": "yes"}, True),
        ("${n} > 1 && ${ok}", {"n": 5, "ok": ""}, False),
        ("${item.priority} == 'high'", {"item": {"priority": "high"}}, True),
        ("${item.priority} == high", {"item": {"priority": "low"}}, False),
        ('${item.priority} != "high"', {"item": {"priority": "low"}}, True),
        ("(${a} == 1 or ${b} == 2) and not ${c}", {"a": 0, "b": 2, "c": False}, True),
        ("${build.success} && ${coverage} >= 80", {"build.success": True, "coverage": 85}, True),
        ("${x:-fallback} == fallback", {}, True),
        ("${missing} == null", {}, True),
        ("true", {}, True),
        ("${s} = 'a b'", {"s": "a b"}, True),
        ("${v} < 'b'", {"v": "a"}, True),
    ],
)
def test_when_expressions(expr: str, scope: dict[str, Any], expected: bool) -> None:
    assert evaluate_when(expr, scope) is expected


@pytest.mark.parametrize("expr", ["", "${a} ==", "(${a}", "${a} ) 1", "${a} === 1"])
def test_when_syntax_errors(expr: str) -> None:
    with pytest.raises(WhenError):
        evaluate_when(expr, {"a": 1})


def test_when_values_cannot_inject_operators() -> None:
    assert evaluate_when("${v}", {"v": "0 || true"}) is True  # one string, not an expression
    assert evaluate_when("${v} == 'x'", {"v": "x' || 'y"}) is False


async def test_when_false_skips_the_step(tmp_path: Path) -> None:
    result, _ = await run(
        tmp_path,
        """
- shell: echo a >> log
  when: "${go} == yes"
- shell: echo b >> log
  when: "${go} == no"
""",
        {"go": "no"},
    )
    assert result.ok and result.skipped == [1]
    assert log(tmp_path) == ["b"]


async def test_when_sees_previous_captures(tmp_path: Path) -> None:
    result, _ = await run(
        tmp_path,
        """
- shell: echo 42
  capture: answer
  capture_format: number
- shell: echo big >> log
  when: "${answer} > 40 && ${answer.success}"
""",
    )
    assert result.ok and log(tmp_path) == ["big"]


def test_a_bad_when_never_reaches_a_step() -> None:
    """Refused by the parser (at validate and submit), not failed at run time."""
    with pytest.raises(WorkflowInvalid, match="invalid when expression"):
        steps_of('- shell: "true"\n  when: "${a} =="')


# --- captures --------------------------------------------------------------------------------


async def test_capture_formats(tmp_path: Path) -> None:
    result, v = await run(
        tmp_path,
        """
- shell: printf 'hello\\n'
  capture: s
- shell: >-
    echo '{"a": {"b": [1, 2]}}'
  capture: j
  capture_format: json
- shell: printf 'x\\ny\\n\\nz\\n'
  capture: l
  capture_format: lines
- shell: echo 3.5
  capture: n
  capture_format: number
- shell: echo true
  capture: b
  capture_format: boolean
- shell: echo "${j.a.b[1]} ${l} ${n}" > out
""",
    )
    assert result.ok, result
    assert v["s"] == "hello" and v["j"] == {"a": {"b": [1, 2]}}
    assert v["l"] == ["x", "y", "z"] and v["n"] == 3.5 and v["b"] is True
    assert (tmp_path / "out").read_text() == "2 x, y, z 3.5\n"


async def test_capture_format_mismatch_fails_the_step(tmp_path: Path) -> None:
    result, _ = await run(tmp_path, "- shell: echo nope\n  capture: n\n  capture_format: number")
    assert result.failed_step == 1
    assert "not a number" in result.failed.error  # type: ignore[union-attr]


async def test_capture_streams(tmp_path: Path) -> None:
    result, v = await run(
        tmp_path,
        """
- shell: "echo out; echo err >&2; exit 3"
  capture: r
  capture_streams: {stdout: true, stderr: true, exit_code: true, success: true, duration: true}
  on_failure: true
- shell: echo "${r} ${r.stderr} ${r.exit_code} ${r.success}" > out
""",
    )
    assert result.ok
    assert v["r.exit_code"] == 3 and v["r.success"] is False and v["r.duration"] >= 0
    assert (tmp_path / "out").read_text() == "out err 3 false\n"


async def test_capture_streams_off(tmp_path: Path) -> None:
    _, v = await run(
        tmp_path,
        "- shell: echo hi\n  capture: r\n  capture_streams: {exit_code: false, duration: false}",
    )
    assert v["r"] == "hi" and "r.exit_code" not in v and "r.duration" not in v
    assert v["r.success"] is True


async def test_capture_output_default_and_custom(tmp_path: Path) -> None:
    captures: dict[str, str] = {}
    result, v = await run(
        tmp_path,
        """
- shell: echo one
  capture_output: true
- shell: echo "${shell.output}-two"
  capture_output: mine
- shell: echo "${mine}" > out
""",
        captures=captures,
    )
    assert result.ok
    assert (tmp_path / "out").read_text() == "one-two\n"
    assert captures["mine"] == "one-two" and captures["mine.exit_code"] == "0"
    assert v["last.exit_code"] == 0


# --- on_failure ------------------------------------------------------------------------------


async def test_failure_without_handler_stops_the_list(tmp_path: Path) -> None:
    result, _ = await run(tmp_path, "- shell: exit 4\n- shell: echo never >> log")
    assert result.failed_step == 1 and result.failed.exit_code == 4  # type: ignore[union-attr]
    assert log(tmp_path) == [] and len(result.outcomes) == 1


async def test_on_failure_true_ignores(tmp_path: Path) -> None:
    result, _ = await run(tmp_path, "- shell: exit 4\n  on_failure: true\n- shell: echo b >> log")
    assert result.ok and log(tmp_path) == ["b"]


async def test_on_failure_false_fails(tmp_path: Path) -> None:
    result, _ = await run(tmp_path, "- shell: exit 4\n  on_failure: false")
    assert result.failed_step == 1


async def test_on_failure_string_handler_recovers(tmp_path: Path) -> None:
    result, _ = await run(
        tmp_path,
        """
- shell: "echo broken; exit 1"
  on_failure: "echo fixed-${shell.output} >> log"
- shell: echo next >> log
""",
    )
    assert result.ok
    assert log(tmp_path) == ["fixed-broken", "next"]
    assert [r.role for r in result.records] == ["step", "on_failure", "step"]


async def test_on_failure_failing_handler_fails(tmp_path: Path) -> None:
    result, _ = await run(tmp_path, '- shell: exit 1\n  on_failure: "exit 2"')
    assert result.failed_step == 1 and result.reason == "on_failure handler failed"
    assert result.failed.exit_code == 1  # type: ignore[union-attr]  # the step's own


async def test_on_failure_list_of_commands(tmp_path: Path) -> None:
    result, _ = await run(
        tmp_path, '- shell: exit 1\n  on_failure: ["echo a >> log", "echo b >> log"]'
    )
    assert result.ok and log(tmp_path) == ["a", "b"]


async def test_on_failure_commands_mapping(tmp_path: Path) -> None:
    result, _ = await run(
        tmp_path,
        """
- shell: exit 1
  on_failure:
    strategy: recovery
    commands:
      - shell: "exit 9"
        continue_on_error: true
      - shell: echo cleaned >> log
""",
    )
    assert result.ok and log(tmp_path) == ["cleaned"]
    result, _ = await run(
        tmp_path,
        """
- shell: exit 1
  on_failure:
    commands:
      - shell: "exit 9"
      - shell: echo never >> log
""",
    )
    assert not result.ok and log(tmp_path) == ["cleaned"]


async def test_on_failure_fail_workflow(tmp_path: Path) -> None:
    result, _ = await run(
        tmp_path,
        """
- shell: exit 1
  on_failure:
    shell: echo handled >> log
    fail_workflow: true
- shell: echo never >> log
""",
    )
    assert result.failed_step == 1 and result.fail_workflow
    assert log(tmp_path) == ["handled"]


async def test_on_failure_commands_fail_workflow(tmp_path: Path) -> None:
    result, _ = await run(
        tmp_path,
        "- shell: exit 1\n  on_failure: {commands: [{shell: 'true'}], fail_workflow: true}",
    )
    assert result.failed_step == 1 and result.fail_workflow


async def test_max_attempts_retries_the_original_step(tmp_path: Path) -> None:
    # fails twice, then succeeds: the handler runs after each failure
    result, _ = await run(
        tmp_path,
        """
- shell: "echo try >> log; [ $(grep -c try log) -ge 3 ]"
  on_failure:
    shell: echo fix >> log
    max_attempts: 3
    fail_workflow: true
""",
    )
    assert result.ok, result
    assert log(tmp_path) == ["try", "fix", "try", "fix", "try"]
    assert [r.role for r in result.records] == [
        "step",
        "on_failure",
        "retry",
        "on_failure",
        "retry",
    ]


async def test_max_attempts_exhausted_fails_with_fail_workflow(tmp_path: Path) -> None:
    result, _ = await run(
        tmp_path,
        "- shell: echo try >> log; exit 1\n"
        "  on_failure: {claude: /fix, max_retries: 2, fail_workflow: true}",
    )
    assert result.failed_step == 1 and result.fail_workflow
    assert log(tmp_path) == ["try", "try"]


async def test_max_attempts_without_handler(tmp_path: Path) -> None:
    result, _ = await run(
        tmp_path, "- shell: echo try >> log; exit 1\n  on_failure: {max_attempts: 3}"
    )
    assert result.failed_step == 1 and log(tmp_path) == ["try"] * 3
    assert result.reason == "failed 3 times"


def on_failure_of(value: str) -> OnFailure | None:
    return steps_of(f"- shell: x\n  on_failure: {value}")[0].on_failure


def test_on_failure_shapes() -> None:
    assert on_failure_of("'/fix it'") == OnFailure(
        handlers=[Step(claude="/fix it")], continue_on_error=[False]
    )
    assert on_failure_of("make fix") == OnFailure(
        handlers=[Step(shell="make fix")], continue_on_error=[False]
    )
    assert on_failure_of("true") == OnFailure(ignore=True)
    assert on_failure_of("false") is None
    policy = on_failure_of("{claude: /fix, max_attempts: 3, fail_workflow: false}")
    assert policy is not None and policy.max_attempts == 3 and not policy.fail_workflow
    policy = on_failure_of("{shell: x, max_retries: '2'}")
    assert policy is not None and policy.max_attempts == 2
    with pytest.raises(WorkflowInvalid, match="on_failure"):
        on_failure_of("42")
    with pytest.raises(WorkflowInvalid, match="expected exactly one of shell"):
        on_failure_of("{shell: a, claude: /b}")


async def test_timeout_counts_as_failure_and_is_handled(tmp_path: Path) -> None:
    result, _ = await run(
        tmp_path,
        "- shell: sleep 5\n  timeout: 0.2\n  on_failure: 'echo late >> log'",
    )
    assert result.ok and log(tmp_path) == ["late"]


async def test_deadline_bounds_every_command(tmp_path: Path) -> None:
    start = time.monotonic()
    result, _ = await run(
        tmp_path, "- shell: sleep 5\n- shell: echo never >> log", deadline=time.monotonic() + 0.3
    )
    assert time.monotonic() - start < 4
    assert result.failed.timed_out and result.failed_step == 1  # type: ignore[union-attr]


# --- on_success / on_exit_code ---------------------------------------------------------------


async def test_on_success_runs_after_success(tmp_path: Path) -> None:
    result, _ = await run(
        tmp_path,
        """
- shell: echo ok
  on_success:
    shell: echo after-${shell.output} >> log
- shell: exit 1
  on_success:
    shell: echo never >> log
  on_failure: true
""",
    )
    assert result.ok and log(tmp_path) == ["after-ok"]


async def test_failing_on_success_fails_the_step(tmp_path: Path) -> None:
    result, _ = await run(tmp_path, "- shell: 'true'\n  on_success: {shell: 'exit 5'}")
    assert result.failed_step == 1 and result.reason == "on_success handler failed"


async def test_on_exit_code_handles_that_code(tmp_path: Path) -> None:
    result, _ = await run(
        tmp_path,
        """
- shell: exit 2
  on_exit_code:
    1: {shell: echo one >> log}
    2: {shell: echo two >> log}
- shell: echo next >> log
""",
    )
    assert result.ok and log(tmp_path) == ["two", "next"]
    result, _ = await run(
        tmp_path, "- shell: exit 3\n  on_exit_code: {1: {shell: echo one >> log}}"
    )
    assert result.failed_step == 1  # no handler for 3


async def test_on_exit_code_zero_and_nested_handlers(tmp_path: Path) -> None:
    result, _ = await run(
        tmp_path,
        """
- shell: "true"
  on_exit_code:
    0:
      shell: exit 1
      on_failure: "echo nested >> log"
""",
    )
    assert result.ok and log(tmp_path) == ["nested"]


async def test_handler_step_with_write_file(tmp_path: Path) -> None:
    result, _ = await run(
        tmp_path,
        """
- shell: exit 1
  on_failure:
    commands:
      - write_file: {path: report.txt, content: "failed: ${last.exit_code}"}
""",
    )
    assert result.ok and (tmp_path / "report.txt").read_text() == "failed: 1"


async def test_commands_timeout_caps_each_handler(tmp_path: Path) -> None:
    """``on_failure: {commands, timeout}`` used to crash the agent (dataclasses.replace on a
    msgspec Struct); found by tests/fuzz/test_fuzz_language.py."""
    started = time.monotonic()
    result, _ = await run(
        tmp_path,
        "- shell: 'exit 1'\n"
        "  on_failure:\n"
        "    commands:\n"
        "      - shell: 'sleep 5'\n"
        "      - shell: 'echo second >> log'\n"
        "    timeout: 0.3\n",
    )
    assert time.monotonic() - started < 3
    assert result.failed_step == 1 and result.reason == "on_failure handler failed"
    handler = [r for r in result.records if r.role == "on_failure"]
    assert handler[0].outcome.timed_out and handler[0].step.timeout_s == 0.3
    assert log(tmp_path) == []  # the first handler failed: the second did not run
