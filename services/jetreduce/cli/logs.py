"""Logging setup: libraries only log; the CLI decides where, how much and in which format
(``text``, or ``json`` for log shippers: see ``runtime/telemetry``)."""

from __future__ import annotations

import logging
import os

from jetreduce.runtime.telemetry import LOG_FORMATS, JsonFormatter


def configure(level: str | None = None, fmt: str | None = None) -> None:
    """``level``/``fmt`` win over ``JETREDUCE_LOG_LEVEL``/``JETREDUCE_LOG_FORMAT``; agents get
    both through the environment, as a pod would."""
    name = (level or os.environ.get("JETREDUCE_LOG_LEVEL") or "WARNING").upper()
    form = (fmt or os.environ.get("JETREDUCE_LOG_FORMAT") or "text").lower()
    if form not in LOG_FORMATS:
        raise ValueError(f"unknown log format {form!r}: choose from {', '.join(LOG_FORMATS)}")
    logging.basicConfig(
        level=getattr(logging, name, logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if form == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    logging.getLogger("nats").setLevel(logging.CRITICAL)
