"""Streams, consumers and buckets, declared idempotently by every service at start.

Why each setting (see ``research/jetstream.md`` §0-2):

* ``WORK`` is a WorkQueue stream with one subject per item and ``discard_new_per_subject``:
  at most one pending copy of an item exists whatever the timing, so a resubmit or a planner
  restart cannot queue an item twice.
* ``RESULTS`` holds ``item.done`` / ``item.dead``. Terminal writes are create-only across both
  subjects of an item (``Nats-Expected-Last-Subject-Sequence-Subject``), so an item has exactly
  one terminal record, and the number of terminal items is a server-side distinct-subject count.
* ``EVENTS`` holds lifecycle events; the ones that must happen once (``map.complete``,
  ``workflow.completed``…) are published create-only per subject.
* ``PROGRESS`` keeps the last snapshot per workflow (``nats sub`` sees each one live).

Declaring is add-or-update: a stream that exists with different settings is updated, and a
setting the server refuses to change (retention) is reported, not ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError

from jetreduce.contract.subjects import Subjects

__all__ = ["TopologySettings", "declare", "stream_configs"]

log = logging.getLogger(__name__)

DAY_S = 86_400.0


@dataclass(frozen=True)
class TopologySettings:
    replicas: int = 1
    """1 for the embedded server; 3 on a production cluster (R3)."""
    retention_days: float = 7.0
    """How long events, results, DLQ entries and records outlive their workflow."""
    max_work_msgs: int = 10_000_000
    """Back-pressure bound of the work queue: a full queue refuses enqueues (discard new)."""
    memory: bool = False
    """Memory storage (benchmarks only: loses everything on a server restart)."""


def stream_configs(subjects: Subjects, settings: TopologySettings) -> list[StreamConfig]:
    storage = StorageType.MEMORY if settings.memory else StorageType.FILE
    max_age = settings.retention_days * DAY_S
    common: dict[str, Any] = {"num_replicas": settings.replicas, "storage": storage}
    return [
        StreamConfig(
            name=subjects.submit_stream,
            subjects=[subjects.submit],
            retention=RetentionPolicy.LIMITS,
            max_age=max_age,
            duplicate_window=120.0,
            **common,
        ),
        StreamConfig(
            name=subjects.events_stream,
            subjects=subjects.events_subjects,
            retention=RetentionPolicy.LIMITS,
            max_age=max_age,
            **common,
        ),
        StreamConfig(
            name=subjects.work_stream,
            subjects=subjects.work_subjects,
            retention=RetentionPolicy.WORK_QUEUE,
            max_msgs_per_subject=1,
            discard=DiscardPolicy.NEW,
            discard_new_per_subject=True,
            max_msgs=settings.max_work_msgs,
            **common,
        ),
        StreamConfig(
            name=subjects.results_stream,
            subjects=subjects.results_subjects,
            retention=RetentionPolicy.LIMITS,
            max_age=max_age,
            allow_direct=True,
            **common,
        ),
        StreamConfig(
            name=subjects.progress_stream,
            subjects=subjects.progress_subjects,
            retention=RetentionPolicy.LIMITS,
            max_msgs_per_subject=1,
            max_age=max_age,
            allow_direct=True,
            **common,
        ),
        StreamConfig(
            name=subjects.advisories_stream,
            subjects=[subjects.max_deliveries_advisories],
            retention=RetentionPolicy.LIMITS,
            max_age=max_age,
            **common,
        ),
        StreamConfig(
            name=subjects.dlq_stream,
            subjects=subjects.dlq_subjects,
            retention=RetentionPolicy.LIMITS,
            max_age=max_age * 4,
            max_msgs_per_subject=1,
            **common,
        ),
    ]


async def declare(
    js: JetStreamContext, subjects: Subjects, settings: TopologySettings | None = None
) -> None:
    """Create or reconcile every stream and bucket. Safe to call concurrently and repeatedly."""
    settings = settings or TopologySettings()
    for config in stream_configs(subjects, settings):
        await _declare_stream(js, config)
    storage = StorageType.MEMORY if settings.memory else StorageType.FILE
    max_age = settings.retention_days * DAY_S
    buckets = (
        (subjects.workflows_bucket, 5),
        (subjects.specs_bucket, 1),
        (subjects.claims_bucket, 1),
    )
    for bucket, history in buckets:
        try:
            await js.key_value(bucket)
        except BucketNotFoundError:
            await js.create_key_value(
                KeyValueConfig(
                    bucket=bucket,
                    history=history,
                    ttl=max_age,
                    replicas=settings.replicas,
                    storage=storage,
                )
            )
    try:
        await js.object_store(subjects.objects_bucket)
    except (BucketNotFoundError, NotFoundError):
        await js.create_object_store(
            subjects.objects_bucket,
            ObjectStoreConfig(ttl=max_age, replicas=settings.replicas, storage=storage),
        )


async def _declare_stream(js: JetStreamContext, config: StreamConfig) -> None:
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        try:
            await js.add_stream(config)
            return
        except BadRequestError as exc:
            if exc.err_code != 10058:  # created concurrently by another service: fall through
                raise
        info = await js.stream_info(config.name)
    current = info.config
    if (
        sorted(current.subjects or []) != sorted(config.subjects or [])
        or abs((current.max_age or 0) - (config.max_age or 0)) > 1
        or (current.max_msgs or -1) != (config.max_msgs or -1)
    ):
        log.warning("stream %s differs from the declared topology: updating it", config.name)
        await js.update_stream(config)
