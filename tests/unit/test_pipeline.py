"""The whole pipeline (order of stages, distinct/offset/max_items) and input parsing."""

from __future__ import annotations

from typing import Any

import pytest

from jetreduce.lang.pipeline import (
    ItemPipeline,
    PipelineError,
    parse_input_document,
    parse_input_output,
    run_pipeline,
)

# --- input parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'[{"a": 1}, 2, "x"]', [{"a": 1}, 2, "x"]),
        (b'  {"a": 1}\n', [{"a": 1}]),
        (b"42", [42]),
        (b'"just a string"', ["just a string"]),
        (b"file1.txt\nfile2.txt\n", [{"item": "file1.txt"}, {"item": "file2.txt"}]),
        (b'{"a": 1}\n{"a": 2}\n', [{"a": 1}, {"a": 2}]),  # JSON lines
        (b'  spaced line  \r\n\n\n{"b": true}\n7\n', [{"item": "spaced line"}, {"b": True}, 7]),
        (b"", []),
        (b"  \n\t\n", []),
        (b"\xef\xbb\xbf[1]", [1]),  # UTF-8 BOM
        (b"caf\xe9\n", [{"item": "caf\ufffd"}]),  # invalid UTF-8 in command output: replaced
    ],
)
def test_command_output(data: bytes, expected: list[Any]) -> None:
    assert parse_input_output(data) == expected


def test_file_input_strict() -> None:
    assert parse_input_output(b'{"items": []}', lenient_lines=False) == [{"items": []}]
    assert parse_input_output(b"[1, 2]", lenient_lines=False) == [1, 2]
    with pytest.raises(PipelineError, match="not valid JSON"):
        parse_input_output(b"line one\nline two\n", lenient_lines=False)
    with pytest.raises(PipelineError, match="empty"):
        parse_input_output(b"  ", lenient_lines=False)
    with pytest.raises(PipelineError, match="UTF-8"):
        parse_input_output(b'"\xff"', lenient_lines=False)


def test_document_keeps_objects_for_json_path() -> None:
    doc = parse_input_document(b'{"items": [{"id": 1}, {"id": 2}]}')
    assert run_pipeline(doc, json_path="$.items[*]") == [{"id": 1}, {"id": 2}]
    lines = parse_input_document(b"a\nb\n")
    assert run_pipeline(lines, json_path="$[*].item") == ["a", "b"]


# --- stages ----------------------------------------------------------------------------------

DOC = {
    "items": [
        {"id": 1, "priority": 5, "group": "a"},
        {"id": 2, "priority": 2, "group": "b"},
        {"id": 3, "priority": 8, "group": "a"},
        {"id": 4, "priority": 4, "group": "c"},
        {"id": 5, "priority": 8, "group": "b"},
        {"id": 6, "group": "d"},
    ]
}


def ids(items: list[Any]) -> list[int]:
    return [i["id"] for i in items]


def test_prodigy_complete_pipeline() -> None:
    got = run_pipeline(
        DOC, json_path="$.items[*]", filter="priority > 3", sort_by="priority DESC", max_items=2
    )
    assert ids(got) == [3, 5]


def test_no_options_is_identity_on_arrays() -> None:
    assert run_pipeline(DOC["items"]) == DOC["items"]


def test_distinct_keeps_first_after_sort() -> None:
    got = run_pipeline(DOC, json_path="$.items[*]", sort_by="priority DESC", distinct="group")
    assert ids(got) == [3, 5, 4, 6]  # 3 (a, 8) beats 1 (a, 5); 5 (b, 8) beats 2


def test_distinct_missing_field_counts_as_null() -> None:
    items = [
        {"id": 1},
        {"id": 2, "k": None},
        {"id": 3, "k": {"x": 1, "y": 2}},
        {"id": 4, "k": {"y": 2, "x": 1}},
    ]
    assert ids(run_pipeline(items, distinct="k")) == [1, 3]


def test_order_filter_sort_distinct_offset_max_items() -> None:
    got = run_pipeline(
        DOC,
        json_path="$.items[*]",
        filter="is_not_null(priority)",
        sort_by="priority",
        distinct="priority",
        offset=1,
        max_items=2,
    )
    # filter drops 6; sorted 2,4,5,8,8; distinct → 2,4,5,8 (id 3 first of the 8s); offset 1; max 2
    assert ids(got) == [4, 1]


def test_offset_and_max_items_paging() -> None:
    items = [{"id": n} for n in range(10)]
    assert ids(run_pipeline(items, offset=3, max_items=4)) == [3, 4, 5, 6]
    assert ids(run_pipeline(items, offset=20)) == []
    assert ids(run_pipeline(items, max_items=0)) == []
    assert ids(run_pipeline(items, offset=0)) == list(range(10))


def test_validation_at_construction() -> None:
    with pytest.raises(PipelineError):
        ItemPipeline(filter="priority >")
    with pytest.raises(PipelineError):
        ItemPipeline(sort_by="priority SIDEWAYS")
    with pytest.raises(PipelineError):
        ItemPipeline(json_path="$.items[")
    with pytest.raises(PipelineError):
        ItemPipeline(distinct="a..b")
    with pytest.raises(PipelineError, match="offset"):
        ItemPipeline(offset=-1)
    with pytest.raises(PipelineError, match="max_items"):
        ItemPipeline(max_items=-1)


def test_compiled_pipeline_is_reusable() -> None:
    pipe = ItemPipeline(json_path="$.items[*]", filter="group == 'a'")
    assert ids(pipe(DOC)) == [1, 3]
    assert ids(pipe(DOC)) == [1, 3]


def test_debtmap_scenario() -> None:
    """debtmap-reduce.yml: filter with OR, two-key DESC NULLS LAST sort, max_items 10."""
    files = [{"File": {"path": f"f{n}.rs", "score": s}} for n, s in enumerate([12, 8, 30, 10, 55])]
    funcs = [
        {"Function": {"name": f"fn{n}", "unified_score": {"final_score": s}}}
        for n, s in enumerate([9.5, 10.0, 42.1, 77, 10.5, 3, 11, 12, 13, 14, 15])
    ]
    doc = {"items": [x for pair in zip(funcs, files + [None] * 6, strict=True) for x in pair if x]}
    got = run_pipeline(
        doc,
        json_path="$.items[*]",
        filter="File.score >= 10 OR Function.unified_score.final_score >= 10",
        sort_by="File.score DESC NULLS LAST, Function.unified_score.final_score DESC NULLS LAST",
        max_items=10,
    )
    assert len(got) == 10
    # Files first (File.score non-null), highest first; 8 filtered out.
    assert [g["File"]["score"] for g in got[:4]] == [55, 30, 12, 10]
    # Then functions by final_score DESC; 9.5 and 3 filtered out; cut at 10 items.
    assert [g["Function"]["unified_score"]["final_score"] for g in got[4:]] == [
        77,
        42.1,
        15,
        14,
        13,
        12,
    ]


def test_debtmap_prodigy_test_scenario() -> None:
    scores = [3.0, 7.5, 5.1, 9.2, 4.8, 6.0]
    doc = {"items": [{"unified_score": {"final_score": s}} for s in scores]}
    got = run_pipeline(
        doc,
        json_path="$.items[*]",
        filter="unified_score.final_score >= 5",
        sort_by="unified_score.final_score DESC",
        max_items=3,
    )
    assert [g["unified_score"]["final_score"] for g in got] == [9.2, 7.5, 6.0]
