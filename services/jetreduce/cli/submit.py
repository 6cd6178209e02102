"""Reading a workflow file, validating it locally (fast, precise errors before any server is
involved), and submitting it with request/reply."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import msgspec
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import NoStreamResponseError, NotFoundError

from jetreduce.contract.errors import PermanentError
from jetreduce.contract.events import (
    REPLY_HEADER,
    SubmitOptions,
    SubmitReply,
    WorkflowRejected,
    WorkflowSubmit,
    decode,
    encode,
)
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.workflow import WorkflowInvalid
from jetreduce.lang import ParseResult, parse_workflow
from jetreduce.runtime.telemetry import messaging, span, trace_headers

__all__ = [
    "RecordingEnv",
    "SubmitRejected",
    "format_problems",
    "load_workflow",
    "new_workflow_id",
    "submit",
]


class SubmitRejected(PermanentError):
    def __init__(self, reply: SubmitReply) -> None:
        super().__init__(f"workflow {reply.workflow_id} rejected")
        self.reply = reply


class RecordingEnv(Mapping[str, str]):
    """The caller's environment, recording which variables the parser looked up, so exactly
    those (and nothing else from the environment) travel with the submission."""

    def __init__(self, base: Mapping[str, str]) -> None:
        self._base = base
        self.used: dict[str, str] = {}

    def __getitem__(self, key: str) -> str:
        value = self._base[key]
        self.used[key] = value
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)


def load_workflow(path: Path) -> tuple[str, ParseResult, dict[str, str]]:
    """Read and validate; raises WorkflowInvalid (with every problem) or OSError."""
    text = path.read_text()
    env = RecordingEnv(os.environ)
    result = parse_workflow(text, env=env, source=str(path))
    return text, result, env.used


def new_workflow_id(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40] or "wf"
    return f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


async def submit(
    nc: Client,
    subjects: Subjects,
    text: str,
    options: SubmitOptions,
    *,
    workflow_id: str,
    source: str,
    timeout_s: float = 30.0,
) -> SubmitReply:
    """Publish ``workflow.submit`` (stored, de-duplicated by id) and wait for the verdict.

    With tracing on this is the root span of the workflow's trace; its ``traceparent``
    travels in the submit message's headers."""
    attributes = {
        **messaging(subjects.submit, "send", workflow_id),
        "jetreduce.workflow.id": workflow_id,
    }
    with span("workflow submit", kind="producer", attributes=attributes):
        return await _submit(nc, subjects, text, options, workflow_id, source, timeout_s)


async def _submit(
    nc: Client,
    subjects: Subjects,
    text: str,
    options: SubmitOptions,
    workflow_id: str,
    source: str,
    timeout_s: float,
) -> SubmitReply:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, max_msgs=1)
    js = nc.jetstream()
    try:
        payload = WorkflowSubmit(
            workflow_id=workflow_id, workflow=text, options=options, source=source
        )
        ack = await _publish_submit(
            js,
            subjects.submit,
            encode(payload),
            trace_headers({"Nats-Msg-Id": workflow_id, REPLY_HEADER: inbox}),
            timeout_s,
        )
        if ack.duplicate:
            # Already submitted within the de-duplication window: the planner will not see
            # this copy, so the verdict is read from the events it published for the first.
            return await _stored_verdict(js, subjects, workflow_id, timeout_s)
        msg = await sub.next_msg(timeout=timeout_s)
    except TimeoutError:
        raise TimeoutError(
            f"no answer from a planner within {timeout_s:.0f}s: is `jetreduce services up` "
            "running against this server?"
        ) from None
    finally:
        await sub.unsubscribe()
    reply = msgspec.json.decode(msg.data, type=SubmitReply)
    if not reply.accepted:
        raise SubmitRejected(reply)
    return reply


async def _publish_submit(
    js: JetStreamContext, subject: str, data: bytes, headers: dict[str, str], timeout_s: float
) -> PubAck:
    """Publish, waiting (bounded) for the submissions stream to exist: the services declare
    it when they start, and a client started at the same moment may be first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await js.publish(subject, data, headers=headers, timeout=timeout_s)
        except (NoStreamResponseError, NoRespondersError):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no stream stores {subject!r}: are the jetreduce services running "
                    "against this server (they declare the streams)?"
                ) from None
            await asyncio.sleep(0.2)


async def _stored_verdict(
    js: JetStreamContext, subjects: Subjects, workflow_id: str, timeout_s: float
) -> SubmitReply:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for verdict in ("accepted", "rejected"):
            try:
                msg = await js.get_last_msg(
                    subjects.events_stream, subjects.workflow(verdict, workflow_id)
                )
            except NotFoundError:
                continue
            event = decode(msg.data or b"")
            if isinstance(event, WorkflowRejected):
                reply = SubmitReply(
                    workflow_id=workflow_id, accepted=False, problems=event.problems
                )
                raise SubmitRejected(reply)
            return SubmitReply(workflow_id=workflow_id, accepted=True)
        await asyncio.sleep(0.1)
    raise TimeoutError(f"workflow {workflow_id} was submitted before but has no verdict yet")


def format_problems(exc: WorkflowInvalid | SubmitRejected) -> str:
    if isinstance(exc, WorkflowInvalid):
        return str(exc)
    lines = []
    for p in exc.reply.problems:
        where = f"{p.line}:{p.column}: " if p.line else ""
        lines.append(f"{where}{p.path}: {p.message}" if p.path else f"{where}{p.message}")
    return "\n".join(lines)
