"""Exact counts the server makes for us (research/jetstream.md §2)."""

from __future__ import annotations

import json
from typing import Any

from jetreduce.contract.errors import TemporaryError

__all__ = [
    "StreamInfoFailed",
    "count_items_in_range",
    "count_messages",
    "count_subjects",
    "item_index",
]


MAX_INDEX_DIGITS = 19
"""Digits of the largest index (``contract.subjects.MAX_INDEX``, 2**63 - 1)."""


class StreamInfoFailed(TemporaryError, RuntimeError):
    """The server answered a stream info request with an error."""


def item_index(token: str) -> int | None:
    """The item index a subject's last token names, or None: only ASCII digits, as
    ``contract/subjects.py`` writes it. ``str.isdigit`` alone lets ``"٣"`` through as 3 (a
    forged result standing in for item 3) and ``"²"`` as a digit ``int`` then refuses."""
    if not (token.isascii() and token.isdigit()) or len(token) > MAX_INDEX_DIGITS:
        return None
    return int(token)


async def count_subjects(nc: Any, stream: str, subject_filter: str, timeout_s: float = 10) -> int:
    """Distinct subjects matching ``subject_filter`` in ``stream``, counted by the server: a
    huge offset returns the total without the subject map. One terminal result per item, so
    on RESULTS this is the exact number of terminal items (O(items) on the server)."""
    resp = await nc.request(
        f"$JS.API.STREAM.INFO.{stream}",
        json.dumps({"subjects_filter": subject_filter, "offset": 1 << 40}).encode(),
        timeout=timeout_s,
    )
    body = json.loads(resp.data)
    if "error" in body:
        raise StreamInfoFailed(f"stream info: {body['error']}")
    return int(body.get("total", 0))


async def count_messages(nc: Any, stream: str, subject: str, timeout_s: float = 10) -> int:
    """Messages stored under one exact ``subject`` in ``stream`` (the server's per-subject
    count: O(1) for one subject)."""
    resp = await nc.request(
        f"$JS.API.STREAM.INFO.{stream}",
        json.dumps({"subjects_filter": subject}).encode(),
        timeout=timeout_s,
    )
    body = json.loads(resp.data)
    if "error" in body:
        raise StreamInfoFailed(f"stream info: {body['error']}")
    return int((body.get("state", {}).get("subjects") or {}).get(subject, 0))


async def count_items_in_range(
    nc: Any, stream: str, subject_filter: str, total: int, timeout_s: float = 30
) -> tuple[int, int]:
    """(items, dead items) among the result subjects matching ``subject_filter``
    (``…item.<done|dead>.<wf>.<index>``) whose index is in ``0..total-1``: the server's list
    of subjects, paged. A subject with any other index (one the workflow does not have:
    forged) is not counted. O(items) on the server and on the wire."""
    items = dead = 0
    offset = 0
    while True:
        resp = await nc.request(
            f"$JS.API.STREAM.INFO.{stream}",
            json.dumps({"subjects_filter": subject_filter, "offset": offset}).encode(),
            timeout=timeout_s,
        )
        body = json.loads(resp.data)
        if "error" in body:
            raise StreamInfoFailed(f"stream info: {body['error']}")
        subjects = (body.get("state") or {}).get("subjects") or {}
        for subject in subjects:
            tokens = subject.rsplit(".", 3)
            index = item_index(tokens[3]) if len(tokens) == 4 else None
            if index is not None and index < total:
                items += 1
                dead += tokens[1] == "dead"
        offset += len(subjects)
        if not subjects or offset >= int(body.get("total", 0)):
            return items, dead
