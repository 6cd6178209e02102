"""Logging setup: libraries only log; the CLI decides where and how much."""

from __future__ import annotations

import logging
import os


def configure(level: str | None = None) -> None:
    name = (level or os.environ.get("JETREDUCE_LOG_LEVEL") or "WARNING").upper()
    logging.basicConfig(
        level=getattr(logging, name, logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("nats").setLevel(logging.CRITICAL)
