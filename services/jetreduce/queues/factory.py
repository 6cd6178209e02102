"""Picking the item queue of a workflow from its queue URL.

``jetstream`` (or empty) — the default WorkQueue stream; ``redis://host:port/db`` — Redis
Streams; ``sqs://QUEUE?region=…&endpoint=…`` — Amazon SQS or a compatible endpoint.
Credentials come from the URL or the backend's usual places (environment, AWS chain), never
from events, so the URL stored with a workflow must not carry a password: use the
environment of the services and agents instead.
"""

from __future__ import annotations

from jetreduce.queues.base import ItemQueue, QueueError
from jetreduce.queues.jetstream import JetStreamQueue
from jetreduce.runtime.service import ServiceContext

__all__ = ["open_queue", "validate_queue_url"]


def validate_queue_url(url: str | None) -> str | None:
    """None if usable, else a message saying why not."""
    if not url or url == "jetstream":
        return None
    return f"unsupported queue {url!r}: use 'jetstream'"


def open_queue(ctx: ServiceContext, workflow_id: str, url: str | None = None) -> ItemQueue:
    problem = validate_queue_url(url)
    if problem is not None:
        raise QueueError(problem)
    return JetStreamQueue(ctx, workflow_id)
