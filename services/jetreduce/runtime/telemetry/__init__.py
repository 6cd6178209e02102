"""Telemetry: OpenTelemetry tracing and metrics configured by the standard ``OTEL_*``
variables, a Prometheus ``/metrics`` endpoint, and structured JSON logs.

This is NOT an instrumentation library: it holds the process-wide setup and the few helpers
the services call (a span, trace headers for a NATS message, log ids). With nothing
configured every helper is a no-op and the OpenTelemetry SDK is never imported.
"""

from jetreduce.runtime.telemetry._logs import (
    LOG_FORMATS,
    JsonFormatter,
    bind,
    bound,
    current_ids,
)
from jetreduce.runtime.telemetry._observer import EventMetrics
from jetreduce.runtime.telemetry._prometheus import MetricsServer, render
from jetreduce.runtime.telemetry._setup import (
    DEFAULT_PROMETHEUS_PORT,
    TelemetryConfig,
    configure,
    ensure_prometheus_reader,
    meter,
    prometheus_reader,
    shutdown,
    tracer,
    use_tracer_provider,
)
from jetreduce.runtime.telemetry._tracing import (
    TRACE_HEADERS,
    continue_headers,
    messaging,
    span,
    stored_trace,
    trace_headers,
    tracing_enabled,
)

__all__ = [
    "DEFAULT_PROMETHEUS_PORT",
    "LOG_FORMATS",
    "TRACE_HEADERS",
    "EventMetrics",
    "JsonFormatter",
    "MetricsServer",
    "TelemetryConfig",
    "bind",
    "bound",
    "configure",
    "continue_headers",
    "current_ids",
    "ensure_prometheus_reader",
    "messaging",
    "meter",
    "prometheus_reader",
    "render",
    "shutdown",
    "span",
    "stored_trace",
    "trace_headers",
    "tracer",
    "tracing_enabled",
    "use_tracer_provider",
]
