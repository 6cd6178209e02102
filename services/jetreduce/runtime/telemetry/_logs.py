"""Structured (JSON) log lines, and the workflow / item a line is about.

``--log-format json`` (or ``JETREDUCE_LOG_FORMAT=json``) makes every line one JSON object:
``ts`` (RFC 3339, UTC), ``level``, ``logger``, ``message``, then ``workflow_id`` and
``item_id`` when the code that logged was working on one, ``trace_id``/``span_id`` when a
span is current, and ``exception`` for a traceback. Log shippers then index by workflow
without parsing messages.

The ids travel in context variables, bound where the work starts (:func:`bind`): an agent
binds its workflow once and each item's task binds its item, and asyncio gives every task a
copy of the context, so concurrent items never see each other's id. Secrets are masked
before formatting by the agent's ``MaskingFilter`` on the handlers, as for plain lines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from jetreduce.runtime.telemetry._setup import _STATE

__all__ = ["LOG_FORMATS", "JsonFormatter", "bind", "bound", "current_ids"]

LOG_FORMATS = ("text", "json")

_workflow: ContextVar[str | None] = ContextVar("jetreduce_workflow_id", default=None)
_item: ContextVar[str | None] = ContextVar("jetreduce_item_id", default=None)


def bind(*, workflow_id: str | None = None, item_id: str | None = None) -> None:
    """Attach ids to every log line from here on, in this task (and tasks it starts)."""
    if workflow_id is not None:
        _workflow.set(workflow_id)
    if item_id is not None:
        _item.set(item_id)


@contextlib.contextmanager
def bound(*, workflow_id: str | None = None, item_id: str | None = None) -> Iterator[None]:
    """As :func:`bind`, for the block only (a service handling one event after another)."""
    tokens = []
    if workflow_id is not None:
        tokens.append((_workflow, _workflow.set(workflow_id)))
    if item_id is not None:
        tokens.append((_item, _item.set(item_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def current_ids() -> dict[str, str]:
    ids = {}
    if (wf := _workflow.get()) is not None:
        ids["workflow_id"] = wf
    if (item := _item.get()) is not None:
        ids["item_id"] = item
    return ids


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring for the fields)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(current_ids())
        if _STATE.tracer is not None:
            line.update(_trace_ids())
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


def _rfc3339(created: float) -> str:
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{whole}.{int(created % 1 * 1000):03d}Z"


def _trace_ids() -> dict[str, str]:
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}
