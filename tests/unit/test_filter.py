"""The filter language: operators, logic, functions, null rules, errors."""

from __future__ import annotations

from typing import Any

import pytest

from jetreduce.lang.pipeline import PipelineError, compile_filter, validate_filter

ITEM: dict[str, Any] = {
    "severity": "high",
    "priority": 5,
    "ratio": 0.5,
    "active": True,
    "nothing": None,
    "name": "src/main.rs",
    "date": "2024-05-01",
    "tags": ["bug", "ui"],
    "meta": {"owner": "ann", "scores": [3, 8]},
    "File": {"score": 12},
}


def ok(expr: str, item: Any = None) -> bool:
    return compile_filter(expr)(ITEM if item is None else item)


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("severity == 'high'", True),
        ('severity == "high"', True),
        ("severity = 'high'", True),
        ("severity == high", True),  # bare word is a string
        ("severity != 'low'", True),
        ("priority == 5", True),
        ("priority == 5.0", True),
        ("priority > 3", True),
        ("priority >= 5", True),
        ("priority < 5", False),
        ("priority <= 4", False),
        ("ratio < 1", True),
        ("priority > -1", True),
        ("active == true", True),
        ("active == 1", False),  # no bool/number confusion
        ("priority == true", False),
        ("date > '2024-01-01'", True),  # strings compare as strings
        ("date < '2024-01-01'", False),
        ("priority > '3'", False),  # number vs string: false
        ("severity > 3", False),
        ("meta.owner == 'ann'", True),
        ("meta.scores[1] == 8", True),
        ("tags[0] == 'bug'", True),
        ("item.priority == 5", False),  # Prodigy: no item. prefix, so it never matches
    ],
)
def test_comparisons(expr: str, expected: bool) -> None:
    assert ok(expr) is expected


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("missing == null", True),
        ("nothing == null", True),
        ("missing != null", False),
        ("missing == 'x'", False),
        ("missing != 'x'", True),
        ("missing > 1", False),
        ("missing < 1", False),
        ("nothing < 1", False),
        ("is_null(nothing)", True),
        ("is_null(missing)", False),  # Prodigy: a missing field is not "null" here
        ("is_not_null(missing)", False),
        ("is_not_null(priority)", True),
    ],
)
def test_null_rules(expr: str, expected: bool) -> None:
    assert ok(expr) is expected


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("priority > 3 && severity == 'high'", True),
        ("priority > 3 AND severity == 'low'", False),
        ("priority > 9 || severity == 'high'", True),
        ("priority > 9 OR severity == 'low'", False),
        ("priority > 9 or severity == 'high'", True),
        ("!(priority > 9)", True),
        ("!priority > 9", True),
        ("! is_null(priority)", True),
        ("priority > 9 && severity == 'high' || active == true", True),  # OR loosest
        ("priority > 9 && (severity == 'high' || active == true)", False),
        ("((priority == 5))", True),
    ],
)
def test_logic(expr: str, expected: bool) -> None:
    assert ok(expr) is expected


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("severity in ['high', 'critical']", True),
        ('severity in ["low"]', False),
        ("severity in [high, critical]", True),
        ("priority in [5, 6]", False),  # values are strings, numbers never match
        ("priority in ['5']", False),
        ("missing in ['x']", False),
        ("severity in []", False),
    ],
)
def test_in(expr: str, expected: bool) -> None:
    assert ok(expr) is expected


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("contains(name, 'main')", True),
        ("contains(name, main)", True),
        ("contains(tags, 'bug')", False),  # string fields only, as in Prodigy
        ("starts_with(name, 'src/')", True),
        ("ends_with(name, '.rs')", True),
        ("ends_with(name, '.py')", False),
        ("matches(name, '^src/.*\\.rs$')", True),
        ("matches(name, 'main')", True),  # search, not anchored
        ("matches(priority, '5')", False),
        ("is_number(priority)", True),
        ("is_number(active)", False),
        ("is_string(name)", True),
        ("is_bool(active)", True),
        ("is_array(tags)", True),
        ("is_object(meta)", True),
        ("is_object(tags)", False),
        ("length(tags, 2)", True),
        ("length(name, 11)", True),
        ("length(meta, 2)", True),
        ("length(priority, 1)", False),
        ("length(missing, 0)", False),
        ("contains(name, 'a == b') || priority == 5", True),  # operators inside strings
    ],
)
def test_functions(expr: str, expected: bool) -> None:
    assert ok(expr) is expected


def test_jsonpath_style_current_prefix() -> None:
    assert ok("@.priority == 5")


@pytest.mark.parametrize(
    ("expr", "position"),
    [
        ("", 0),
        ("priority >", 10),
        ("priority 5", 9),
        ("priority == 5 &&", 16),
        ("(priority == 5", 14),
        ("priority == 5)", 13),
        ("severity == 'high", 12),
        ("nope(x)", 0),
        ("is_null(a, 'b')", 11),
        ("contains(name)", 13),
        ("length(tags, x)", 13),
        ("matches(name, '(')", 14),
        ("severity in 'a'", 12),
        ("a & b", 2),
        ("name matches 'x'", 5),  # infix function names are not supported (Prodigy neither)
    ],
)
def test_syntax_errors_carry_position(expr: str, position: int) -> None:
    with pytest.raises(PipelineError) as info:
        validate_filter(expr)
    assert info.value.position == position
    assert f"position {position}" in str(info.value)


def test_non_object_items() -> None:
    assert compile_filter("x == null")(42) is True
    assert compile_filter("x == 1")("str") is False
