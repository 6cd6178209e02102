"""Telemetry setup from OTEL_* variables: nothing at all without them (not even the SDK's
import), OTLP/HTTP export to a real HTTP endpoint when asked, and the exporter choice."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from jetreduce.runtime import telemetry
from jetreduce.runtime.telemetry import TelemetryConfig


def test_no_variable_means_no_sdk_and_no_exporter() -> None:
    code = (
        "import sys; from jetreduce.runtime import telemetry; import jetreduce.cli.app; "
        "c = telemetry.configure('x'); "
        "assert not c.active and telemetry.tracer() is None and telemetry.meter() is None; "
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'imported'"
    )
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr


def test_exporter_choice() -> None:
    assert TelemetryConfig.from_env("svc", {}).active is False
    only_endpoint = TelemetryConfig.from_env(
        "svc", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}
    )
    assert (only_endpoint.traces, only_endpoint.metrics) == (("otlp",), ("otlp",))
    chosen = TelemetryConfig.from_env(
        "svc",
        {
            "OTEL_SERVICE_NAME": "mine",
            "OTEL_TRACES_EXPORTER": "console,bogus",
            "OTEL_METRICS_EXPORTER": "prometheus",
            "OTEL_EXPORTER_PROMETHEUS_PORT": "9999",
        },
    )
    assert chosen.service_name == "mine" and chosen.traces == ("console",)
    assert chosen.metrics == ("prometheus",) and chosen.prometheus_port == 9999
    off = TelemetryConfig.from_env(
        "svc", {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}
    )
    assert not off.active
    none = TelemetryConfig.from_env("svc", {"OTEL_TRACES_EXPORTER": "none"})
    assert none.traces == ()


class _Collector(BaseHTTPRequestHandler):
    received: list[tuple[str, bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        _Collector.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[str]:
    _Collector.received = []
    server = HTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(5)


def test_otlp_http_export_reaches_the_collector(
    collector: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The `otlp` extra (part of the test extra); the exporter reads its own variables.
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector)
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    telemetry.configure("jetreduce-test")
    with telemetry.span("exported", attributes=telemetry.messaging("a.b", "send")):
        headers = telemetry.trace_headers()
    assert headers["traceparent"].startswith("00-")
    telemetry.shutdown()  # flushes the batch processor
    (path, body), *_ = _Collector.received
    assert path == "/v1/traces"
    request = ExportTraceServiceRequest.FromString(body)
    resource = request.resource_spans[0]
    names = [s.name for scope in resource.scope_spans for s in scope.spans]
    assert names == ["exported"]
    service = {a.key: a.value.string_value for a in resource.resource.attributes}
    assert service["service.name"] == "jetreduce-test"
