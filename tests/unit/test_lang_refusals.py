"""Every construct of the workflow language refuses its invalid forms at parse time, that is at
``jetreduce validate`` and at submit, with the line and column of the offending value and a
message naming the construct: nothing a parse accepts may fail at run time for a language
reason (issue 16)."""

from __future__ import annotations

import textwrap

import pytest

from jetreduce.contract.workflow import Problem, WorkflowInvalid
from jetreduce.lang import parse_workflow

pytestmark = pytest.mark.unit

HEAD = """\
name: t
map:
  input: items.json
"""


def refused(text: str) -> Problem:
    """The one error a workflow text gets; its position must be known."""
    with pytest.raises(WorkflowInvalid) as caught:
        parse_workflow(textwrap.dedent(text), source="wf.yml")
    problems = caught.value.problems
    assert len(problems) == 1, problems
    problem = problems[0]
    assert problem.line is not None and problem.column is not None
    return problem


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("filter", "'score >'", "invalid filter expression"),
        ("filter", "'nosuch(x) == 1'", "invalid filter expression"),
        ("json_path", "'$.items[*'", "invalid json_path expression"),
        ("sort_by", "'score SIDEWAYS'", "invalid sort_by expression"),
        ("distinct", "'a..b'", "invalid distinct expression"),
    ],
)
def test_a_bad_pipeline_expression_is_refused_at_its_position(
    key: str, value: str, fragment: str
) -> None:
    text = HEAD + f"  {key}: {value}\n  agent_template:\n    - shell: echo\n"
    problem = refused(text)
    assert problem.path == f"map.{key}"
    assert fragment in problem.message
    assert (problem.line, problem.column) == (4, len(key) + 5)
    rendered = problem.render("wf.yml")
    assert rendered.startswith(f"wf.yml:4:{len(key) + 5}: map.{key}: ")


def test_the_prodigy_pipeline_expressions_still_parse() -> None:
    text = HEAD + (
        '  json_path: "$.items[*]"\n'
        '  filter: "File.score >= 10 OR Function.unified_score.final_score >= 10"\n'
        '  sort_by: "File.score DESC NULLS LAST, Function.unified_score.final_score DESC"\n'
        "  distinct: file.path\n"
        "  agent_template:\n"
        "    - shell: echo\n"
    )
    m = parse_workflow(text).workflow.map
    assert m.filter is not None and m.sort_by is not None and m.distinct == "file.path"


def step_text(modifiers: str) -> str:
    """A workflow whose one map step carries ``modifiers`` (lines indented as step keys)."""
    body = "\n".join("      " + line for line in textwrap.dedent(modifiers).strip().splitlines())
    return HEAD + "  agent_template:\n    - shell: make\n" + body + "\n"


STEP = "map.agent_template[0]"


@pytest.mark.parametrize(
    ("modifiers", "path", "position", "fragment"),
    [
        # The reproduction: a mapping where a command string belongs.
        (
            'on_failure:\n  - shell: "echo handler"',
            f"{STEP}.on_failure[0]",
            (7, 11),
            "on_failure list entries must be command strings, got a mapping",
        ),
        ("on_failure: 42", f"{STEP}.on_failure", (6, 19), "expected true, false, a command"),
        (
            "on_failure: {shell: a, claude: /b}",
            f"{STEP}.on_failure",
            (6, 19),
            "expected exactly one of shell, claude",
        ),
        (
            "on_failure: {shell: a, max_attempts: many}",
            f"{STEP}.on_failure.max_attempts",
            (6, 44),
            "expected an integer",
        ),
        (
            "on_failure:\n  commands:\n    - {nope: 1}",
            f"{STEP}.on_failure.commands[0]",
            (8, 13),
            "step has no command",
        ),
        (
            "on_failure:\n  commands:\n    - 7",
            f"{STEP}.on_failure.commands[0]",
            (8, 13),
            "expected a command string or a step mapping",
        ),
        (
            "on_failure:\n  commands: [a]\n  fail_workflow: maybe",
            f"{STEP}.on_failure.fail_workflow",
            (8, 24),
            "expected true or false",
        ),
        ("on_success: [a, b]", f"{STEP}.on_success", (6, 19), "expected a step mapping"),
        ("on_success: {claude: ''}", f"{STEP}.on_success.claude", (6, 28), "empty"),
        (
            "on_exit_code:\n  one: {shell: x}",
            f"{STEP}.on_exit_code.one",
            (7, 9),
            "'one' is not an exit code",
        ),
        (
            "on_exit_code:\n  2: {timeout: 5}",
            f"{STEP}.on_exit_code.2",
            (7, 12),
            "step has no command",
        ),
        ("on_exit_code: [1]", f"{STEP}.on_exit_code", (6, 21), "a mapping of exit codes"),
        ('when: "${a} =="', f"{STEP}.when", (6, 13), "invalid when expression"),
        ('when: "(${a}"', f"{STEP}.when", (6, 13), "invalid when expression: missing ')'"),
        ('when: "${a} === 1"', f"{STEP}.when", (6, 13), "invalid when expression"),
        ("commit_required: sometimes", f"{STEP}.commit_required", (6, 24), "true or false"),
        ("capture_streams: {stderr: loud}", f"{STEP}.capture_streams.stderr", (6, 33), "true"),
    ],
)
def test_a_bad_handler_or_modifier_is_refused_once_at_its_position(
    modifiers: str, path: str, position: tuple[int, int], fragment: str
) -> None:
    problem = refused(step_text(modifiers))
    assert problem.path == path
    assert fragment in problem.message
    assert (problem.line, problem.column) == position
    # Said once: the message does not repeat itself (issue 16 saw "x (x)").
    first = problem.message.split(" (", 1)[0]
    assert problem.message.count(first) == 1


def test_handlers_nested_too_deeply_are_refused() -> None:
    handler = "{shell: x}"
    for _ in range(9):
        handler = "{shell: x, on_success: " + handler + "}"
    problem = refused(step_text(f"on_success: {handler}"))
    assert "nested more than 8 deep" in problem.message


def test_every_handler_shape_that_runs_parses() -> None:
    text = step_text(
        """
        when: "${item.ok} && !${skip:-false}"
        commit_required: true
        capture: out
        capture_streams: {stderr: true, duration: false}
        on_success: "echo ok"
        on_exit_code:
          3: {shell: "echo three", when: "${x} > 1"}
          "4": /fix
        on_failure:
          commands:
            - echo a
            - shell: echo b
              continue_on_error: true
              on_failure: true
          fail_workflow: true
          timeout: 5s
          strategy: recovery
        """
    )
    step = parse_workflow(text).workflow.map.agent_template[0]
    assert step.commit_required and step.when is not None
    assert step.capture_streams is not None and step.capture_streams.stderr
    assert step.on_success is not None and step.on_success.shell == "echo ok"
    assert set(step.on_exit_code) == {3, 4} and step.on_exit_code[4].claude == "/fix"
    policy = step.on_failure
    assert policy is not None and policy.fail_workflow and policy.timeout_s == 5.0
    assert [h.shell for h in policy.handlers] == ["echo a", "echo b"]
    assert policy.continue_on_error == [False, True]
    assert policy.handlers[1].on_failure is not None and policy.handlers[1].on_failure.ignore


@pytest.mark.parametrize(
    "expression",
    ["(" * 400 + "1" + ")" * 400, "!" * 1000 + "1", " && ".join(["1"] * 300)],
)
def test_a_when_too_deep_to_evaluate_is_refused_at_its_position(expression: str) -> None:
    """Evaluation recurses once per level: a tree deeper than MAX_WHEN_DEPTH would die of
    RecursionError in the agent, so the parser refuses it (and never recurses itself)."""
    problem = refused(step_text(f'when: "{expression}"'))
    assert problem.path == f"{STEP}.when"
    assert "invalid when expression: nested more than 200 levels deep" in problem.message
    assert (problem.line, problem.column) == (6, 13)


@pytest.mark.parametrize(
    ("top", "path", "position", "fragment"),
    [
        ('secrets:\n  T: "hunter2 !"', "secrets.T", (2, 6), "must not be written"),
        ("secrets:\n  T: {provider: vault, key: x}", "secrets.T.provider", (2, 17), "vault"),
        ("env_files: [a, '']", "env_files[1]", (1, 16), "empty"),
        ("profiles:\n  dev: {X: {y: 1}}", "profiles.dev.X", (2, 9), "expected a string"),
        (
            "error_policy:\n  circuit_breaker: {timeout: soon}",
            "error_policy.circuit_breaker.timeout",
            (2, 30),
            "expected a number of seconds",
        ),
        (
            "error_policy:\n  retry_config: {backoff: {quadratic: {}}}",
            "error_policy.retry_config.backoff",
            (2, 27),
            "exponential, fixed, linear, fibonacci",
        ),
    ],
)
def test_a_bad_top_level_construct_is_refused_at_its_position(
    top: str, path: str, position: tuple[int, int], fragment: str
) -> None:
    problem = refused(top + "\n" + HEAD + "  agent_template: []\n")
    assert problem.path == path
    assert fragment in problem.message
    assert (problem.line, problem.column) == position
