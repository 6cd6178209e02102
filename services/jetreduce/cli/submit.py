"""Reading a workflow file, validating it locally (fast, precise errors before any server is
involved), and submitting it with request/reply."""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import msgspec
from nats.aio.client import Client

from jetreduce.contract.events import SubmitOptions, SubmitReply, WorkflowSubmit, encode
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.workflow import ParseResult, WorkflowInvalid, parse_workflow
from jetreduce.runtime.publish import publish_retrying

__all__ = [
    "RecordingEnv",
    "SubmitRejected",
    "format_problems",
    "load_workflow",
    "new_workflow_id",
    "submit",
]

REPLY_HEADER = "Jetreduce-Reply"  # mirrors planner.REPLY_HEADER (services are not imported)


class SubmitRejected(Exception):
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
    """Publish ``workflow.submit`` (stored, de-duplicated by id) and wait for the verdict."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, max_msgs=1)
    try:
        payload = WorkflowSubmit(
            workflow_id=workflow_id, workflow=text, options=options, source=source
        )
        await publish_retrying(
            nc.jetstream(),
            subjects.submit,
            encode(payload),
            {"Nats-Msg-Id": workflow_id, REPLY_HEADER: inbox},
        )
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


def format_problems(exc: WorkflowInvalid | SubmitRejected) -> str:
    if isinstance(exc, WorkflowInvalid):
        return str(exc)
    lines = []
    for p in exc.reply.problems:
        where = f"{p.line}:{p.column}: " if p.line else ""
        lines.append(f"{where}{p.path}: {p.message}" if p.path else f"{where}{p.message}")
    return "\n".join(lines)
