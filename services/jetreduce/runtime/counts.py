"""Exact counts the server makes for us (research/jetstream.md §2)."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["count_subjects"]


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
        raise RuntimeError(f"stream info: {body['error']}")
    return int(body.get("total", 0))
