"""OpenTelemetry SDK setup from the standard ``OTEL_*`` environment variables.

Nothing is imported from the SDK, nothing is exported and no thread is started unless a
variable asks for it: the CLI, the services and every agent call :func:`configure` at start,
and with no ``OTEL_*`` variable set that call only reads the environment. The SDK costs
~150 ms to import, which a ``jetreduce run`` of a small workflow would feel.

Which exporters run (``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER``, comma-separated):

* ``console`` — one JSON object per line on stderr (an agent's stderr is its log file);
* ``otlp`` — OTLP over HTTP/protobuf to ``OTEL_EXPORTER_OTLP_ENDPOINT`` (default
  ``http://localhost:4318``); needs the ``otlp`` extra (``pip install 'jetreduce[otlp]'``),
  imported only here and only then; the exporter reads its own ``OTEL_EXPORTER_OTLP_*``
  variables (headers, timeouts, per-signal endpoints);
* ``prometheus`` (metrics only) — the ``/metrics`` endpoint, on ``OTEL_EXPORTER_PROMETHEUS_PORT``
  (default 9464) unless ``--metrics-port`` / ``JETREDUCE_METRICS_PORT`` names one;
* ``none`` — nothing.

Unlike the SDK's own default (``otlp``), an unset exporter variable means ``otlp`` only when
an OTLP endpoint variable is set, and nothing otherwise: a laptop without a collector must
not retry exports to localhost:4318 in the background. ``OTEL_SDK_DISABLED=true`` turns all
of it off. A misconfiguration (an unknown exporter, the OTLP extra missing) is logged as a
warning and that exporter skipped: observability must never stop a service or an agent.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_PROMETHEUS_PORT",
    "TelemetryConfig",
    "configure",
    "ensure_prometheus_reader",
    "meter",
    "prometheus_reader",
    "shutdown",
    "tracer",
    "use_tracer_provider",
]

log = logging.getLogger(__name__)

DEFAULT_PROMETHEUS_PORT = 9464
"""The port OpenTelemetry's Prometheus exporter uses by convention."""

_TRACE_EXPORTERS = ("console", "otlp")
_METRIC_EXPORTERS = ("console", "otlp", "prometheus")


def _exporters(
    env: Mapping[str, str], variable: str, signal_endpoint: str, known: tuple[str, ...]
) -> tuple[str, ...]:
    raw = env.get(variable)
    if raw is None:
        has_endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(signal_endpoint)
        return ("otlp",) if has_endpoint else ()
    names = []
    for name in (n.strip().lower() for n in raw.split(",")):
        if not name or name == "none":
            continue
        if name not in known:
            choices = ", ".join(known)
            log.warning("telemetry: %s=%s unsupported (use %s, none)", variable, name, choices)
            continue
        names.append(name)
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class TelemetryConfig:
    """What :func:`configure` found in the environment."""

    service_name: str
    traces: tuple[str, ...] = ()
    """Trace exporters: ``console``, ``otlp``."""
    metrics: tuple[str, ...] = ()
    """Metric exporters: ``console``, ``otlp``, ``prometheus``."""
    prometheus_port: int | None = None
    resource_attributes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(
        cls, default_service_name: str, env: Mapping[str, str] | None = None
    ) -> TelemetryConfig:
        env = os.environ if env is None else env
        name = env.get("OTEL_SERVICE_NAME") or default_service_name
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls(service_name=name)
        traces = _exporters(
            env, "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", _TRACE_EXPORTERS
        )
        metrics = _exporters(
            env, "OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", _METRIC_EXPORTERS
        )
        port = None
        if "prometheus" in metrics:
            try:
                port = int(env.get("OTEL_EXPORTER_PROMETHEUS_PORT") or DEFAULT_PROMETHEUS_PORT)
            except ValueError:
                log.warning("telemetry: OTEL_EXPORTER_PROMETHEUS_PORT is not a number")
                port = DEFAULT_PROMETHEUS_PORT
        return cls(service_name=name, traces=traces, metrics=metrics, prometheus_port=port)

    @property
    def active(self) -> bool:
        return bool(self.traces or self.metrics)


class _State:
    """Process-wide, as logging is: set by :func:`configure` (or a test), read by the span
    and metric helpers. Kept here rather than in the OpenTelemetry API's globals, which can
    be set once per process only — tests install a fresh provider per case."""

    config: TelemetryConfig | None = None
    tracer_provider: Any = None
    tracer: Any = None
    """An SDK tracer while tracing is on; None means every span helper is a no-op."""
    meter_provider: Any = None
    meter: Any = None
    prometheus: Any = None
    """The in-memory reader the ``/metrics`` endpoint renders, when one is served."""


_STATE = _State()


def _otlp(kind: str) -> Any:
    """An OTLP/HTTP exporter, or None (logged) when the ``otlp`` extra is not installed."""
    try:
        if kind == "traces":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            return OTLPSpanExporter()
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter()
    except ImportError:
        log.warning(
            "telemetry: OTLP %s export asked for, but the exporter is not installed "
            "(pip install 'jetreduce[otlp]'); not exporting them",
            kind,
        )
        return None


def _resource(config: TelemetryConfig) -> Any:
    from opentelemetry.sdk.resources import Resource

    # Resource.create also reads OTEL_RESOURCE_ATTRIBUTES; service.name is ours to settle.
    return Resource.create({"service.name": config.service_name})


def _one_line(span: Any) -> str:
    return str(span.to_json(indent=None)) + "\n"


def configure(
    service_name: str,
    *,
    env: Mapping[str, str] | None = None,
    prometheus: bool = False,
) -> TelemetryConfig:
    """Set up tracing and metrics for this process as the environment says (see the module
    docstring). ``prometheus``: keep an in-memory metric reader for a ``/metrics`` endpoint
    even if no ``OTEL_*`` variable asks for metrics. Safe to call again: the previous
    providers are shut down (flushed) first."""
    config = TelemetryConfig.from_env(service_name, env)
    shutdown()
    _STATE.config = config
    if config.traces:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )

        provider = TracerProvider(resource=_resource(config))
        if "console" in config.traces:
            # Written as each span ends: an agent killed a moment later has still logged it.
            console = ConsoleSpanExporter(out=sys.stderr, formatter=_one_line)
            provider.add_span_processor(SimpleSpanProcessor(console))
        if "otlp" in config.traces:
            exporter = _otlp("traces")
            if exporter is not None:
                provider.add_span_processor(BatchSpanProcessor(exporter))
        use_tracer_provider(provider)
    if config.metrics or prometheus:
        _metrics(config, prometheus=prometheus or "prometheus" in config.metrics)
    return config


def _metrics(config: TelemetryConfig, *, prometheus: bool) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        InMemoryMetricReader,
        PeriodicExportingMetricReader,
    )

    readers: list[Any] = []
    if "console" in config.metrics:
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(out=sys.stderr)))
    if "otlp" in config.metrics:
        exporter = _otlp("metrics")
        if exporter is not None:
            readers.append(PeriodicExportingMetricReader(exporter))
    reader = InMemoryMetricReader() if prometheus else None
    if reader is not None:
        readers.append(reader)
    if _STATE.meter_provider is not None:
        _STATE.meter_provider.shutdown()
    _STATE.meter_provider = MeterProvider(resource=_resource(config), metric_readers=readers)
    _STATE.meter = _STATE.meter_provider.get_meter("jetreduce")
    _STATE.prometheus = reader


def ensure_prometheus_reader() -> Any:
    """The reader a ``/metrics`` endpoint renders: the configured one, or a new meter
    provider with one (keeping the exporters the environment asked for)."""
    if _STATE.prometheus is None:
        config = _STATE.config or TelemetryConfig.from_env("jetreduce", {})
        _STATE.config = config
        _metrics(config, prometheus=True)
    return _STATE.prometheus


def prometheus_reader() -> Any:
    return _STATE.prometheus


def use_tracer_provider(provider: Any) -> Any:
    """Trace into ``provider`` from now on (None: stop tracing). Returns the previous one,
    not shut down, so a test can restore it."""
    previous = _STATE.tracer_provider
    _STATE.tracer_provider = provider
    _STATE.tracer = provider.get_tracer("jetreduce") if provider is not None else None
    return previous


def tracer() -> Any:
    """The SDK tracer, or None when tracing is off."""
    return _STATE.tracer


def meter() -> Any:
    """The SDK meter, or None when metrics are off (callers then create no instruments)."""
    return _STATE.meter


def shutdown() -> None:
    """Flush and stop exporters (at process exit; an agent's last spans go out here)."""
    for provider in (_STATE.tracer_provider, _STATE.meter_provider):
        if provider is not None:
            try:
                provider.shutdown()
            except Exception:  # a collector that went away must not fail the exit
                log.warning("telemetry: shutdown failed", exc_info=True)
    _STATE.tracer_provider = _STATE.tracer = None
    _STATE.meter_provider = _STATE.meter = _STATE.prometheus = None
