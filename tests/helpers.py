"""Test helpers: host the real services against the session nats-server and run workflows
through the same submit/watch path the CLI uses. Agents are real child processes."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jetreduce.cli.host import ServiceHost
from jetreduce.cli.submit import submit
from jetreduce.cli.watch import Watcher
from jetreduce.contract import events as ev
from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.subjects import Subjects
from jetreduce.runtime.connection import connect
from jetreduce.runtime.settings import NatsSettings
from jetreduce.runtime.store import read_subject
from support import env_without_jetreduce


@dataclass
class Harness:
    settings: NatsSettings
    subjects: Subjects
    nc: Any
    host: ServiceHost
    log_dir: Path

    async def run(
        self,
        text: str,
        workdir: Path,
        *,
        timeout_s: float = 120.0,
        workflow_id: str | None = None,
        **options: Any,
    ) -> Any:
        """Submit ``text`` and follow it to its terminal event (bounded by ``timeout_s``)."""
        wf = workflow_id or f"wf-{secrets.token_hex(4)}"
        watcher = Watcher(self.nc, self.subjects, wf, show_events=False, tty=False)
        await watcher.start()
        try:
            await submit(
                self.nc,
                self.subjects,
                text,
                SubmitOptions(workdir=str(workdir), **options),
                workflow_id=wf,
                source="test",
            )
            return await watcher.until_done(timeout_s)
        finally:
            await watcher.stop()

    def agent_logs(self) -> str:
        return "\n".join(
            f"--- {p.relative_to(self.log_dir)}\n{p.read_text()}"
            for p in sorted(self.log_dir.rglob("*.log"))
        )


@contextlib.asynccontextmanager
async def services(
    nats_url: str, prefix: str, tmp_path: Path, **host_options: Any
) -> AsyncIterator[Harness]:
    """The four services in this process (agents as child processes), plus a client."""
    settings = NatsSettings(url=nats_url, prefix=prefix)
    log_dir = tmp_path / "agent-logs"
    host = ServiceHost(settings, log_dir=log_dir, **host_options)
    async with host.running():
        nc = await connect(settings, forever=False)
        try:
            yield Harness(settings, Subjects(prefix), nc, host, log_dir)
        finally:
            await nc.close()


async def read_stream(
    js: Any, stream: str, subject: str, *, timeout_s: float = 30.0
) -> list[ev.Event]:
    """Every message stored on ``subject`` in ``stream`` when called, decoded, in stream order
    (``runtime/store.py`` ``read_subject``). Strict: a malformed stored event fails the test,
    where the services' ``read_events`` skips it."""
    msgs = await read_subject(js, stream, subject, timeout_s=timeout_s)
    return [ev.decode(msg.data) for msg in msgs]


async def stored_terminal_event(js: Any, s: Subjects, wf: str) -> ev.Event | None:
    """The stored event that ended ``wf`` (``TERMINAL_EVENTS``), None while it runs or
    while the server does not answer (chaos tests poll this across server restarts)."""
    for subject in s.workflow_ends(wf):
        with contextlib.suppress(Exception):
            msg = await js.get_last_msg(s.events_stream, subject)
            return ev.decode(msg.data)
    return None


async def item_results(h: Harness, wf: str) -> dict[int, Any]:
    """A workflow's terminal item events (done or dead), by item index."""
    results = await read_stream(
        h.nc.jetstream(), h.subjects.results_stream, h.subjects.terminal_of(wf)
    )
    return {e.index: e for e in results if isinstance(e, ev.ItemDone | ev.ItemDead)}


async def dlq(h: Harness, *args: str) -> subprocess.CompletedProcess[str]:
    """``jetreduce dlq ARGS`` against the harness's server, as an operator runs it."""
    env = env_without_jetreduce() | {"JETREDUCE_PREFIX": h.subjects.prefix}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "jetreduce", "dlq", *args, "--nats", h.settings.url],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


async def next_completion(watcher: Watcher, timeout_s: float = 60) -> ev.WorkflowCompleted:
    """The next ``workflow.completed`` the watcher sees (a failure fails the test)."""
    while True:
        event = await asyncio.wait_for(watcher.queue.get(), timeout_s)
        if isinstance(event, ev.WorkflowCompleted):
            return event
        assert not isinstance(event, ev.WorkflowFailed), event


async def stored_events(nc: Any, subjects: Subjects, subject: str) -> list[ev.Event]:
    """Every message stored on ``subject`` in the events stream, decoded."""
    return await read_stream(nc.jetstream(), subjects.events_stream, subject)


THOUSAND = """
name: thousand
mode: mapreduce
map:
  input: items.json
  json_path: "$.items[*]"
  max_parallel: 8
  agent_template:
    - shell: "echo $(( ${item.n} * 2 )) ${item.word}"
reduce:
  - shell: "wc -l < ${map.results_file} | tr -d ' '"
  - shell: "echo ${map.successful}/${map.total}"
"""
"""The foundation's 1,000-item workflow (any item count: ``items.json`` holds ``n`` and
``word``); run on JetStream in test_workflows and on Redis/SQS in test_queue_backends."""


@contextlib.asynccontextmanager
async def connected_as(
    url: str, user: str | None, password: str | None
) -> AsyncIterator[tuple[Any, list[str]]]:
    """A connection as ``user``, and the errors the server sent it (a refused publish is
    reported there, asynchronously: per-role permission tests read it)."""
    import nats

    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(
        url, user=user, password=password, error_cb=on_error, allow_reconnect=False
    )
    try:
        yield nc, errors
    finally:
        await nc.close()


async def stored_or_refused(
    nc: Any, errors: list[str], subject: str, payload: bytes, timeout_s: float = 0.3
) -> bool:
    """Publish through JetStream; True if stored, False if the server refused it (and said
    so: a timeout without a permissions violation fails the test)."""
    from nats.errors import TimeoutError as NatsTimeout

    try:
        await nc.jetstream().publish(subject, payload, timeout=timeout_s)
    except NatsTimeout:
        await nc.flush()
        assert any("permissions violation" in e.lower() for e in errors), errors
        return False
    return True
