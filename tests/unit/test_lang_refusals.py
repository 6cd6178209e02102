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
