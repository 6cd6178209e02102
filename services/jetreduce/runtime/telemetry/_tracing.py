"""Spans and W3C trace context in NATS headers (research/jetstream.md §7).

One trace per workflow. The CLI's submit span is the root; its ``traceparent`` rides in the
``workflow.submit`` headers. The planner's ``accept`` span continues it and its context is
stored with the workflow: ``workflow.accepted`` is published with that ``traceparent``
header, and JetStream keeps headers with the message, so any process can join the trace
later by reading that one stored message (:func:`stored_trace`) — no schema change, and it
works whichever queue carries the items. Phase events carry the context onward in the same
header (``setup.completed`` → the planner's ``plan`` span; ``workflow.planned`` holds the
plan span's context, under which every item attempt is traced).

Work items themselves carry no header: every item of a workflow would carry the same
context, Redis and SQS have no headers to carry it in, and a header per message costs
bytes and parsing on the hottest path. Agents read the planned context once instead.

Every helper is a no-op costing one attribute read when tracing is off; with no
``traceparent`` to continue, headers are still passed through unchanged
(:func:`continue_headers`), so an untraced service does not break a traced chain.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from jetreduce.runtime.telemetry._setup import _STATE

__all__ = [
    "TRACE_HEADERS",
    "continue_headers",
    "messaging",
    "span",
    "stored_trace",
    "trace_headers",
    "tracing_enabled",
]

TRACE_HEADERS = ("traceparent", "tracestate")
"""W3C trace-context header names; lowercase, as nats-py headers are case-sensitive."""


def tracing_enabled() -> bool:
    return _STATE.tracer is not None


def _propagator() -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


def messaging(subject: str, operation: str, message_id: str | None = None) -> dict[str, Any]:
    """Messaging semantic-convention attributes for a NATS publish (``send``) or the
    handling of a received message (``process``)."""
    attributes: dict[str, Any] = {
        "messaging.system": "nats",
        "messaging.destination.name": subject,
        "messaging.operation.type": operation,
    }
    if message_id is not None:
        attributes["messaging.message.id"] = message_id
    return attributes


@contextlib.contextmanager
def span(
    name: str,
    *,
    parent: Mapping[str, str] | None = None,
    kind: str = "internal",
    attributes: Mapping[str, Any] | None = None,
    join_only: bool = False,
) -> Iterator[Any]:
    """A span (the current one inside the block), or None when tracing is off.

    ``parent``: NATS headers holding a ``traceparent`` to continue; without one (or with
    None) the span is a child of the current span, or a new root. ``kind``: ``internal``,
    ``producer``, ``consumer``, ``client`` or ``server``. ``join_only``: no span unless
    ``parent`` has a trace to continue (or, with no ``parent``, a span is current): work
    for a workflow that is not traced, e.g. one submitted before tracing was turned on,
    starts no stray root. An exception escaping the block
    marks the span as failed (type and message only; callers keep secrets out of messages).
    """
    tracer = _STATE.tracer
    if tracer is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    context = None
    if parent is not None and "traceparent" in parent:
        context = _propagator().extract(dict(parent))
    elif join_only and (parent is not None or not _in_span()):
        yield None
        return
    from opentelemetry.trace import Status, StatusCode

    with tracer.start_as_current_span(
        name,
        context=context,
        kind=SpanKind[kind.upper()],
        attributes=dict(attributes) if attributes else None,
        # The SDK's own recording keeps the whole traceback (frames, locals' reprs in
        # messages): only the type and message go on the span, as documented above.
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except BaseException as exc:
            current.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))
            raise


def _in_span() -> bool:
    from opentelemetry import trace

    return bool(trace.get_current_span().get_span_context().is_valid)


def trace_headers(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` plus the current span's ``traceparent`` (nothing added when tracing is off
    or no span is current)."""
    headers = dict(base or {})
    if _STATE.tracer is not None:
        _propagator().inject(headers)
    return headers


def continue_headers(
    incoming: Mapping[str, str] | None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Headers for a message that continues ``incoming``'s trace: the current span's
    context when tracing is on, else ``incoming``'s trace headers copied unchanged."""
    headers = dict(base or {})
    if _STATE.tracer is not None:
        _propagator().inject(headers)
        if "traceparent" in headers:
            return headers
    for key in TRACE_HEADERS:
        if incoming and key in incoming:
            headers[key] = incoming[key]
    return headers


async def stored_trace(js: Any, stream: str, subject: str) -> dict[str, str]:
    """The trace headers stored with the last message on ``subject`` ({} if none): how a
    process joins a workflow's trace from its stored events."""
    try:
        msg = await js.get_last_msg(stream, subject)
    except Exception:
        return {}
    stored = msg.headers or {}
    return {k: stored[k] for k in TRACE_HEADERS if k in stored}
