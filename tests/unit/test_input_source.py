"""Streamed input (lang/pipeline/source.py): line-form command output is read line by line,
twice, and gives exactly the items the whole-document rules give; planning it holds one item
at a time however many lines there are."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jetreduce.lang.pipeline import (
    InputItems,
    ItemPipeline,
    parse_input_document,
    run_pipeline,
)

STAGES: list[dict[str, Any]] = [
    {},
    {"filter": "n > 2"},
    {"offset": 2, "max_items": 3},
    {"distinct": "k"},
    {"sort_by": "n DESC"},
    {"filter": "n >= 1", "distinct": "k", "offset": 1, "max_items": 2},
]


def whole(data: bytes, lenient: bool, **stages: Any) -> list[Any]:
    return run_pipeline(parse_input_document(data, lenient_lines=lenient), **stages)


def source(tmp_path: Path, data: bytes, lenient: bool = True, **stages: Any) -> InputItems:
    path = tmp_path / "input"
    path.write_bytes(data)
    return InputItems(path, lenient_lines=lenient, pipeline=ItemPipeline(**stages))


LINES = b'{"n": 1, "k": "a"}\n\n{"n": 5, "k": "b"}\r\n{"n": 3, "k": "a"}\nplain text\n{"n": 4}\n'


@pytest.mark.parametrize("stages", STAGES, ids=lambda s: ",".join(s) or "none")
def test_streamed_lines_give_the_documents_items(tmp_path: Path, stages: dict[str, Any]) -> None:
    items = source(tmp_path, LINES, **stages)
    assert items.streamed == ("sort_by" not in stages)  # sorting reads them all, once
    expected = whole(LINES, True, **stages)
    assert expected, "every stage keeps some items, so the comparison means something"
    assert list(items) == expected
    assert list(items) == expected  # the second pass (enqueue) sees the same items
    assert items.scan(1 << 30) == (len(expected), set())


@pytest.mark.parametrize(
    ("data", "lenient", "streamed"),
    [
        (b"1\n2\n3\n", True, True),  # seq
        (b"\xef\xbb\xbfalpha\nbeta\n", True, True),  # BOM, plain lines
        (b"[1,\n 2,\n 3]\n", True, False),  # one JSON document over lines
        (b'{"items":\n [1, 2]}\n', True, False),
        (b"[not json\nsecond\n", True, False),  # opens like JSON: the document rules decide
        (b"[1, 2, 3]\n", True, False),  # a single line is a document
        (b"", True, False),
        (b"1\n2\n", False, False),  # a file is always a JSON document
    ],
)
def test_which_inputs_stream(tmp_path: Path, data: bytes, lenient: bool, streamed: bool) -> None:
    if not lenient:
        with pytest.raises(ValueError, match="not valid JSON"):
            source(tmp_path, data, lenient)
        return
    items = source(tmp_path, data, lenient)
    assert items.streamed is streamed
    assert list(items) == whole(data, lenient)


def test_a_json_path_reads_the_whole_document(tmp_path: Path) -> None:
    items = source(tmp_path, b"a\nb\n", json_path="$[*].item")
    assert not items.streamed
    assert list(items) == ["a", "b"]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=12),
            st.integers().map(str),
            st.sampled_from(["[", "{", "]", '"x"', "null", "  ", "{}", "[1]", "\r", "\u2028"]),
        ),
        max_size=8,
    )
)
def test_streaming_never_changes_the_items(lines: list[str]) -> None:
    import tempfile

    data = "\n".join(lines).encode()
    with tempfile.TemporaryDirectory() as tmp:
        items = source(Path(tmp), data)
        assert list(items) == whole(data, True)


def test_planning_a_big_line_input_holds_one_item_at_a_time(tmp_path: Path) -> None:
    n = 200_000
    data = "".join(f'{{"id": {i}, "name": "item number {i}"}}\n' for i in range(n)).encode()
    items = source(tmp_path, data, filter="id >= 0")
    assert items.streamed
    tracemalloc.start()
    try:
        assert items.scan(1 << 30) == (n, set())
        last = None
        for last in items:  # noqa: B007 - only the walk matters
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert last == {"id": n - 1, "name": f"item number {n - 1}"}
    # 200k decoded items take ~60 MB; streaming stays near one line's worth plus buffers.
    assert peak < 2_000_000, f"peak {peak} bytes while streaming"
