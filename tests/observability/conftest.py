"""Observability tests share one concern: the telemetry state is process-wide (as logging's
is), so each test starts and ends with none configured."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from jetreduce.runtime import telemetry


@pytest.fixture(autouse=True)
def clean_telemetry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in [
        "OTEL_TRACES_EXPORTER",
        "OTEL_METRICS_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_SERVICE_NAME",
        "JETREDUCE_LOG_FORMAT",
    ]:
        monkeypatch.delenv(name, raising=False)
    telemetry.shutdown()
    yield
    telemetry.shutdown()
