"""An item named on the command line (``jetreduce logs``, ``dlq show``/``retry``) is read as
its subject carries it: ASCII digits, with or without ``item_``; anything else is a usage
error naming it, never a traceback."""

from __future__ import annotations

import pytest
import typer

from jetreduce.cli.options import item_argument


@pytest.mark.parametrize(("text", "index"), [("7", 7), ("item_7", 7), ("item_0", 0)])
def test_an_item_is_its_index(text: str, index: int) -> None:
    assert item_argument(text) == index


@pytest.mark.parametrize("text", ["²", "item_٣", "x", "", "item_", "-1", "1.5"])
def test_anything_else_is_a_usage_error_that_names_it(text: str) -> None:
    with pytest.raises(typer.BadParameter, match="is not an item id"):
        item_argument(text)
