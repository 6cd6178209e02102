"""sort_by: multi-key, DESC, NULLS FIRST/LAST independent of direction, type ranks, stability."""

from __future__ import annotations

from typing import Any

import pytest

from jetreduce.lang.pipeline import PipelineError, compile_sort, validate_sort


def ids(items: list[dict[str, Any]]) -> list[Any]:
    return [i["id"] for i in items]


ITEMS = [
    {"id": "a", "score": 5, "name": "x"},
    {"id": "b", "score": None, "name": "y"},
    {"id": "c", "score": 9, "name": "x"},
    {"id": "d", "name": "z"},
    {"id": "e", "score": 5, "name": "a"},
]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("score", ["a", "e", "c", "b", "d"]),
        ("score ASC", ["a", "e", "c", "b", "d"]),
        ("score DESC", ["c", "a", "e", "b", "d"]),  # nulls still last with DESC
        ("score desc nulls last", ["c", "a", "e", "b", "d"]),
        ("score NULLS FIRST", ["b", "d", "a", "e", "c"]),
        ("score DESC NULLS FIRST", ["b", "d", "c", "a", "e"]),
        ("score DESCENDING, name", ["c", "e", "a", "b", "d"]),
        ("score DESC, name DESC", ["c", "a", "e", "d", "b"]),
        ("name, score DESC", ["e", "c", "a", "b", "d"]),
        ("score,", ["a", "e", "c", "b", "d"]),
    ],
)
def test_orders(spec: str, expected: list[str]) -> None:
    assert ids(compile_sort(spec)(ITEMS)) == expected


def test_input_untouched() -> None:
    items = list(ITEMS)
    compile_sort("score DESC")(items)
    assert items == ITEMS


def test_nested_paths() -> None:
    items = [{"id": i, "u": {"s": [0, s]}} for i, s in enumerate([3, 1, 2])]
    assert ids(compile_sort("u.s[1]")(items)) == [1, 2, 0]


def test_type_ranking() -> None:
    values: list[Any] = [{"k": 1}, [1, 2], "s", 2.5, True, False, 1, [0], {}]
    items = [{"id": n, "v": v} for n, v in enumerate(values)]
    assert [i["v"] for i in compile_sort("v")(items)] == [
        False,
        True,
        1,
        2.5,
        "s",
        [0],
        [1, 2],
        {},
        {"k": 1},
    ]
    assert [i["v"] for i in compile_sort("v DESC")(items)] == [
        {"k": 1},
        {},
        [1, 2],
        [0],
        "s",
        2.5,
        1,
        True,
        False,
    ]


def test_stable() -> None:
    items = [{"id": n, "k": n % 2} for n in range(10)]
    assert ids(compile_sort("k")(items)) == [0, 2, 4, 6, 8, 1, 3, 5, 7, 9]
    assert ids(compile_sort("k DESC")(items)) == [1, 3, 5, 7, 9, 0, 2, 4, 6, 8]


def test_enum_wrapped_items_nulls_last() -> None:
    # Prodigy's debtmap case: File items and Function items, sorted by two different paths.
    items = [
        {"Function": {"unified_score": {"final_score": 11}}},
        {"File": {"score": 20}},
        {"Function": {"unified_score": {"final_score": 30}}},
        {"File": {"score": 15}},
    ]
    got = compile_sort(
        "File.score DESC NULLS LAST, Function.unified_score.final_score DESC NULLS LAST"
    )(items)
    assert got == [items[1], items[3], items[2], items[0]]


@pytest.mark.parametrize(
    ("spec", "position"),
    [("score DSC", 6), ("score NULLS", 6), ("score NULLS MIDDLE", 12), ("a, b c", 5), ("a..b", 0)],
)
def test_errors(spec: str, position: int) -> None:
    with pytest.raises(PipelineError) as info:
        validate_sort(spec)
    assert info.value.position == position


def test_empty_spec_is_an_error() -> None:
    with pytest.raises(PipelineError, match="no sort fields"):
        validate_sort(" , ")
