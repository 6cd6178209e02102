"""Hostile workflow files (issue 8, invariant 5): whatever text arrives on ``workflow.submit``,
`parse_workflow` returns a `ParseResult` or raises `WorkflowInvalid` with at least one problem
that carries a message. Never another exception (the planner's handler would crash and the
submitter would get no answer), never a hang (each example is bounded by hypothesis'
deadline, the test by a pytest timeout).

Example counts are modest on purpose: the whole file runs in well under 30 s on a slow two-core
machine. The regression tests at the end pin each crash the fuzzing found, so they fail at once
if a fix is lost, without depending on hypothesis finding the input again.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jetreduce.contract.events import Problem as EventProblem
from jetreduce.contract.events import WorkflowRejected, encode
from jetreduce.contract.workflow import Workflow, WorkflowInvalid, parse_duration
from jetreduce.lang import ParseResult, parse_workflow, workflow_text
from jetreduce.lang.parse import MAX_PROBLEMS

FUZZ = settings(
    max_examples=60,
    deadline=2000,  # ms per example: generous for a loaded CI machine, far below a hang
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,  # the same examples every run: a CI failure reproduces locally
)

pytestmark = pytest.mark.timeout(120)

VALID = """\
name: fuzz
mode: mapreduce
env:
  N: "4"
setup:
  - shell: "echo setup"
    timeout: 30s
map:
  input: items.json
  json_path: "$.items[*]"
  max_parallel: $N
  agent_timeout_secs: 600
  agent_template:
    - shell: "echo ${item.name}"
      timeout: 1m
      on_failure:
        shell: "echo failed"
reduce:
  - shell: "echo done"
error_policy:
  max_failures: 3
  retry_config:
    max_attempts: 2
    backoff:
      exponential: {initial: 1s, multiplier: 2}
"""
BASE: dict[str, Any] = yaml.safe_load(VALID)

MAX_NATS_PAYLOAD = 1024 * 1024
"""nats-server's default max_payload: a rejection must fit in one message."""


def check(text: str, env: dict[str, str] | None = None) -> ParseResult | WorkflowInvalid:
    """The property every input must satisfy; returns the outcome for extra assertions."""
    try:
        result = parse_workflow(text, env=env, source="fuzz.yml")
    except WorkflowInvalid as exc:
        assert exc.problems, "WorkflowInvalid without a problem"
        assert all(p.message.strip() for p in exc.problems)
        assert len(exc.problems) <= MAX_PROBLEMS + 1
        rejected = WorkflowRejected(
            workflow_id="wf-1",
            problems=[EventProblem(path=p.path, message=p.message) for p in exc.problems],
        )
        assert len(encode(rejected)) < MAX_NATS_PAYLOAD
        str(exc)  # renders
        return exc
    assert isinstance(result, ParseResult)
    # The spec travels on the wire (workflow.submit, the spec KV entry): it must encode and
    # decode back, whatever the file held.
    data = msgspec.json.encode(result.workflow)
    msgspec.json.decode(data, type=Workflow)
    return result


# -- strategies ------------------------------------------------------------------------------

YAML_CHARS = list("abcxyz019 \t\n:-[]{},&*!|>'\"#%@`?$.\\~=")
yamlish = st.text(alphabet=st.sampled_from(YAML_CHARS), max_size=400)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["", "$", "${}", "$N", "${N}", "$MISSING", "${N", "$$N", "30s", "-1s", "0"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)

# Every path of the valid file, so a mutation hits real keys (wrong types where they count).
PATHS: list[tuple[Any, ...]] = []


def _collect(node: Any, path: tuple[Any, ...]) -> None:
    PATHS.append(path)
    if isinstance(node, dict):
        for key, value in node.items():
            _collect(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _collect(value, (*path, i))


_collect(BASE, ())


def replaced(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc: Any = json.loads(json.dumps(BASE))
    if not path:
        return value  # type: ignore[no-any-return]
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc  # type: ignore[no-any-return]


def dump(doc: Any, as_json: bool) -> str:
    if as_json:
        return json.dumps(doc, allow_nan=True)
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


DURATION_PATHS = [
    ("setup", 0, "timeout"),
    ("map", "agent_timeout_secs"),
    ("map", "agent_template", 0, "timeout"),
    ("error_policy", "retry_config", "backoff", "exponential", "initial"),
]
durations = st.one_of(
    st.text(alphabet=st.sampled_from(list("0123456789.smhdwMyµn uµ-+e")), max_size=30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.builds(lambda n: "9" * n + "s", st.integers(300, 5000)),
    st.fixed_dictionaries({"secs": st.integers(-5, 2**80)}, optional={"nanos": values}),
)

var_names = st.text(alphabet=st.sampled_from(list("AZaz09_-{}$ .é")), max_size=12)
var_refs = st.builds(
    lambda a, b, c: f"{a}{b}{c}",
    st.sampled_from(["$", "${", "$$", ""]),
    var_names,
    st.sampled_from(["", "}", "}}", "s"]),
)


# -- properties ------------------------------------------------------------------------------


def test_the_valid_base_file_parses() -> None:
    """The mutations below start from this file: if it did not parse, they would prove little."""
    result = check(VALID)
    assert isinstance(result, ParseResult)
    assert result.workflow.map.max_parallel == 4


@settings(FUZZ, max_examples=200)
@given(yamlish)
def test_random_yamlish_text(text: str) -> None:
    check(text)


@settings(FUZZ, max_examples=150)
@given(st.text(max_size=300))
def test_random_unicode_text(text: str) -> None:
    check(text)


@FUZZ
@given(st.sampled_from(PATHS), values, st.booleans())
def test_valid_keys_with_wrong_types(path: tuple[Any, ...], value: Any, as_json: bool) -> None:
    check(dump(replaced(path, value), as_json))


@FUZZ
@given(values, st.booleans())
def test_random_structures(doc: Any, as_json: bool) -> None:
    check(dump(doc, as_json))


@FUZZ
@given(st.sampled_from(DURATION_PATHS), durations)
def test_bad_durations(path: tuple[Any, ...], value: Any) -> None:
    outcome = check(dump(replaced(path, value), as_json=False))
    if isinstance(outcome, ParseResult):
        wf = outcome.workflow
        for seconds in (wf.map.agent_timeout_s, wf.map.agent_template[0].timeout_s):
            assert seconds is None or (math.isfinite(seconds) and 0 <= seconds <= 1e9)


@FUZZ
@given(st.text(max_size=40))
def test_parse_duration_raises_only_value_error(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ValueError:
        return
    assert math.isfinite(seconds) and seconds >= 0


@FUZZ
@given(
    var_refs,
    st.dictionaries(var_names, st.text(max_size=30), max_size=3),
    st.dictionaries(var_names, st.text(max_size=30), max_size=3),
    st.sampled_from(
        [("map", "max_parallel"), ("map", "agent_timeout_secs"), ("setup", 0, "timeout")]
    ),
)
def test_variable_oddities(
    ref: str, workflow_env: dict[str, str], process_env: dict[str, str], path: tuple[Any, ...]
) -> None:
    doc = replaced(path, ref)
    doc["env"] = workflow_env
    check(dump(doc, as_json=False), env=process_env)


@settings(FUZZ, max_examples=15)
@given(
    st.sampled_from(PATHS[1:]),
    st.integers(min_value=10_000, max_value=300_000),
    st.sampled_from(["x", "é", "9", ":0", "$", "\\", "a.b *>"]),
)
def test_huge_strings(path: tuple[Any, ...], size: int, unit: str) -> None:
    check(dump(replaced(path, unit * (size // len(unit))), as_json=False))


@settings(FUZZ, max_examples=20, deadline=None)  # 5,000 levels: seconds on a loaded machine
@given(
    st.integers(min_value=1, max_value=5000),
    st.sampled_from(["flow", "block", "json", "json-list"]),
    st.sampled_from(PATHS[1:]),
)
def test_deep_nesting(depth: int, style: str, path: tuple[Any, ...]) -> None:
    if style == "flow":
        deep = "[" * depth + "]" * depth
    elif style == "json":
        deep = '{"a": ' * depth + "1" + "}" * depth
    elif style == "json-list":
        deep = "[" * depth + "1" + "]" * depth
    else:
        deep = "\n" + "".join("  " * (i + 2) + f"k{i}:\n" for i in range(depth))
    text = dump(replaced(path, "__DEEP__"), as_json=style.startswith("json"))
    check(text.replace('"__DEEP__"', deep).replace("__DEEP__", deep))


# -- regressions: each crash or hang the fuzzing found ----------------------------------------


def problems_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(WorkflowInvalid) as info:
        parse_workflow(text, env=env)
    return [p.message for p in info.value.problems]


def with_map(extra: str) -> str:
    return VALID.replace("  max_parallel: $N\n", extra)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("a: " + "[" * 5000 + "]" * 5000, id="flow"),
        pytest.param('{"a": ' * 3000 + "1" + "}" * 3000, id="json"),
        pytest.param("".join("  " * i + f"k{i}:\n" for i in range(2000)), id="block"),
        pytest.param(VALID + "profiles: " + "[" * 900 + "]" * 900 + "\n", id="in-extra"),
    ],
)
def test_deep_nesting_is_rejected_not_a_recursion_error(text: str) -> None:
    # Was RecursionError from PyYAML's composer (and from the verbatim copy of extras).
    assert any("nesting deeper than" in m for m in problems_of(text))


def test_alias_bomb_is_rejected_quickly() -> None:
    # Was ~10 s and exponential memory: the verbatim copy expanded every alias.
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefg", "bcdefgh", strict=True):
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    text = VALID + "merge:\n" + "".join(f"  {line}\n" for line in levels)
    started = time.monotonic()
    messages = problems_of(text)
    assert time.monotonic() - started < 5
    assert any("once YAML aliases are expanded" in m for m in messages)


@pytest.mark.parametrize(
    ("extra", "env"),
    [
        pytest.param("  max_parallel: '" + "9" * 5000 + "'\n", None, id="5000-digit-string"),
        pytest.param("  max_parallel: '²'\n", None, id="unicode-digit"),
        pytest.param("  max_parallel: $BIG\n", {"BIG": "9" * 5000}, id="5000-digit-var"),
        pytest.param("  max_parallel: " + "9" * 30 + "\n", None, id="beyond-64-bits"),
        pytest.param("  max_items: 1" + ":00" * 30000 + "\n", None, id="sexagesimal"),
    ],
)
def test_oversized_and_odd_integers_are_rejected(extra: str, env: dict[str, str] | None) -> None:
    # Were ValueError (int() beyond 4300 digits, int('²')) or a quadratic-time conversion.
    started = time.monotonic()
    assert problems_of(with_map(extra), env)
    assert time.monotonic() - started < 2


def test_batched_error_collection_with_a_huge_size_is_rejected() -> None:
    # Was ValueError from int() on a 5000-digit batch size.
    text = VALID + "error_collection: 'batched:" + "9" * 5000 + "'\n"
    assert any("batched:N" in m for m in problems_of(text))


@pytest.mark.parametrize(
    "timeout",
    [".inf", ".nan", "'" + "9" * 400 + "s'", "{secs: " + "9" * 400 + "}", "2000000000"],
)
def test_non_finite_or_endless_durations_are_rejected(timeout: str) -> None:
    # Were accepted as inf/nan (no timer takes them) or crashed with OverflowError.
    text = VALID.replace("      timeout: 1m\n", f"      timeout: {timeout}\n")
    assert problems_of(text)


def test_nan_multiplier_is_rejected() -> None:
    # Was accepted: `nan < 1.0` is false, so the minimum check let it through.
    text = VALID.replace("multiplier: 2}", "multiplier: .nan}")
    assert any("finite" in m for m in problems_of(text))


def test_huge_keys_give_short_messages_and_few_problems() -> None:
    # Unbounded, these made a rejection larger than a NATS message: the planner could not
    # publish its answer.
    keys = "".join(f"unknown_{i}_{'k' * 300}: 1\n" for i in range(5000))
    text = "name: [bad]\nmode: " + "m" * 100_000 + "\n" + keys + "map: {}\n"
    with pytest.raises(WorkflowInvalid) as info:
        parse_workflow(text)
    warnings, errors = info.value.warnings, info.value.problems
    assert len(warnings) == MAX_PROBLEMS + 1 and "more warnings" in warnings[-1].message
    assert any("unsupported mode" in p.message for p in errors)
    assert all(len(p.message) <= 500 and len(p.path) <= 500 for p in [*errors, *warnings])
    check(text)


def test_oversized_file_is_refused_unread() -> None:
    assert any("too large" in m for m in problems_of("x" * (5 * 1024 * 1024)))


def test_parse_duration_refuses_an_infinite_result() -> None:
    with pytest.raises(ValueError, match="too large"):
        parse_duration("9" * 400 + "s")


# -- the JSON-object form of a submission ------------------------------------------------------


def check_object(doc: Any) -> None:
    """A submitted object goes through `workflow_text`, then the parser: same property."""
    try:
        text = workflow_text(doc)
    except WorkflowInvalid as exc:
        assert exc.problems and all(p.message for p in exc.problems)
        return
    check(text)


@FUZZ
@given(st.sampled_from(PATHS), values)
def test_submitted_objects(path: tuple[Any, ...], value: Any) -> None:
    doc = replaced(path, value)
    check_object(doc if isinstance(doc, dict) else {"name": doc})


def test_a_valid_object_parses() -> None:
    assert isinstance(check(workflow_text(BASE)), ParseResult)


@pytest.mark.parametrize("depth", [63, 64, 65, 600, 100_000])
def test_a_deeply_nested_object_is_rejected_not_a_recursion_error(depth: int) -> None:
    # yaml.safe_dump, which the planner used for this form, died of RecursionError at ~600.
    deep: Any = 1
    for _ in range(depth):
        deep = {"a": deep}
    check_object({**BASE, "profiles": deep})
    if depth > 64:
        with pytest.raises(WorkflowInvalid, match="nesting deeper"):
            parse_workflow(workflow_text({**BASE, "profiles": deep}))
