"""Picking the item queue of a workflow from its queue URL.

``jetstream`` (or empty) — the default WorkQueue stream; ``redis://host:port/db`` (or
``rediss://`` for TLS) — Redis Streams; ``sqs://QUEUE?region=…&endpoint=…`` — Amazon SQS or a
compatible endpoint. Credentials come from the URL or the backend's usual places (environment,
AWS chain), never from events, so the URL stored with a workflow must not carry a password: use
the environment of the services and agents instead (Redis: ``JETREDUCE_REDIS_PASSWORD``).

The Redis and SQS modules are imported only when a workflow uses them: a JetStream-only
service never pays for importing boto3.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from jetreduce.queues.base import ItemQueue, QueueError
from jetreduce.queues.jetstream import Bury, ExhaustedItems, JetStreamQueue
from jetreduce.runtime.service import ServiceContext

__all__ = ["exhausted_items", "open_queue", "validate_queue_url"]

_HINT = "use 'jetstream', 'redis://host:port/db' or 'sqs://QUEUE?region=…&endpoint=…'"


def validate_queue_url(url: str | None) -> str | None:
    """None if usable, else a message saying why not. Checks the form only: no connection."""
    if not url or url == "jetstream":
        return None
    try:
        parts = urlsplit(url)
        _ = parts.port  # ValueError on a non-numeric or out-of-range port
    except ValueError as exc:
        return f"invalid queue URL {url!r}: {exc}"
    if parts.scheme in ("redis", "rediss"):
        if not parts.hostname:
            return f"invalid queue URL {url!r}: no host ({_HINT})"
        if parts.password:
            return f"queue URL {url!r} carries a password: give it through the environment"
        db = parts.path.strip("/")
        if db and not db.isdigit():
            return f"invalid queue URL {url!r}: the path must be a database number"
        return None
    if parts.scheme == "sqs":
        from jetreduce.queues.sqs import parse_sqs_url

        try:
            parse_sqs_url(url)
        except ValueError as exc:
            return f"invalid queue URL {url!r}: {exc}"
        return None
    return f"unsupported queue {url!r}: {_HINT}"


def open_queue(ctx: ServiceContext, workflow_id: str, url: str | None = None) -> ItemQueue:
    """The workflow's queue object; nothing is connected or created until it is used."""
    problem = validate_queue_url(url)
    if problem is not None:
        raise QueueError(problem)
    if not url or url == "jetstream":
        return JetStreamQueue(ctx, workflow_id)
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss"):
        from jetreduce.queues.redis import RedisQueue

        return RedisQueue(
            workflow_id,
            url=url,
            prefix=ctx.subjects.prefix,
            password=os.environ.get("JETREDUCE_REDIS_PASSWORD") or None,
        )
    from jetreduce.queues.sqs import SqsQueue

    return SqsQueue(ctx, workflow_id, url)


def exhausted_items(ctx: ServiceContext, bury: Bury) -> ExhaustedItems:
    """What hands items a backend stopped delivering by itself to ``bury`` (run it as a loop
    until ``stop``). Only JetStream does so (its consumer's ``max_deliver``); on Redis and SQS
    nothing stops delivering, and the agent buries such an item when it leases it
    (``worker/outcome.py``), so there is nothing to watch for them."""
    return ExhaustedItems(ctx, bury)
