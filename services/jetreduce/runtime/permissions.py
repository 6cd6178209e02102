"""Who may publish what: the NATS allow-lists of the three roles, in one place.

* **services** (planner, launcher, aggregator, janitor): everything; they own the lifecycle.
* **agents**: their items' results and failed attempts, DLQ entries, ``map.failed``, the
  events of the one-agent phases they run (setup, reduce), their own status reports
  (``agent.queue``, ``agent.circuit``, lease telemetry), the setup and reduce claims (not
  the launcher's lease) and the object store; on the work stream pulls from a workflow's
  consumer and acks only; reads of what they use. Not ``workflow.*`` (no cancel, no
  completion), not ``map.complete`` (the aggregator's), not the launcher's ``agent.*``
  events, not the workflow records or specs, no deletion of a result, no consumer or purge
  on the work stream.
* **clients** (the CLI, a ``nats`` user): submit, cancel and retry requests, object uploads,
  ``dlq purge``, and reads (stream info, single messages, ordered consumers). Not results,
  not phase or agent events, not KV writes, no consumer on the work stream: there any pull
  spends the items' deliveries.

Each entry is a call the role's code makes (tests/integration/test_permissions.py runs them
as each role; tests/e2e/test_roles.py whole workflows, with no refusal in the server's log).
Everything not allowed is refused by the server. Subscriptions are open to all three (read
access; nothing secret travels on NATS). :func:`server_users` renders the users for the
embedded server (``jetreduce run``, ``jetreduce server --roles``); :func:`server_conf` and
:func:`helm_values` for the Kubernetes deployment (``jetreduce nats-users``, committed in
deploy/kustomize and compared by a test).

Not covered yet: an agent of one workflow may still write another's results, DLQ entries,
phase events, claims and objects, and pull from another workflow's work consumer
(per-workflow credentials would be needed, e.g. JWT users issued per workflow or an auth
callout; config-file users carry fixed lists); a client may write or delete any object (an
object's subject carries its name base64-encoded, which no wildcard selects).
"""

from __future__ import annotations

import json
from typing import Any

from jetreduce.contract.subjects import Subjects

__all__ = [
    "ROLES",
    "helm_values",
    "password_variable",
    "publish_allowed",
    "server_conf",
    "server_users",
]

ROLES = ("services", "agents", "clients")


def _read(stream: str) -> list[str]:
    """Reading one stream: its info, single messages (direct or not), and ephemeral ordered
    consumers (created and asked about; they expire when unused). Only the subject without
    a consumer name: the server refuses a durable there (10020), so no reader can create,
    change or delete the services' durable consumers. Consumers of ``WORK`` are never in a
    reader's list."""
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.INFO.{stream}.*",
    ]


_FLOW = ("$JS.API.INFO", "$JS.API.STREAM.NAMES", "$JS.FC.>")
"""Account info and stream names (the client library looks a subject's stream up), flow
control replies of push consumers."""


def _objects(bucket: str) -> list[str]:
    """Reading and writing objects; a delete purges the object's chunks."""
    return [f"$O.{bucket}.>", *_read(f"OBJ_{bucket}"), f"$JS.API.STREAM.PURGE.OBJ_{bucket}"]


def _streams(s: Subjects) -> list[str]:
    """Every stream of the topology, buckets included (contract/topology.py)."""
    return [
        s.submit_stream,
        s.events_stream,
        s.work_stream,
        s.results_stream,
        s.progress_stream,
        s.advisories_stream,
        s.dlq_stream,
        f"KV_{s.workflows_bucket}",
        f"KV_{s.specs_bucket}",
        f"KV_{s.claims_bucket}",
        f"OBJ_{s.objects_bucket}",
    ]


AGENT_CLAIMS = ("setup", "reduce")
"""The phases whose claims agents take (one agent at a time: worker/claimed.py)."""


def publish_allowed(s: Subjects, role: str) -> list[str]:
    """Subjects (wildcards allowed) that ``role`` may publish to. Each entry is a call the
    code makes (tests/integration/test_permissions.py runs the real code paths as each
    role, and tests/e2e the whole of ``jetreduce run``, with the server logging any refusal)."""
    if role == "services":
        return [">"]
    if role == "agents":
        return [
            # results (item.done, item.dead) and failed attempts (item.failed)
            s.item_terminal("*", "*"),
            s.dlq_of("*"),
            s.map("failed", "*"),
            *(s.setup(e, "*") for e in ("completed", "failed", "restarted")),
            *(s.reduce(e, "*") for e in ("started", "completed", "failed", "restarted")),
            s.agent("queue", "*"),  # an external queue's status
            s.agent("circuit", "*"),  # the circuit breaker
            s.agent("usage", "*"),  # the slots it held and used (utilisation)
            s.telemetry_leases("*"),
            *_FLOW,
            # An agent checks the topology at start (contract/topology.py ``declare``): the
            # streams' info only, as they exist (creating or changing one is refused).
            *(f"$JS.API.STREAM.INFO.{name}" for name in _streams(s)),
            # the map: pull from the workflow's durable consumer, ack/nak/term/in-progress
            f"$JS.API.CONSUMER.MSG.NEXT.{s.work_stream}.*",
            f"$JS.API.CONSUMER.INFO.{s.work_stream}.*",
            # (ack subjects as a server without a JetStream domain makes them: a domain puts
            # two tokens before the stream's name, and this would need `$JS.ACK.*.*.WORK.>`)
            f"$JS.ACK.{s.work_stream}.>",
            *_read(s.events_stream),  # map.complete (reduce), the workflow's end
            *_read(s.results_stream),  # the reduce's spool, a stored result (worker/record)
            *_read(f"KV_{s.workflows_bucket}"),
            *_read(f"KV_{s.specs_bucket}"),
            # the setup and reduce claims (worker/claimed.py), not the launcher's lease
            # (launcher/service.py): an agent holding that would stall every launcher
            *(f"$KV.{s.claims_bucket}.{phase}.*" for phase in AGENT_CLAIMS),
            *_read(f"KV_{s.claims_bucket}"),
            *_objects(s.objects_bucket),
        ]
    if role == "clients":
        return [
            s.submit,
            s.workflow("cancel", "*"),
            s.workflow("retry", "*"),
            *_FLOW,
            # ``status`` and ``list`` check the topology (``declare``: the streams' and buckets'
            # info; creating one is refused), ``list`` counts queued items from the work
            # stream's info (no message read).
            *(f"$JS.API.STREAM.INFO.{name}" for name in _streams(s)),
            *(
                entry
                # what the commands show: events, results, progress, dead letters, records
                for stream in (
                    s.events_stream,
                    s.results_stream,
                    s.progress_stream,
                    s.dlq_stream,
                    f"KV_{s.workflows_bucket}",
                )
                for entry in _read(stream)
            ),
            f"$JS.API.STREAM.PURGE.{s.dlq_stream}",  # jetreduce dlq purge
            *_objects(s.objects_bucket),  # uploads (submit), logs and outputs (reads)
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


GENERATED = (
    "Generated by `jetreduce nats-users{args}` from jetreduce/runtime/permissions.py: do not\n"
    "edit; run `make nats-users` after changing the roles (a test compares)."
)


def password_variable(role: str) -> str:
    """The environment variable the NATS server reads ``role``'s password from."""
    return f"JETREDUCE_{role.upper()}_PASSWORD"


def _permissions(s: Subjects, role: str) -> dict[str, Any]:
    return {"publish": {"allow": publish_allowed(s, role)}, "subscribe": {"allow": [">"]}}


def server_conf(prefix: str = "") -> str:
    """A nats-server config file (to ``include``) with the three users, their passwords
    read from the server's environment (:func:`password_variable`), never written here."""
    s = Subjects(prefix)
    args = f" --prefix {prefix}" if prefix else ""
    lines = [f"# {line}" for line in GENERATED.format(args=args).splitlines()]
    lines.append("authorization {\n  users = [")
    for role in ROLES:
        lines += [
            "    {",
            f"      user: {json.dumps(role)}",
            f"      password: ${password_variable(role)}",
            "      permissions: {",
            "        publish: {allow: [",
            *(f"          {json.dumps(subject)}" for subject in publish_allowed(s, role)),
            "        ]}",
            '        subscribe: {allow: [">"]}',
            "      }",
            "    }",
        ]
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def helm_values(prefix: str = "") -> str:
    """Values for the official NATS Helm chart (1.x) giving its servers the same users:
    ``config.merge.authorization``, each password read from the server's environment
    (``<< $VAR >>`` is the chart's unquoted output), and ``container.env`` taking the
    variables from the Secret ``nats-users`` (keys: the role names) in the release's
    namespace."""
    s = Subjects(prefix)
    args = f" --prefix {prefix} --helm" if prefix else " --helm"
    users = [
        {
            "user": role,
            "password": f"<< ${password_variable(role)} >>",
            "permissions": _permissions(s, role),
        }
        for role in ROLES
    ]
    env = {
        password_variable(role): {
            "valueFrom": {"secretKeyRef": {"name": "nats-users", "key": role}}
        }
        for role in ROLES
    }
    values = {"config": {"merge": {"authorization": {"users": users}}}, "container": {"env": env}}
    header = "".join(f"# {line}\n" for line in GENERATED.format(args=args).splitlines())
    # JSON is YAML: no YAML library needed, and the file reads the same everywhere.
    return header + json.dumps(values, indent=2) + "\n"
