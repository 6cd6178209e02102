"""A Prometheus text-format ``/metrics`` endpoint over the SDK's in-memory metric reader.

OpenTelemetry's Prometheus exporter package pulls in ``prometheus_client`` and serves from a
thread; what a scrape needs is small enough to write: collect from the reader, render the
text exposition format (version 0.0.4), answer one HTTP GET on the service's own event loop.

Names follow the Prometheus conventions the OpenTelemetry exporter uses: dots become
underscores, a unit of seconds appends ``_seconds``, monotonic sums end in ``_total``,
histograms give ``_bucket{le=…}``, ``_sum`` and ``_count``.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from jetreduce.runtime.http import Answer, RouteServer

__all__ = ["MetricsServer", "render"]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_INVALID = re.compile(r"[^a-zA-Z0-9_:]")


def _name(metric: Any) -> str:
    name = _INVALID.sub("_", metric.name)
    if metric.unit == "s" and not name.endswith("_seconds"):
        name += "_seconds"
    return name


def _labels(attributes: Any, extra: dict[str, str] | None = None) -> str:
    pairs = {**{_INVALID.sub("_", str(k)): str(v) for k, v in (attributes or {}).items()}}
    pairs.update(extra or {})
    if not pairs:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(pairs.items()))
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def render(data: Any) -> str:
    """The text exposition of ``MetricsData`` (None renders as nothing)."""
    from opentelemetry.sdk.metrics.export import Gauge, Histogram, Sum

    lines: list[str] = []
    seen: set[str] = set()
    for resource in getattr(data, "resource_metrics", None) or ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                name = _name(metric)
                points = metric.data
                if isinstance(points, Sum) and points.is_monotonic:
                    kind, sample = "counter", name.removesuffix("_total") + "_total"
                elif isinstance(points, Histogram):
                    kind, sample = "histogram", name
                elif isinstance(points, Sum | Gauge):
                    kind, sample = "gauge", name
                else:
                    continue
                if name not in seen:
                    seen.add(name)
                    help_text = (metric.description or metric.name).replace("\n", " ")
                    lines.append(f"# HELP {sample} {help_text}")
                    lines.append(f"# TYPE {sample} {kind}")
                for point in points.data_points:
                    if kind == "histogram":
                        cumulative = 0
                        bounds = [*point.explicit_bounds, math.inf]
                        for bound, count in zip(bounds, point.bucket_counts, strict=False):
                            cumulative += count
                            le = _labels(point.attributes, {"le": _number(bound)})
                            lines.append(f"{name}_bucket{le} {cumulative}")
                        labels = _labels(point.attributes)
                        lines.append(f"{name}_sum{labels} {_number(point.sum)}")
                        lines.append(f"{name}_count{labels} {point.count}")
                    else:
                        lines.append(f"{sample}{_labels(point.attributes)} {_number(point.value)}")
    return "\n".join(lines) + "\n" if lines else ""


class MetricsServer(RouteServer):
    """``GET /metrics`` on ``host:port`` (port 0 picks a free one: see :attr:`port`)."""

    def __init__(self, reader: Any, *, host: str = "0.0.0.0", port: int = 0) -> None:
        super().__init__({"/metrics": self._metrics}, host=host, port=port)
        self.reader = reader

    def _metrics(self) -> Answer:
        return "200 OK", CONTENT_TYPE, render(self.reader.get_metrics_data()).encode()
