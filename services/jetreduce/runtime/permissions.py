"""Who may publish what: the NATS allow-lists of the three roles, in one place.

* **services** (planner, launcher, aggregator, janitor): everything; they own the lifecycle.
* **agents**: their items' results and failed attempts, DLQ entries, ``map.failed``, the
  events of the one-agent phases they run (setup, reduce), their own status reports, the
  claims bucket and the object store, and the JetStream API calls those need (reading
  streams and KV, pulling and acking work). Not ``workflow.*`` (no cancel, no completion),
  not ``map.complete`` (the aggregator's), not the workflow records.
* **clients** (the CLI, a ``nats`` user): submit, cancel and retry requests, and read access
  (stream reads, ordered consumers, KV and object reads, the object uploads of ``submit``).
  Not results, not phase events, not KV writes.

Everything not allowed is refused by the server. Subscriptions are open to all three (read
access; nothing secret travels on NATS). :func:`server_users` renders the users for a
nats-server ``authorization`` block (the embedded server); the Kubernetes deployment is
meant to mount the same lists.

Not covered yet: an agent of one workflow may still write another's results (per-workflow
credentials would be needed), and the upload a client may write is any object.
"""

from __future__ import annotations

from typing import Any

from jetreduce.contract.subjects import Subjects

__all__ = ["ROLES", "publish_allowed", "server_users"]

ROLES = ("services", "agents", "clients")

_JS_READ = (
    "$JS.API.INFO",
    "$JS.API.STREAM.INFO.*",
    "$JS.API.STREAM.NAMES",
    "$JS.API.STREAM.LIST",
    "$JS.API.STREAM.MSG.GET.*",
    "$JS.API.DIRECT.GET.>",
    "$JS.API.CONSUMER.CREATE.>",
    "$JS.API.CONSUMER.INFO.>",
    "$JS.API.CONSUMER.DELETE.>",
    "$JS.API.CONSUMER.MSG.NEXT.>",
    "$JS.FC.>",
    "_INBOX.>",
)
"""Reading streams, KV and objects, with ordered (ephemeral) consumers."""


def _kv(bucket: str) -> str:
    return f"$KV.{bucket}.>"


def _objects(bucket: str) -> list[str]:
    return [f"$O.{bucket}.>", f"$JS.API.STREAM.INFO.OBJ_{bucket}"]


def publish_allowed(s: Subjects, role: str) -> list[str]:
    """Subjects (wildcards allowed) that ``role`` may publish to."""
    if role == "services":
        return [">"]
    if role == "agents":
        phase_events = [
            *(s.setup(e, "*") for e in ("completed", "failed", "restarted")),
            *(s.reduce(e, "*") for e in ("started", "completed", "failed", "restarted")),
        ]
        return [
            s.item_terminal("*", "*"),  # item.done, item.dead and item.failed
            s.dlq_of("*"),
            s.map("failed", "*"),
            *phase_events,
            s.agent("*", "*"),
            s.telemetry_leases("*"),
            *_JS_READ,
            "$JS.ACK.>",
            f"$JS.API.STREAM.MSG.DELETE.{s.results_stream}",  # a false result (worker/record)
            _kv(s.claims_bucket),
            *_objects(s.objects_bucket),
        ]
    if role == "clients":
        return [
            s.submit,
            s.workflow("cancel", "*"),
            s.workflow("retry", "*"),
            *_JS_READ,
            *_objects(s.objects_bucket),
        ]
    raise ValueError(f"unknown role {role!r}: choose from {', '.join(ROLES)}")


def server_users(prefix: str, passwords: dict[str, str]) -> list[dict[str, Any]]:
    """The ``users`` of a nats-server ``authorization`` block for the installation with
    subject ``prefix``: one per role, named after it."""
    s = Subjects(prefix)
    return [
        {
            "user": role,
            "password": passwords[role],
            "permissions": {
                "publish": {"allow": publish_allowed(s, role)},
                "subscribe": {"allow": [">"]},
            },
        }
        for role in ROLES
    ]
