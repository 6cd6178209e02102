"""What ``jetreduce validate`` accepts never fails at run time for a language reason (issue
16): steps built from every modifier, in valid and invalid forms, are parsed; those the parser
accepts run through the real step flow (`worker/stepflow.py`) with a stand-in for the process,
and no command may fail except by its own exit code."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jetreduce.contract.workflow import Step, WorkflowInvalid
from jetreduce.lang import parse_workflow
from jetreduce.worker.stepflow import run_steps
from jetreduce.worker.steps import StepOutcome

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(
    max_examples=150,
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

COMMANDS = st.sampled_from(["shell: ok", "shell: fail", "claude: /fix", "shell: 'exit 3'"])
WHENS = st.sampled_from(
    [
        '"${x} > 1"',
        '"${flag} && !${other:-false}"',
        '"(${a} == b) or ${n} >= 2"',
        '"${a} =="',  # invalid
        '"(${a}"',  # invalid
        "true",
        '"${missing}"',
    ]
)


def handler(depth: int) -> st.SearchStrategy[str]:
    """A handler value in flow style: one of on_failure's shapes, valid or not."""
    leaf = st.sampled_from(
        [
            "true",
            "false",
            "'echo recovered'",
            "'/fix it'",
            "[a, b]",
            "[{shell: a}]",  # invalid: a list holds command strings
            "{shell: fixit, max_attempts: 2}",
            "{claude: /fix, fail_workflow: true}",
            "{max_attempts: 3}",
            "{commands: [a, {shell: b, continue_on_error: true}], timeout: 5}",
            "{commands: [7]}",  # invalid
            "{shell: a, claude: /b}",  # invalid
            "42",  # invalid
        ]
    )
    if depth <= 0:
        return leaf
    return st.one_of(
        leaf,
        handler(depth - 1).map(lambda inner: "{shell: h, on_failure: " + inner + "}"),
    )


@st.composite
def steps(draw: st.DrawFn) -> str:
    lines = []
    for _ in range(draw(st.integers(1, 3))):
        parts = [draw(COMMANDS)]
        if draw(st.booleans()):
            parts.append("when: " + draw(WHENS))
        if draw(st.booleans()):
            parts.append("on_failure: " + draw(handler(2)))
        if draw(st.booleans()):
            parts.append(
                "on_success: " + draw(st.sampled_from(["'echo ok'", "{shell: ok}", "[x]"]))
            )
        if draw(st.booleans()):
            code = draw(st.sampled_from(["3", "'1'", "one"]))
            parts.append("on_exit_code: {" + code + ": {shell: handled}}")
        if draw(st.booleans()):
            parts.append("capture: out")
            parts.append("capture_format: " + draw(st.sampled_from(["json", "number", "xml"])))
        lines.append("  - {" + ", ".join(parts) + "}")
    return "\n".join(lines)


async def fake_run(step: Step, _variables: dict[str, Any], _timeout: float | None) -> StepOutcome:
    """A process stand-in: the step's own text decides its exit code; stdout parses as every
    capture format, so only the language could make a command fail otherwise."""
    text = step.shell or step.claude or ""
    code = 3 if "exit 3" in text else (1 if "fail" in text else 0)
    return StepOutcome(code, "1\n", "", 0.0)


@FUZZ
@given(steps(), st.integers(0, 3))
def test_what_the_parser_accepts_runs_without_a_language_failure(template: str, x: int) -> None:
    text = f"name: t\nmap:\n  input: x.json\n  agent_template:\n{template}\n"
    try:
        workflow = parse_workflow(text).workflow
    except WorkflowInvalid as exc:
        assert exc.problems and all(p.line is not None for p in exc.problems), exc
        return
    variables: dict[str, Any] = {"x": x, "flag": "yes", "a": "b", "n": x}
    result = asyncio.run(
        run_steps(workflow.map.agent_template, variables, run_one=fake_run, deadline=None)
    )
    for record in result.records:
        assert record.outcome.error == "", record  # never a language error
    if result.failed is not None:
        assert result.failed.exit_code in (1, 3) and not result.failed.error
