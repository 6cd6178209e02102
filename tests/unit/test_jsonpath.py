"""json_path selection and field paths (Prodigy's JSONPath subset)."""

from __future__ import annotations

from typing import Any

import pytest

from jetreduce.lang.pipeline import PipelineError, select, validate_json_path
from jetreduce.lang.pipeline.jsonpath import MISSING, lookup, parse_field_path

DOC: dict[str, Any] = {
    "items": [
        {"id": 1, "score": 3, "meta": {"name": "a"}},
        {"id": 2, "score": 7, "meta": {"name": "b"}},
        {"id": 3, "score": 9, "tags": ["x", "y"]},
    ],
    "nested": {"deep": {"name": "c", "list": [[1, 2], [3]]}},
    "odd key": {"v": 1},
}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("$.items[*].id", [1, 2, 3]),
        ("$.items[1].score", [7]),
        ("$.items[9]", []),
        ("$.nested.deep.name", ["c"]),
        ("$['odd key'].v", [1]),
        ('$["nested"]["deep"].name', ["c"]),
        ("$.nested.deep.list[*][*]", [1, 2, 3]),
        ("$.nested.deep.list[0][1]", [2]),
        ("$..name", ["a", "b", "c"]),
        ("$.items[?(@.score > 5)].id", [2, 3]),
        ("$.items[?(@.score > 5 && is_array(@.tags))].id", [3]),
        ("$.items[?(@.meta.name == 'a')].id", [1]),
        ("items[*].id", [1, 2, 3]),
        ("$.missing", []),
        ("$.items.id", []),
    ],
)
def test_select_forms(path: str, expected: list[Any]) -> None:
    assert select(DOC, path) == expected


def test_field_without_wildcard_is_one_item() -> None:
    # Prodigy: "$.items" gives ONE item, the array itself.
    assert select(DOC, "$.items") == [DOC["items"]]


def test_empty_path_splits_top_level_array_only() -> None:
    assert select([1, 2, 3], "") == [1, 2, 3]
    assert select({"a": 1}, "") == [{"a": 1}]
    assert select("x", "") == ["x"]


def test_dollar_alone_is_the_whole_document() -> None:
    assert select([1, 2], "$") == [[1, 2]]


def test_wildcard_over_object_values_extension() -> None:
    assert select({"a": {"b": 1, "c": 2}}, "$.a[*]") == [1, 2]
    assert select({"a": {"b": 1, "c": 2}}, "$.a.*") == [1, 2]


def test_recursive_descent_is_pre_order_and_includes_nested_matches() -> None:
    doc = {"name": 1, "child": {"name": {"name": 2}}}
    assert select(doc, "$..name") == [1, {"name": 2}, 2]


@pytest.mark.parametrize(
    "path", ["$.items[", "$.items[x]", "$..", "$.", "$.items[?(@.a > 1]", "$a"]
)
def test_malformed_paths_raise_with_position(path: str) -> None:
    with pytest.raises(PipelineError) as info:
        validate_json_path(path)
    assert info.value.position is not None


def test_bad_filter_inside_path_raises() -> None:
    with pytest.raises(PipelineError, match="in filter"):
        validate_json_path("$.items[?(@.a >)]")


def test_field_paths() -> None:
    assert parse_field_path("a.b[0].c") == ("a", "b", 0, "c")
    assert parse_field_path("@.a") == ("a",)
    assert parse_field_path("") == ()
    assert parse_field_path("[1]") == (1,)
    for bad in ("a..b", "a.", ".a", "a[x]", "a.[0]"):
        with pytest.raises(PipelineError):
            parse_field_path(bad)


def test_lookup() -> None:
    item = {"a": {"b": [10, {"c": None}]}}
    assert lookup(item, ("a", "b", 0)) == 10
    assert lookup(item, ("a", "b", 1, "c")) is None
    assert lookup(item, ("a", "x")) is MISSING
    assert lookup(item, ("a", "b", "0")) is MISSING  # names do not index arrays
    assert lookup(item, ("a", "b", 5)) is MISSING
    assert lookup(item, ()) is item
