"""Behaviour of the workflow parser: Prodigy's accepted shapes, $VAR resolution, and errors
that name the field and its line, all reported at once."""

from __future__ import annotations

import pickle
import textwrap
from collections.abc import Mapping
from pathlib import Path

import msgspec
import pytest

from jetreduce.contract.workflow import (
    CircuitBreakerConfig,
    OnFailure,
    Problem,
    RetryConfig,
    Secret,
    Step,
    Workflow,
    WorkflowInvalid,
    parse_duration,
)
from jetreduce.lang import ParseResult, parse_workflow

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "prodigy-examples"

# Files Prodigy itself rejects (INDEX.md): everything else there must parse.
INVALID_EXAMPLES = {
    "mapreduce-json-input.yml": (30, "mapping values are not allowed here"),
    "mapreduce-env-example.yml": (23, "env.API_TOKEN"),
}
# Further problems of those files, beyond the first: (line, fragment).
MORE_PROBLEMS = {
    # A list of step mappings is not one of on_failure's shapes (Prodigy refuses it too).
    "mapreduce-env-example.yml": [(67, "on_failure list entries must be command strings")],
}

MINIMAL = """\
name: demo
map:
  input: items.json
  agent_template:
    - shell: echo ${item}
"""


def parse(text: str, env: Mapping[str, str] | None = None) -> ParseResult:
    return parse_workflow(textwrap.dedent(text), env=env)


def problems_of(text: str, env: Mapping[str, str] | None = None) -> list[Problem]:
    with pytest.raises(WorkflowInvalid) as caught:
        parse(text, env)
    return caught.value.problems


def only_problem(text: str, env: Mapping[str, str] | None = None) -> Problem:
    problems = problems_of(text, env)
    assert len(problems) == 1, problems
    return problems[0]


def workflow(text: str, env: Mapping[str, str] | None = None) -> Workflow:
    return parse(text, env).workflow


# -- top level -----------------------------------------------------------------------------


def test_minimal_workflow_gets_prodigy_defaults() -> None:
    result = parse(MINIMAL)
    wf = result.workflow
    assert result.warnings == []
    assert wf.name == "demo"
    assert wf.mode == "mapreduce"
    assert wf.map.input == "items.json"
    assert wf.map.json_path == ""
    assert wf.map.max_parallel == 10
    assert wf.map.agent_timeout_s is None
    assert wf.setup is None
    assert wf.reduce is None
    assert wf.env == {}
    assert wf.extra == {}
    assert wf.error_policy.on_item_failure == "dlq"
    assert wf.error_policy.continue_on_failure is True
    assert wf.error_policy.retry == RetryConfig()
    assert [step.kind for step in wf.map.agent_template] == ["shell"]
    assert wf.map.agent_template[0].shell == "echo ${item}"


def test_workflow_round_trips_through_json() -> None:
    wf = workflow((EXAMPLES / "debtmap-reduce.yml").read_text())
    decoded = msgspec.json.decode(msgspec.json.encode(wf), type=Workflow)
    assert decoded == wf


def test_missing_name_and_map_are_both_reported() -> None:
    problems = problems_of("mode: mapreduce\nreduce: []\n")
    assert {(p.path, p.message) for p in problems} == {
        ("name", "required key is missing"),
        ("map", "required key is missing"),
    }
    assert all(p.line == 1 for p in problems)


def test_other_mode_is_an_error() -> None:
    problem = only_problem("mode: standard\n" + MINIMAL)
    assert problem.path == "mode"
    assert "unsupported mode 'standard'" in problem.message
    assert (problem.line, problem.column) == (1, 7)


def test_quoted_mode_is_accepted() -> None:
    assert workflow('mode: "mapreduce"\n' + MINIMAL).mode == "mapreduce"


def test_empty_document_is_rejected() -> None:
    problem = only_problem("# only a comment\n")
    assert "empty" in problem.message


def test_root_must_be_a_mapping() -> None:
    problem = only_problem("- shell: echo\n")
    assert problem.path == ""
    assert "expected a mapping" in problem.message
    assert problem.line == 1


def test_yaml_syntax_error_has_position() -> None:
    problem = only_problem("name: x\nmap:\n  input: a: b\n")
    assert problem.path == ""
    assert problem.message.startswith("invalid YAML: mapping values are not allowed here")
    assert problem.line == 3


def test_duplicate_key_is_an_error_naming_both_lines() -> None:
    problem = only_problem(MINIMAL + "name: again\n")
    assert problem.path == "name"
    assert problem.line == 6
    assert "duplicate key (first defined on line 1)" in problem.message


def test_yaml_anchors_and_merge_keys_are_resolved() -> None:
    wf = workflow(
        """\
        name: anchors
        map:
          input: x
          agent_template:
            - &base
              shell: one
              env: {A: "1"}
            - <<: *base
              shell: two
        """
    )
    assert [(s.shell, s.env) for s in wf.map.agent_template] == [
        ("one", {"A": "1"}),
        ("two", {"A": "1"}),
    ]


def test_merge_key_override_is_not_a_duplicate_but_a_repeated_key_is() -> None:
    problem = only_problem(
        """\
        name: anchors
        map:
          input: x
          agent_template:
            - &base {shell: one, name: base}
            - <<: *base
              name: child
              name: again
        """
    )
    assert problem.path == "map.agent_template[1].name"
    assert problem.line == 8


def test_non_printable_characters_are_a_yaml_error() -> None:
    problem = only_problem("name: a\x07b\n")
    assert problem.message.startswith("invalid YAML")


# -- env -----------------------------------------------------------------------------------


def test_env_scalars_are_kept_as_written() -> None:
    wf = workflow(
        """\
        name: e
        env:
          NAME: text
          COUNT: 5
          RATIO: 1.50
          DEBUG: false
          OCTAL: 0644
        map: {input: x, agent_template: []}
        """
    )
    assert wf.env == {
        "NAME": "text",
        "COUNT": "5",
        "RATIO": "1.50",
        "DEBUG": "false",
        "OCTAL": "0644",
    }


def test_env_mapping_value_is_rejected_at_its_key() -> None:
    problem = only_problem(
        """\
        name: e
        env:
          OK: "1"
          API_TOKEN:
            secret: true
            value: x
        map: {input: x, agent_template: []}
        """
    )
    assert problem.path == "env.API_TOKEN"
    assert (problem.line, problem.column) == (4, 3)
    assert "got a mapping" in problem.message
    assert "secrets" in problem.message


def test_env_null_value_is_rejected() -> None:
    problem = only_problem("name: e\nenv:\n  EMPTY:\nmap: {input: x, agent_template: []}\n")
    assert problem.path == "env.EMPTY"
    assert "got null" in problem.message


# -- $VAR resolution -----------------------------------------------------------------------

VARS = """\
name: vars
env:
  MAX_PARALLEL: "5"
  VAR1: "7"
  T: "900"
  SETUP_T: "15m"
map:
  input: x
  max_parallel: {parallel}
  agent_timeout_secs: ${{T}}
  agent_template:
    - shell: echo
      timeout: $T
setup:
  timeout: $SETUP_T
  commands:
    - shell: echo
"""


@pytest.mark.parametrize(("spelling", "expected"), [("${MAX_PARALLEL}", 5), ("$VAR1", 7)])
def test_numeric_fields_resolve_from_workflow_env(spelling: str, expected: int) -> None:
    wf = workflow(VARS.format(parallel=f'"{spelling}"'))
    assert wf.map.max_parallel == expected
    assert wf.map.agent_timeout_s == 900.0
    assert wf.map.agent_template[0].timeout_s == 900.0
    assert wf.setup is not None
    assert wf.setup.timeout_s == 900.0


def test_unquoted_var_works_too() -> None:
    assert workflow(VARS.format(parallel="$VAR1")).map.max_parallel == 7


def test_caller_env_is_consulted_after_workflow_env() -> None:
    text = VARS.format(parallel="$FROM_CALLER")
    assert workflow(text, env={"FROM_CALLER": "3"}).map.max_parallel == 3
    # The workflow's own env wins over the caller's.
    assert workflow(VARS.format(parallel="$VAR1"), env={"VAR1": "99"}).map.max_parallel == 7


def test_missing_variable_names_it_and_says_not_found() -> None:
    problem = only_problem(VARS.format(parallel="${NOPE}"), env={})
    assert problem.path == "map.max_parallel"
    assert "NOPE" in problem.message
    assert "not found" in problem.message
    assert (problem.line, problem.column) == (9, 17)


def test_without_caller_env_the_process_env_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONLY_IN_PROCESS", "4")
    problem = only_problem(VARS.format(parallel="$ONLY_IN_PROCESS"))
    assert "ONLY_IN_PROCESS not found" in problem.message


def test_non_numeric_variable_names_it() -> None:
    problems = problems_of(
        VARS.format(parallel="$P").replace('T: "900"', 'T: "soon"'), env={"P": "lots"}
    )
    messages = {p.path: p.message for p in problems}
    assert messages["map.max_parallel"] == "variable P = 'lots' is not an integer"
    assert "variable T = 'soon'" in messages["map.agent_timeout_secs"]
    assert "variable T = 'soon'" in messages["map.agent_template[0].timeout"]


def test_max_parallel_type_error_names_field_and_type() -> None:
    problem = only_problem(VARS.format(parallel="abc"))
    assert problem.render("wf.yml") == (
        "wf.yml:9:17: map.max_parallel: expected an integer or $VAR, got 'abc'"
    )


@pytest.mark.parametrize("value", ["0", "-2", "$ZERO"])
def test_max_parallel_must_be_at_least_one(value: str) -> None:
    problem = only_problem(VARS.format(parallel=value), env={"ZERO": "0"})
    assert problem.path == "map.max_parallel"
    assert "at least 1" in problem.message


def test_max_parallel_accepts_quoted_integer() -> None:
    assert workflow(VARS.format(parallel='"12"')).map.max_parallel == 12


# -- durations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 30.0),
        ("1s", 1.0),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1h 30m", 5400.0),
        ("1m30s", 90.0),
        ("2 minutes", 120.0),
        ("1.5s", 1.5),
        ("1d", 86400.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_parse_duration_distinguishes_minutes_and_months() -> None:
    assert parse_duration("1M") > 30 * parse_duration("1d") > parse_duration("1m")


@pytest.mark.parametrize("text", ["", "abc", "5 parsecs", "1s junk"])
def test_parse_duration_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("45", 45.0),
        ("2.5", 2.5),
        ('"1m"', 60.0),
        ('"250ms"', 0.25),
        ("{secs: 3, nanos: 500000000}", 3.5),
    ],
)
def test_step_timeout_forms(value: str, seconds: float) -> None:
    wf = workflow(
        f"name: t\nmap:\n  input: x\n  agent_template:\n    - shell: s\n      timeout: {value}\n"
    )
    assert wf.map.agent_template[0].timeout_s == pytest.approx(seconds)


@pytest.mark.parametrize(("value", "fragment"), [("0", "greater than 0"), ("soon", "expected")])
def test_bad_step_timeout(value: str, fragment: str) -> None:
    problem = only_problem(
        f"name: t\nmap:\n  input: x\n  agent_template:\n    - shell: s\n      timeout: {value}\n"
    )
    assert problem.path == "map.agent_template[0].timeout"
    assert fragment in problem.message
    assert (problem.line, problem.column) == (6, 16)


def test_unknown_duration_unit_is_named() -> None:
    problem = step_problem("    - shell: s\n      timeout: 5 parsecs\n")
    assert problem.message.endswith(
        "got '5 parsecs' (unknown unit 'parsecs'; use ns, us, ms, s, m, h, d, w, M or y)"
    )


def test_recursive_alias_in_kept_values_is_reported() -> None:
    problem = step_problem("    - shell: s\n      validate: &loop {claude: /x, next: *loop}\n")
    assert problem.path == "map.agent_template[1].validate.next"
    assert problem.message == "recursive YAML alias"


# -- setup / map / reduce shapes -----------------------------------------------------------


def test_list_forms() -> None:
    wf = workflow(
        """\
        name: lists
        setup:
          - shell: make items
        map:
          input: x
          agent_template:
            - claude: /do ${item}
        reduce:
          - shell: echo done
        """
    )
    assert wf.setup is not None and wf.reduce is not None
    assert [s.shell for s in wf.setup.steps] == ["make items"]
    assert wf.setup.timeout_s is None
    assert wf.setup.capture_outputs == {}
    assert [s.claude for s in wf.map.agent_template] == ["/do ${item}"]
    assert [s.shell for s in wf.reduce.steps] == ["echo done"]


def test_commands_forms() -> None:
    wf = workflow(
        """\
        name: nested
        setup:
          timeout: 900
          commands:
            - shell: echo a.json
            - shell: echo 3
          capture_outputs:
            INPUT_FILE: 0
            ITEM_COUNT:
              command_index: 1
              source: stdout
        map:
          input: $INPUT_FILE
          agent_template:
            commands:
              - shell: one
              - shell: two
        reduce:
          commands:
            - shell: summary
        """
    )
    assert wf.setup is not None and wf.reduce is not None
    assert wf.setup.timeout_s == 900.0
    assert len(wf.setup.steps) == 2
    assert wf.setup.capture_outputs == {
        "INPUT_FILE": 0,
        "ITEM_COUNT": {"command_index": 1, "source": "stdout"},
    }
    assert [s.shell for s in wf.map.agent_template] == ["one", "two"]
    assert [s.shell for s in wf.reduce.steps] == ["summary"]
    # map.input is interpolated at run time, not by the parser.
    assert wf.map.input == "$INPUT_FILE"


def test_empty_agent_template_is_a_no_op_map() -> None:
    wf = workflow("name: bench\nmap:\n  input: x\n  agent_template: []\nreduce: []\n")
    assert wf.map.agent_template == []
    assert wf.reduce is not None and wf.reduce.steps == []


def test_commands_mapping_without_commands_is_an_error() -> None:
    problem = only_problem("name: s\nsetup:\n  timeout: 5\nmap: {input: x, agent_template: []}\n")
    assert problem.path == "setup"
    assert "commands" in problem.message


def test_capture_output_index_out_of_range() -> None:
    problem = only_problem(
        """\
        name: s
        setup:
          commands: [{shell: a}]
          capture_outputs: {X: 3}
        map: {input: x, agent_template: []}
        """
    )
    assert problem.path == "setup.capture_outputs.X"
    assert "out of range" in problem.message


def test_map_pipeline_fields() -> None:
    wf = workflow(
        """\
        name: pipeline
        map:
          input: cmd
          json_path: "$.items[*]"
          filter: "score >= 5"
          sort_by: "score DESC NULLS LAST"
          distinct: id
          offset: 2
          max_items: 10
          agent_template: []
        """
    )
    m = wf.map
    assert (m.json_path, m.filter, m.sort_by, m.distinct) == (
        "$.items[*]",
        "score >= 5",
        "score DESC NULLS LAST",
        "id",
    )
    assert (m.offset, m.max_items) == (2, 10)


def test_negative_offset_and_non_integer_max_items() -> None:
    problems = problems_of(
        "name: p\nmap:\n  input: x\n  offset: -1\n  max_items: many\n  agent_template: []\n"
    )
    assert [(p.path, p.line) for p in problems] == [("map.offset", 4), ("map.max_items", 5)]
    assert "at least 0" in problems[0].message
    assert problems[1].message == "expected an integer, got 'many'"


def test_required_map_fields() -> None:
    problems = problems_of("name: p\nmap:\n  json_path: $\n")
    assert {p.path for p in problems} == {"map.input", "map.agent_template"}
    assert all(p.line == 3 for p in problems)


def test_timeout_config_feeds_agent_timeout_and_is_kept() -> None:
    wf = workflow(
        """\
        name: t
        map:
          input: x
          agent_template: []
          timeout_config:
            agent_timeout_secs: 30
            timeout_policy: PerAgent
            timeout_action: Dlq
        """
    )
    assert wf.map.agent_timeout_s == 30.0
    assert wf.map.extra["timeout_config"] == {
        "agent_timeout_secs": 30,
        "timeout_policy": "PerAgent",
        "timeout_action": "Dlq",
    }


def test_explicit_agent_timeout_wins_over_timeout_config() -> None:
    wf = workflow(
        "name: t\nmap:\n  input: x\n  agent_template: []\n  agent_timeout_secs: 5\n"
        "  timeout_config: {agent_timeout_secs: 30}\n"
    )
    assert wf.map.agent_timeout_s == 5.0


def test_timeout_config_enums_are_pascal_case() -> None:
    problem = only_problem(
        "name: t\nmap:\n  input: x\n  agent_template: []\n  timeout_config: {timeout_action: dlq}\n"
    )
    assert problem.path == "map.timeout_config.timeout_action"
    assert "Dlq" in problem.message


# -- steps ---------------------------------------------------------------------------------

STEP_FILE = "name: s\nmap:\n  input: x\n  agent_template:\n    - shell: ok\n{steps}"


def step_problem(steps: str) -> Problem:
    return only_problem(STEP_FILE.format(steps=steps))


def test_step_without_command_names_its_path() -> None:
    problem = step_problem("    - name: nothing\n")
    assert problem.path == "map.agent_template[1]"
    assert "expected exactly one of shell, claude, write_file" in problem.message
    assert (problem.line, problem.column) == (6, 7)


def test_step_with_two_commands() -> None:
    problem = step_problem("    - shell: a\n      claude: /b\n")
    assert problem.path == "map.agent_template[1]"
    assert "2 commands (shell, claude)" in problem.message


def test_bare_string_step_gets_a_hint() -> None:
    problem = step_problem("    - echo hello\n")
    assert problem.path == "map.agent_template[1]"
    assert "did you mean `- shell: echo hello`?" in problem.message


@pytest.mark.parametrize("kind", ["foreach", "goal_seek"])
def test_foreach_and_goal_seek_are_not_supported(kind: str) -> None:
    problem = step_problem(f"    - {kind}:\n        x: 1\n")
    assert problem.path == f"map.agent_template[1].{kind}"
    assert "not supported in MapReduce workflows" in problem.message
    assert problem.line == 6


def test_empty_shell_command() -> None:
    problem = step_problem('    - shell: ""\n')
    assert problem.path == "map.agent_template[1].shell"
    assert problem.message == "must not be empty"


def test_step_modifiers_and_extras() -> None:
    wf = workflow(
        """\
        name: m
        map:
          input: x
          agent_template:
            - shell: make
              name: build
              capture_output: true
              capture: result
              capture_format: json
              working_dir: sub
              env: {LEVEL: 3}
              commit_required: true
              when: "${item.ok}"
              on_failure:
                claude: /fix
                max_attempts: 3
                fail_workflow: false
              validate:
                shell: check
                threshold: 90
            - claude: /x
              capture_output: my_var
        """
    )
    first, second = wf.map.agent_template
    assert first.name == "build"
    assert first.capture_output is True
    assert (first.capture, first.capture_format, first.working_dir) == ("result", "json", "sub")
    assert first.env == {"LEVEL": "3"}
    assert first.commit_required is True
    assert first.when == "${item.ok}"
    assert first.on_failure == OnFailure(
        handlers=[Step(claude="/fix")], continue_on_error=[False], max_attempts=3
    )
    assert first.extra == {"validate": {"shell": "check", "threshold": 90}}
    assert second.capture_output == "my_var"
    assert second.capture_format == "string"


def test_step_modifier_type_errors() -> None:
    problems = problems_of(
        STEP_FILE.format(
            steps="    - shell: a\n      capture_format: xml\n      commit_required: sometimes\n"
        )
    )
    assert [(p.path, p.line) for p in problems] == [
        ("map.agent_template[1].capture_format", 7),
        ("map.agent_template[1].commit_required", 8),
    ]
    assert "expected one of string, json, lines, number, boolean, got 'xml'" in problems[0].message
    assert problems[1].message == "expected true or false, got 'sometimes'"


def test_write_file_step() -> None:
    wf = workflow(
        """\
        name: w
        map: {input: x, agent_template: []}
        reduce:
          - write_file:
              path: out/results.json
              content: "${map.results}"
              format: json
              mode: 0600
              create_dirs: true
          - write_file: {path: a.txt, content: ""}
        """
    )
    assert wf.reduce is not None
    full, default = (step.write_file for step in wf.reduce.steps)
    assert full is not None and default is not None
    assert (full.path, full.content, full.format, full.mode, full.create_dirs) == (
        "out/results.json",
        "${map.results}",
        "json",
        "0600",
        True,
    )
    assert (default.format, default.mode, default.create_dirs) == ("text", "0644", False)
    assert wf.reduce.steps[0].kind == "write_file"


def test_write_file_errors() -> None:
    problems = problems_of(
        """\
        name: w
        map: {input: x, agent_template: []}
        reduce:
          - write_file:
              path: out.txt
              format: xml
              mode: rwx
        """
    )
    assert [p.path for p in problems] == [
        "reduce[0].write_file.content",
        "reduce[0].write_file.format",
        "reduce[0].write_file.mode",
    ]
    assert problems[0].message == "required key is missing"


# -- error policy --------------------------------------------------------------------------


def test_error_policy_and_aliases() -> None:
    wf = workflow(
        """\
        name: p
        map: {input: x, agent_template: []}
        error_policy:
          on_item_failure: retry
          continue_on_failure: true
          max_failures: 2
          failure_threshold: 0.2
          error_collection: aggregate
          circuit_breaker: {failure_threshold: 5, timeout: 30s}
          retry_config:
            max_attempts: 4
            backoff:
              exponential: {initial: 2s, multiplier: 3}
        continue_on_failure: false
        max_failures: 7
        error_collection: batched:10
        """
    )
    policy = wf.error_policy
    assert policy.on_item_failure == "retry"
    assert policy.continue_on_failure is False  # alias overrides error_policy
    assert policy.max_failures == 7
    assert policy.failure_threshold == 0.2
    assert policy.extra == {"error_collection": "batched:10"}
    assert policy.circuit_breaker == CircuitBreakerConfig(failure_threshold=5, timeout_s=30.0)
    assert policy.retry == RetryConfig(
        max_attempts=4, initial_delay_s=2.0, multiplier=3.0, backoff="exponential"
    )


@pytest.mark.parametrize(
    ("backoff", "expected"),
    [
        (
            "{fixed: {delay: {secs: 5, nanos: 0}}}",
            RetryConfig(initial_delay_s=5.0, multiplier=1.0, backoff="fixed"),
        ),
        (
            "{linear: {initial: 1s, increment: 500ms}}",
            RetryConfig(initial_delay_s=1.0, increment_s=0.5, backoff="linear"),
        ),
        ("{fibonacci: {initial: 3}}", RetryConfig(initial_delay_s=3.0, backoff="fibonacci")),
    ],
)
def test_retry_backoff_kinds(backoff: str, expected: RetryConfig) -> None:
    wf = workflow(
        "name: p\nmap: {input: x, agent_template: []}\n"
        f"error_policy:\n  retry_config:\n    backoff: {backoff}\n"
    )
    assert wf.error_policy.retry == expected


def test_error_policy_problems_all_reported() -> None:
    problems = problems_of(
        """\
        name: p
        map: {input: x, agent_template: []}
        error_policy:
          failure_threshold: 1.5
          error_collection: sometimes
          retry_config:
            max_attempts: 0
            backoff: {quadratic: {}}
        """
    )
    assert [p.path for p in problems] == [
        "error_policy.failure_threshold",
        "error_policy.error_collection",
        "error_policy.retry_config.max_attempts",
        "error_policy.retry_config.backoff",
    ]


def test_error_collection_mapping_form() -> None:
    wf = workflow(
        "name: p\nmap: {input: x, agent_template: []}\n"
        "error_policy:\n  error_collection: {batched: {size: 4}}\n"
    )
    assert wf.error_policy.extra["error_collection"] == "batched:4"


# -- extras and unknown keys ---------------------------------------------------------------


def test_prodigy_top_level_extras_are_kept() -> None:
    wf = workflow(
        """\
        name: x
        secrets:
          TOKEN: "${env:GH_TOKEN}"
          KEY: {provider: file, key: /run/key}
        env_files: [.env]
        profiles:
          dev: {description: Dev, DEBUG: "true"}
        merge:
          commands:
            - shell: git merge
          timeout: 900
        map: {input: x, agent_template: []}
        """
    )
    assert wf.secrets == {
        "TOKEN": Secret(provider="env", key="GH_TOKEN"),
        "KEY": Secret(provider="file", key="/run/key"),
    }
    assert wf.env_files == [".env"]
    assert wf.profiles == {"dev": {"DEBUG": "true"}}
    assert wf.extra == {
        "merge": {"commands": [{"shell": "git merge"}], "timeout": 900},
    }


def test_merge_mapping_without_commands_is_an_error() -> None:
    problem = only_problem(
        "name: x\nmerge: {invalid_key: 1}\nmap: {input: x, agent_template: []}\n"
    )
    assert problem.path == "merge"
    assert "commands" in problem.message


def test_merge_steps_are_validated() -> None:
    problem = only_problem("name: x\nmerge:\n  - git merge\nmap: {input: x, agent_template: []}\n")
    assert problem.path == "merge[0]"


def test_unknown_keys_are_warnings_with_lines() -> None:
    result = parse(
        """\
        name: u
        timeout: 60
        retry_config: {max_attempts: 2}
        map:
          input: x
          max_paralel: 3
          agent_template:
            - shell: a
              captur: out
        """
    )
    warnings = [(w.path, w.line, w.column, w.severity) for w in result.warnings]
    assert warnings == [
        ("timeout", 2, 1, "warning"),
        ("retry_config", 3, 1, "warning"),
        ("map.max_paralel", 6, 3, "warning"),
        ("map.agent_template[0].captur", 9, 7, "warning"),
    ]
    messages = [w.message for w in result.warnings]
    assert "error_policy" in messages[1]
    assert "did you mean 'max_parallel'?" in messages[2]
    assert "did you mean 'capture'?" in messages[3]
    assert result.workflow.map.max_parallel == 10


# -- all errors at once and the exception --------------------------------------------------

BROKEN = """\
name: ""
env:
  NESTED: {a: 1}
map:
  input: x
  max_parallel: abc
  agent_template:
    - shell: ok
    - echo bare
    - {shell: a, claude: /b}
reduce:
  - foreach: {foreach: [1], do: []}
bogus: 1
"""


def test_all_errors_are_reported_at_once_in_file_order() -> None:
    with pytest.raises(WorkflowInvalid) as caught:
        parse_workflow(BROKEN, source="broken.yml")
    error = caught.value
    assert [(p.path, p.line) for p in error.problems] == [
        ("name", 1),
        ("env.NESTED", 3),
        ("map.max_parallel", 6),
        ("map.agent_template[1]", 9),
        ("map.agent_template[2]", 10),
        ("reduce[0].foreach", 12),
    ]
    assert all(p.severity == "error" for p in error.problems)
    assert [(w.path, w.line) for w in error.warnings] == [("bogus", 13)]
    rendered = str(error).splitlines()
    assert rendered[0] == "broken.yml: invalid workflow (6 problems)"
    assert rendered[3] == (
        "  broken.yml:6:17: map.max_parallel: expected an integer or $VAR, got 'abc'"
    )


def test_workflow_invalid_is_a_value_error_and_pickles() -> None:
    with pytest.raises(ValueError) as caught:
        parse_workflow(BROKEN, source="b.yml")
    assert isinstance(caught.value, WorkflowInvalid)
    copy = pickle.loads(pickle.dumps(caught.value))
    assert copy.problems == caught.value.problems
    assert str(copy) == str(caught.value)


# -- the Prodigy examples ------------------------------------------------------------------


def example_files() -> list[Path]:
    files = sorted(EXAMPLES.glob("*.yml"))
    assert files, f"no examples found in {EXAMPLES}"
    return files


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_prodigy_example(path: Path) -> None:
    text = path.read_text()
    if path.name in INVALID_EXAMPLES:
        line, fragment = INVALID_EXAMPLES[path.name]
        with pytest.raises(WorkflowInvalid) as caught:
            parse_workflow(text, source=path.name)
        problem, *more = caught.value.problems
        assert problem.line == line
        assert fragment in f"{problem.path} {problem.message}"
        expected = MORE_PROBLEMS.get(path.name, [])
        assert [p.line for p in more] == [n for n, _ in expected]
        for p, (_, text) in zip(more, expected, strict=True):
            assert text in p.message
    else:
        result = parse_workflow(text, source=path.name)
        assert result.workflow.mode == "mapreduce"
        expected = ["merge"] if "\nmerge:" in text else []
        assert [w.path for w in result.warnings] == expected


def test_invalid_example_list_matches_the_files() -> None:
    names = {p.name for p in example_files()}
    assert set(INVALID_EXAMPLES) <= names


def test_debtmap_example_details() -> None:
    wf = workflow((EXAMPLES / "debtmap-reduce.yml").read_text())
    assert wf.setup is not None and wf.setup.timeout_s == 900.0
    assert wf.map.max_parallel == 5
    assert wf.map.filter == "File.score >= 10 OR Function.unified_score.final_score >= 10"
    assert wf.map.sort_by is not None and wf.map.sort_by.endswith("DESC NULLS LAST")
    assert wf.map.max_items == 10
    plan, implement, test, _lint = wf.map.agent_template
    assert plan.capture_output is True and "validate" in plan.extra
    assert implement.commit_required is True
    assert test.on_failure is not None and test.on_failure.max_attempts == 5
    assert test.on_failure.fail_workflow and test.on_failure.handlers[0].claude is not None
    assert wf.reduce is not None
    write = wf.reduce.steps[4].write_file
    assert write is not None and write.format == "json" and write.create_dirs


def test_syntax_drift_example_details() -> None:
    wf = workflow((EXAMPLES / "workflow-syntax-drift.yml").read_text())
    assert wf.map.agent_timeout_s == 300.0
    assert wf.error_policy.max_failures == 2
    assert wf.error_policy.extra == {"error_collection": "aggregate"}
    assert len(wf.extra["merge"]) == 5


def test_merge_is_warned_about_with_the_reason_at_its_key() -> None:
    """``merge:`` has nothing to act on here (no session worktree): validate says so instead
    of ignoring it silently (issue 16)."""
    text = (EXAMPLES / "workflow-syntax-drift.yml").read_text()
    (warning,) = parse_workflow(text, source="drift.yml").warnings
    line = text.splitlines().index("merge:") + 1
    assert (warning.path, warning.line, warning.column) == ("merge", line, 1)
    assert "`merge:` is checked but not run" in warning.message
    assert "no session worktree" in warning.message
    assert warning.render("drift.yml").startswith(f"drift.yml:{line}:1: warning: merge: ")


def test_command_input_example_takes_timeout_config() -> None:
    wf = workflow((EXAMPLES / "mapreduce-command-input.yml").read_text())
    assert wf.map.input == "find . -name '*.rs' -type f | head -20"
    assert wf.map.agent_timeout_s == 30.0
