"""Planner service: see the package docstring."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from jetreduce.contract.events import (
    INLINE_ITEM_LIMIT,
    REPLY_HEADER,
    WORKSPACES,
    BadEvent,
    ItemDead,
    Problem,
    SetupCompleted,
    SubmitReply,
    WorkflowAccepted,
    WorkflowFailed,
    WorkflowPlanned,
    WorkflowRejected,
    WorkflowReopened,
    WorkflowRetryRequested,
    WorkflowSubmit,
    WorkItem,
    decode_as,
    encode,
)
from jetreduce.contract.objects import item_object
from jetreduce.contract.records import Phase, StoredSpec, WorkflowRecord
from jetreduce.contract.subjects import PRIORITY_LANES, InvalidToken, check_token
from jetreduce.contract.workflow import WorkflowInvalid
from jetreduce.lang import parse_workflow, workflow_text
from jetreduce.lang.pipeline import InputItems, ItemPipeline, PipelineError
from jetreduce.queues.base import ItemQueue
from jetreduce.queues.factory import open_queue, validate_queue_url
from jetreduce.runtime.publish import publish_once
from jetreduce.runtime.service import EventConsumer, Retry, ServiceContext
from jetreduce.runtime.state import StateStore
from jetreduce.runtime.telemetry import (
    bound,
    continue_headers,
    messaging,
    span,
    stored_trace,
    tracing_enabled,
)

__all__ = ["Planner"]

log = logging.getLogger(__name__)

INBOX_RE = re.compile(r"_INBOX(\.[A-Za-z0-9_-]+)+")
"""A client's inbox (``nc.new_inbox()``): literal tokens, no wildcard, under ``_INBOX``."""

VISIBILITY_S = 30.0
"""Lease length of a work item; agents heartbeat at a third of it."""


class Planner:
    """``default_queue``: the installation's item queue for workflows that name none. It is
    written into the accepted workflow's stored options, so every service and agent uses the
    same queue whatever their own settings (the URL carries no password: validated).

    ``local_workdirs``: agents run on this host (the local backend), so a ``workdir`` the
    submitter names must be a readable directory here; checked at submission, the problem
    is in the reply, instead of a setup agent that crashes at every restart."""

    def __init__(
        self,
        ctx: ServiceContext,
        *,
        default_queue: str | None = None,
        local_workdirs: bool = False,
    ) -> None:
        problem = validate_queue_url(default_queue)
        if problem is not None:
            raise ValueError(f"default queue: {problem}")
        self.ctx = ctx
        self.s = ctx.subjects
        self.state = StateStore(ctx.js, ctx.subjects)
        self.default_queue = default_queue
        self.local_workdirs = local_workdirs

    async def run(self, stop: asyncio.Event) -> None:
        submits = EventConsumer(
            self.ctx,
            stream=self.s.submit_stream,
            durable="planner-submit",
            filters=[self.s.submit],
            handler=self.on_submit,
            ack_wait_s=60,
        )
        setups = EventConsumer(
            self.ctx,
            stream=self.s.events_stream,
            durable="planner-setup",
            filters=[self.s.setup("completed", "*"), self.s.workflow("retry", "*")],
            handler=self.on_phase_event,
            ack_wait_s=60,
        )
        await asyncio.gather(submits.run(stop), setups.run(stop))

    async def on_phase_event(self, msg: Msg) -> None:
        if msg.subject.startswith(self.s.workflow("retry", "")):
            await self.on_retry(msg)
        else:
            await self.on_setup_completed(msg)

    async def on_retry(self, msg: Msg) -> None:
        """Re-run dead items: forget their terminal record and DLQ entry, re-open the workflow
        if it had ended (its completion events are removed so they can happen again), and
        enqueue them. Safe to repeat: every step is idempotent."""
        event = decode_as(msg.data, WorkflowRetryRequested, subject=msg.subject)
        wf = event.workflow_id
        record = await self.state.get(wf)
        spec = await self.state.get_spec(wf)
        if record is None or spec is None:
            return
        js = self.ctx.js
        items: list[WorkItem] = []
        for index in sorted(set(event.indices)):
            try:
                raw = await js.get_last_msg(self.s.dlq_stream, self.s.dlq(wf, index))
            except NotFoundError:
                continue  # not dead-lettered (or already retried)
            dead = decode_as(raw.data or b"", ItemDead)
            stored = dead.item is None and await self._item_is_stored(wf, index)
            items.append(WorkItem(workflow_id=wf, index=index, item=dead.item, item_stored=stored))
        if not items:
            return
        if record.phase.terminal or record.phase == Phase.REDUCING:
            for subject in (
                self.s.map("complete", wf),
                self.s.reduce("*", wf),
                *(self.s.workflow(e, wf) for e in ("completed", "failed", "timed_out")),
            ):
                await js.purge_stream(self.s.events_stream, subject=subject)
        for work in items:
            await js.purge_stream(self.s.results_stream, subject=self.s.item_dead(wf, work.index))
            await js.purge_stream(self.s.dlq_stream, subject=self.s.dlq(wf, work.index))
        await self.state.reopen(wf)
        attempts = spec.options.max_attempts or spec.workflow.error_policy.retry.max_attempts
        queue = open_queue(self.ctx, wf, spec.options.queue)
        await queue.prepare(
            visibility_s=spec.options.lease_s or VISIBILITY_S,
            max_attempts=attempts,
            parallel=record.max_parallel,
        )
        await queue.enqueue(items, lane=PRIORITY_LANES[spec.options.priority])
        await js.publish(
            self.s.workflow("reopened", wf),
            encode(WorkflowReopened(workflow_id=wf, retried=len(items))),
        )
        log.info("workflow %s: %d dead item(s) re-enqueued", wf, len(items))

    # -- submissions ----------------------------------------------------------------------
    async def on_submit(self, msg: Msg) -> None:
        """Continues the submitter's trace (``accept`` span); the context is stored with
        ``workflow.accepted`` for every later phase (see ``runtime/telemetry``)."""
        attributes = messaging(msg.subject, "process", (msg.headers or {}).get("Nats-Msg-Id"))
        parent = msg.headers or {}
        with span("workflow accept", parent=parent, kind="consumer", attributes=attributes):
            await self._on_submit(msg)

    async def _on_submit(self, msg: Msg) -> None:
        reply_to = (msg.headers or {}).get(REPLY_HEADER)
        try:
            submit = decode_as(msg.data, WorkflowSubmit)
        except BadEvent as exc:
            wf = _fallback_id(msg)
            await self._reject(wf, [Problem(path="", message=str(exc))], reply_to)
            return
        wf = submit.workflow_id or _fallback_id(msg)
        try:
            check_token(wf)
        except InvalidToken as exc:
            await self._reject(
                _fallback_id(msg), [Problem(path="workflow_id", message=str(exc))], reply_to
            )
            return
        with bound(workflow_id=wf):
            await self._accept(msg, wf, submit, reply_to)

    async def _accept(
        self, msg: Msg, wf: str, submit: WorkflowSubmit, reply_to: str | None
    ) -> None:
        trace = continue_headers(msg.headers)
        existing = await self.state.get(wf)
        if existing is not None:
            # A resubmit of the same id (client retry, redelivery): answer as before.
            await self._reply(reply_to, SubmitReply(workflow_id=wf, accepted=True))
            await self._announce_accepted(wf, existing.name, [], trace)
            return
        problems, warnings, spec = self.validate(submit)
        if spec is None:
            await self._reject(wf, problems, reply_to)
            return
        now = time.time()
        record = WorkflowRecord(
            workflow_id=wf,
            name=spec.workflow.name,
            phase=Phase.ACCEPTED,
            created_ts=now,
            updated_ts=now,
            max_parallel=spec.options.max_parallel or spec.workflow.map.max_parallel,
        )
        await self.state.put_spec(wf, spec)
        await self.state.create(record)
        await self._announce_accepted(wf, spec.workflow.name, warnings, trace)
        await self._reply(reply_to, SubmitReply(workflow_id=wf, accepted=True, problems=warnings))
        log.info("workflow %s accepted (%s)", wf, spec.workflow.name)

    def validate(
        self, submit: WorkflowSubmit
    ) -> tuple[list[Problem], list[Problem], StoredSpec | None]:
        """All problems at once: the workflow file's, then the options'."""
        try:
            text = workflow_text(submit.workflow, source=submit.source)
            result = parse_workflow(text, env=submit.options.vars, source=submit.source)
        except WorkflowInvalid as exc:
            return [_problem(p) for p in exc.problems], [], None
        problems: list[Problem] = []
        opts = submit.options
        if opts.max_parallel is not None and opts.max_parallel < 1:
            problems.append(Problem(path="options.max_parallel", message="must be at least 1"))
        if opts.priority not in PRIORITY_LANES:
            problems.append(
                Problem(path="options.priority", message="must be one of high, normal, low")
            )
        if opts.workspace not in WORKSPACES:
            problems.append(
                Problem(path="options.workspace", message=f"must be one of {', '.join(WORKSPACES)}")
            )
        if opts.backend not in ("local", "kubernetes"):
            problems.append(
                Problem(path="options.backend", message=f"unknown backend {opts.backend!r}")
            )
        queue_problem = validate_queue_url(opts.queue)
        if queue_problem is not None:
            problems.append(Problem(path="options.queue", message=queue_problem))
        for name in ("timeout_s", "lease_s"):
            value = getattr(opts, name)
            if value is not None and value <= 0:
                problems.append(Problem(path=f"options.{name}", message="must be positive"))
        if opts.max_attempts is not None and opts.max_attempts < 1:
            problems.append(Problem(path="options.max_attempts", message="must be at least 1"))
        runs_here = opts.backend == "local" and not opts.namespace and not opts.image
        if self.local_workdirs and runs_here and opts.workdir:
            workdir_problem = _workdir_problem(opts.workdir)
            if workdir_problem is not None:
                problems.append(Problem(path="options.workdir", message=workdir_problem))
        if problems:
            return problems, [], None
        if opts.queue is None and self.default_queue is not None:
            opts = msgspec.structs.replace(opts, queue=self.default_queue)
        spec = StoredSpec(workflow=result.workflow, options=opts)
        return [], [_problem(p) for p in result.warnings], spec

    async def _announce_accepted(
        self, wf: str, name: str, warnings: list[Problem], trace: dict[str, str]
    ) -> None:
        """``trace``: the workflow's trace headers, stored with the event for later phases."""
        await publish_once(
            self.ctx.js,
            self.s.workflow("accepted", wf),
            encode(WorkflowAccepted(workflow_id=wf, name=name, warnings=warnings)),
            headers=trace,
        )

    async def _reject(self, wf: str, problems: list[Problem], reply_to: str | None) -> None:
        log.info("workflow %s rejected: %d problem(s)", wf, len(problems))
        with contextlib.suppress(InvalidToken):
            check_token(wf)
            await publish_once(
                self.ctx.js,
                self.s.workflow("rejected", wf),
                encode(WorkflowRejected(workflow_id=wf, problems=problems)),
            )
        await self._reply(reply_to, SubmitReply(workflow_id=wf, accepted=False, problems=problems))

    async def _reply(self, reply_to: str | None, reply: SubmitReply) -> None:
        """Answer on the submitter's inbox, and nowhere else: the subject comes from whoever
        submitted, and the planner may publish anything (a reply to ``reduce.completed.<wf>``
        would be stored there, in the services' name, where a client may not publish)."""
        if not reply_to:
            return
        if not INBOX_RE.fullmatch(reply_to):
            log.warning(
                "submission %s: reply subject is not an inbox; not answered", reply.workflow_id
            )
            return
        await self.ctx.nc.publish(reply_to, encode(reply))

    # -- planning -------------------------------------------------------------------------
    async def on_setup_completed(self, msg: Msg) -> None:
        event = decode_as(msg.data, SetupCompleted, subject=msg.subject)
        wf = event.workflow_id
        record = await self.state.get(wf)
        spec = await self.state.get_spec(wf)
        if record is None or spec is None:
            log.warning("setup.completed for unknown workflow %s: ignored", wf)
            return
        if record.phase.terminal:
            return
        # Shown as planning (`jetreduce status`, `watch`) while the input is read and
        # expanded, which takes minutes for a million items; a redelivery re-plans.
        await self.state.transition(wf, Phase.PLANNING)
        parent: dict[str, str] = dict(msg.headers or {})
        if "traceparent" not in parent and tracing_enabled():  # an untraced setup agent
            accepted = self.s.workflow("accepted", wf)
            parent = await stored_trace(self.ctx.js, self.s.events_stream, accepted)
        attributes = messaging(msg.subject, "process")
        with (
            bound(workflow_id=wf),
            span("plan", parent=parent, kind="consumer", attributes=attributes),
        ):
            spec.captures = dict(event.captures)
            await self.state.put_spec(wf, spec)
            with tempfile.TemporaryDirectory(prefix="jetreduce-plan-") as spool:
                items = await self._expand(wf, spec, event, Path(spool) / "input")
                if items is None:
                    return
                await self._plan(msg, wf, spec, items, continue_headers(parent))

    async def _plan(
        self, msg: Msg, wf: str, spec: StoredSpec, items: InputItems, trace: dict[str, str]
    ) -> None:
        """``trace``: the plan span's headers, stored with ``workflow.planned``: agents
        trace every item attempt under it."""
        beat = asyncio.create_task(_keep_in_progress(msg))
        try:
            total, big = await asyncio.to_thread(items.scan, INLINE_ITEM_LIMIT)
            await self._store_big_items(wf, items, big)
        except PipelineError as exc:
            await self._fail(wf, f"map input: {exc}")
            return
        finally:
            beat.cancel()
        parallel = max(1, min(spec.options.max_parallel or spec.workflow.map.max_parallel, total))
        await self.state.transition(wf, Phase.MAPPING, total=total, max_parallel=parallel)
        attempts = spec.options.max_attempts or spec.workflow.error_policy.retry.max_attempts
        queue = open_queue(self.ctx, wf, spec.options.queue)
        await queue.prepare(
            visibility_s=spec.options.lease_s or VISIBILITY_S,
            max_attempts=attempts,
            parallel=parallel,
        )
        await publish_once(
            self.ctx.js,
            self.s.workflow("planned", wf),
            encode(WorkflowPlanned(workflow_id=wf, total=total, max_parallel=parallel)),
            headers=trace,
        )
        lane = PRIORITY_LANES[spec.options.priority]
        beat = asyncio.create_task(_keep_in_progress(msg))
        attributes = {
            **messaging(self.s.work_of(wf), "send"),
            "messaging.batch.message_count": total,
        }

        async def ended() -> bool:
            record = await self.state.get(wf)
            return record is None or record.phase.terminal

        try:
            with span("enqueue", kind="producer", attributes=attributes):
                result = await _enqueue_in_chunks(
                    queue, _work_items(wf, items, big), lane, ended=ended
                )
        finally:
            beat.cancel()
        if result.stopped:
            # The janitor purged when the workflow ended, but this enqueue may have added
            # items since: now that none can follow, they go too.
            await queue.purge()
            log.info("workflow %s ended while its items were enqueued: enqueue stopped", wf)
            return
        log.info("workflow %s planned: %d items (%d already queued)", wf, total, result.duplicates)

    async def _item_is_stored(self, wf: str, index: int) -> bool:
        store = await self.ctx.js.object_store(self.s.objects_bucket)
        try:
            await store.get_info(item_object(wf, index))
        except NotFoundError:
            return False
        return True

    async def _store_big_items(self, wf: str, items: InputItems, big: set[int]) -> None:
        """Put the items too large for a message into the object store (idempotent: the same
        name gets the same bytes on a replan)."""
        if not big:
            return
        store = await self.ctx.js.object_store(self.s.objects_bucket)
        for index, item in enumerate(items):
            if index in big:
                await store.put(item_object(wf, index), msgspec.json.encode(item))
        log.info("workflow %s: %d item(s) larger than a message stored as objects", wf, len(big))

    async def _expand(
        self, wf: str, spec: StoredSpec, event: SetupCompleted, spool: Path
    ) -> InputItems | None:
        """The workflow's items, from its input object spooled to ``spool`` (never held in
        memory whole: see ``pipeline/source.py``)."""
        try:
            store = await self.ctx.js.object_store(self.s.objects_bucket)
            with open(spool, "wb") as out:
                await store.get(event.input_object, writeinto=out)
        except Exception as exc:
            raise Retry(f"input object {event.input_object} unreadable: {exc}") from exc
        m = spec.workflow.map
        try:
            pipeline = ItemPipeline(
                json_path=m.json_path,
                filter=m.filter,
                sort_by=m.sort_by,
                distinct=m.distinct,
                offset=m.offset,
                max_items=m.max_items,
            )
            return await asyncio.to_thread(
                InputItems, spool, lenient_lines=event.input_is_command, pipeline=pipeline
            )
        except PipelineError as exc:
            await self._fail(wf, f"map input: {exc}")
            return None

    async def _fail(self, wf: str, reason: str) -> None:
        await self.state.transition(wf, Phase.FAILED, reason=reason)
        await publish_once(
            self.ctx.js,
            self.s.workflow("failed", wf),
            encode(WorkflowFailed(workflow_id=wf, reason=reason)),
        )


ENQUEUE_CHUNK = 10_000
"""Items handed to a queue's ``enqueue`` at once: the Redis and SQS adapters build their
batch in memory, so planning memory stays bounded on every backend."""


@dataclass
class Enqueued:
    added: int = 0
    duplicates: int = 0
    stopped: bool = False
    """The workflow ended (cancelled, timed out…) before every item was enqueued."""


async def _enqueue_in_chunks(
    queue: ItemQueue,
    items: Iterator[WorkItem],
    lane: str,
    *,
    ended: Callable[[], Awaitable[bool]],
) -> Enqueued:
    """Enqueue chunk by chunk; before each, and once after the last, ``ended()`` is asked
    whether the workflow is over (a cancel during a large enqueue must not leave the rest
    queued with nobody to run it; one that came while the last chunk went in, after the
    janitor's purge, must not leave that chunk)."""
    total = Enqueued()
    while chunk := list(itertools.islice(items, ENQUEUE_CHUNK)):
        if await ended():
            total.stopped = True
            return total
        result = await queue.enqueue(chunk, lane=lane)
        total.added += result.added
        total.duplicates += result.duplicates
    total.stopped = await ended()
    return total


def _work_items(wf: str, items: Iterable[Any], big: set[int]) -> Iterator[WorkItem]:
    for index, item in enumerate(items):
        if index in big:
            yield WorkItem(workflow_id=wf, index=index, item=None, item_stored=True)
        else:
            yield WorkItem(workflow_id=wf, index=index, item=item)


async def _keep_in_progress(msg: Msg) -> None:
    """Long plans (100k+ items) outlast the ack wait: keep the triggering event leased."""
    while True:
        await asyncio.sleep(10)
        with contextlib.suppress(Exception):  # a keep-alive: the next one may pass
            await msg.in_progress()


def _workdir_problem(workdir: str) -> str | None:
    """Why agents on this host could not run in ``workdir``, or None."""
    if not os.path.isdir(workdir):
        return f"{workdir!r} does not exist or is not a directory on the agents' host"
    if not os.access(workdir, os.R_OK | os.X_OK):
        return f"{workdir!r} is not readable (permission denied)"
    return None


def _fallback_id(msg: Msg) -> str:
    try:
        return f"wf-{msg.metadata.sequence.stream}"
    except Exception:
        return "wf-unknown"


def _problem(p: Any) -> Problem:
    return Problem(
        path=str(getattr(p, "path", "")),
        message=str(getattr(p, "message", p)),
        line=getattr(p, "line", None),
        column=getattr(p, "column", None),
        severity=str(getattr(p, "severity", "error")),
    )
