"""Agent entry point and the three phase runners (setup, map, reduce).

The map runner leases as many items as it has free slots, runs each through the agent
template, records the terminal result create-only (first write wins, so a redelivered item is
never counted twice), then acks. A failed attempt is retried after the workflow's backoff
(``retry_config``, any kind) with jitter, through a delayed redelivery; after the last attempt
the item is dead (``item.dead`` + DLQ). The agent exits 0 when the map phase is over or the
workflow ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from jetreduce.contract.events import (
    DURATION_HEADER,
    CircuitChanged,
    ItemDead,
    ItemDone,
    ItemFailed,
    LeaseAges,
    MapComplete,
    MapFailed,
    QueueStatus,
    ReduceCompleted,
    ReduceFailed,
    ReduceRestarted,
    ReduceStarted,
    SetupCompleted,
    SetupFailed,
    SetupRestarted,
    decode_as,
    encode,
    item_object,
    output_object,
)
from jetreduce.contract.records import Phase, StoredSpec
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.contract.workflow.model import RetryConfig, Step
from jetreduce.lang.interpolate import Variables, render_shell, render_text
from jetreduce.queues.base import Lease
from jetreduce.queues.factory import open_queue
from jetreduce.queues.resilient import ResilientQueue
from jetreduce.runtime.claim import CLAIM_TTL_S, Claim, Taken
from jetreduce.runtime.connection import connect
from jetreduce.runtime.counts import count_subjects
from jetreduce.runtime.publish import AckMux, is_stored, publish_once, publish_retrying
from jetreduce.runtime.service import ServiceContext
from jetreduce.runtime.settings import NatsSettings
from jetreduce.runtime.state import StateStore
from jetreduce.runtime.telemetry import (
    bind,
    messaging,
    span,
    stored_trace,
    trace_headers,
    tracing_enabled,
)
from jetreduce.worker.breaker import CircuitBreaker
from jetreduce.worker.claimed import EXIT_SIGTERM, run_claimed
from jetreduce.worker.record import record_result
from jetreduce.worker.results import ResultsSpool
from jetreduce.worker.secrets import (
    EnvironmentProblem,
    Masker,
    MaskingFilter,
    WorkflowEnvironment,
    resolve_environment,
)
from jetreduce.worker.stepflow import StepsResult, run_steps
from jetreduce.worker.steps import StepOutcome, base_env, run_process, run_step
from jetreduce.worker.workspace import WorkspaceError, Workspaces, head

__all__ = ["AgentConfig", "run_agent"]

log = logging.getLogger(__name__)

INPUT_COMMAND_TIMEOUT_S = 300.0
BATCH_WAIT_S = 0.005
"""With nearly every slot busy, wait this long for more to free up before pulling."""
DEFAULT_LEASE_S = 30.0
"""Lease of a work item unless the submission set ``lease_s``; heartbeats at a third."""
ERROR_TAIL = 2048
EVENT_TEXT_LIMIT = 64 * 1024
CLAIMED_PHASES = ("setup", "reduce")
"""Phases whose steps one agent at a time runs, under a claim (runtime/claim.py)."""
RESULTS_REF = re.compile(r"map\.results(?!_file)")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
"""Captures whose names can be environment variables (``x.exit_code`` stays a variable)."""


@dataclass(frozen=True)
class AgentConfig:
    workflow_id: str
    phase: str
    """``setup``, ``map`` or ``reduce``."""
    index: int = 0
    slots: int = 1
    grace_s: float = 20.0
    """On SIGTERM: how long in-flight items (or setup/reduce steps) may finish before they
    are handed back."""
    claim_ttl_s: float = CLAIM_TTL_S
    """Time to live of a setup/reduce claim (runtime/claim.py)."""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> AgentConfig:
        env = dict(os.environ) if env is None else env
        try:
            return cls(
                workflow_id=env["JETREDUCE_WORKFLOW_ID"],
                phase=env.get("JETREDUCE_PHASE", "map"),
                index=int(env.get("JOB_COMPLETION_INDEX", env.get("JETREDUCE_AGENT_INDEX", "0"))),
                slots=int(env.get("JETREDUCE_SLOTS", "1")),
                grace_s=float(env.get("JETREDUCE_GRACE_S", "20")),
                claim_ttl_s=float(env.get("JETREDUCE_CLAIM_TTL_S", str(CLAIM_TTL_S))),
            )
        except KeyError as exc:
            raise SystemExit(f"agent: missing environment variable {exc}") from None
        except ValueError as exc:
            raise SystemExit(f"agent: bad numeric setting: {exc}") from None


STDOUT_LABEL = "stdout (stderr was empty):\n"


def _error_tail(outcome: Any, limit: int = ERROR_TAIL) -> str:
    """The last ``limit`` characters of a failed step's stderr; if it wrote none, of its
    stdout, labelled so that no one reads it as the step's errors."""
    if outcome.stderr.strip():
        return _clip(str(outcome.stderr)[-limit:], limit)
    if outcome.stdout.strip():
        return STDOUT_LABEL + _clip(str(outcome.stdout)[-limit:], limit)
    return ""


def _clip(text: str, limit: int = EVENT_TEXT_LIMIT) -> str:
    data = text.encode()
    if len(data) <= limit:
        return text
    return "[... truncated ...]\n" + data[-limit:].decode("utf-8", errors="ignore")


class Agent:
    def __init__(self, ctx: ServiceContext, config: AgentConfig, spec: StoredSpec) -> None:
        self.ctx = ctx
        self.s: Subjects = ctx.subjects
        self.config = config
        self.spec = spec
        self.wf = config.workflow_id
        self.name = f"{socket.gethostname()}/{os.getpid()}/{config.phase}-{config.index}"
        self.workdir = spec.options.workdir or os.getcwd()
        self.stop = asyncio.Event()
        """Stop taking items; in-flight ones finish within the grace period (SIGTERM)."""
        self.phase_over = asyncio.Event()
        """The map phase or the workflow ended: the agent's job is done."""
        self.signalled = False
        self.abort = asyncio.Event()
        """The workflow ended (cancelled, failed…): in-flight steps are killed at once."""
        self.scratch_prefix = f"jetreduce-{self.wf}-{config.phase}{config.index}-"
        if config.phase not in CLAIMED_PHASES:
            # Setup and reduce clean up after a predecessor only once they hold the claim.
            _remove_leftovers(self.scratch_prefix)
        self.scratch = Path(tempfile.mkdtemp(prefix=f"{self.scratch_prefix}{os.getpid()}-"))
        self.claim: Claim | None = None
        """The setup/reduce claim this agent holds while it runs the phase's steps."""
        self.total = 0
        """The map's item count (read when a map agent starts)."""
        self.trace: dict[str, str] = {}
        """Trace headers this agent's phase continues (read once from a stored event); empty
        when tracing is off or the workflow is not traced."""
        self.env_problem: str | None = None
        """Why the workflow environment (secrets, env_files, profile) could not be built; the
        phase then fails with this message instead of running steps without it."""
        try:
            resolved = resolve_environment(
                spec.workflow,
                args=spec.options.args,
                profile=spec.options.profile,
                base_dir=self.workdir,
            )
        except EnvironmentProblem as exc:
            self.env_problem = str(exc)
            resolved = WorkflowEnvironment(env=dict(spec.workflow.env))
        for warning in resolved.warnings:
            log.warning("agent: %s", warning)
        self.masker: Masker = resolved.masker
        captures_env = {k: v for k, v in spec.captures.items() if _ENV_NAME.fullmatch(k)}
        self.env = {**base_env(), **resolved.env, **captures_env}
        self.vars_base: dict[str, Any] = {**resolved.variables, **spec.captures}
        self.workspaces = Workspaces(
            self.workdir,
            self.wf,
            mode=spec.options.workspace,
            scratch=self.scratch,
            agent=config.index,
        )

    # -- shared ---------------------------------------------------------------------------
    async def _steps(
        self,
        steps: list[Step],
        variables: dict[str, Any],
        *,
        deadline: float | None,
        captures: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> StepsResult:
        """Run steps in order with their modifiers (`worker.stepflow`), in ``cwd`` (default:
        the workflow directory)."""
        where = cwd or self.workdir

        async def run_one(
            step: Step, scope: dict[str, Any], timeout_s: float | None
        ) -> StepOutcome:
            return await self._run_one(step, scope, timeout_s, where)

        return await run_steps(
            steps, variables, run_one=run_one, deadline=deadline, captures=captures
        )

    async def _run_one(
        self, step: Step, variables: dict[str, Any], timeout_s: float | None, cwd: str
    ) -> StepOutcome:
        """One command; its output is masked before anyone (captures included) sees it, and a
        ``commit_required`` step must have moved HEAD."""
        commit_required = step.commit_required
        before = await head(cwd) if commit_required else None
        # Only the kind and the exit code: a step's text or output may hold item data.
        attributes = {"jetreduce.step.kind": step.kind}
        with span(f"step {step.kind}", attributes=attributes, join_only=True) as current:
            outcome = await run_step(
                step,
                Variables(variables),
                env=self.env,
                cwd=cwd,
                timeout_s=timeout_s,
                spill_dir=self.scratch,
            )
            if current is not None:
                current.set_attribute("process.exit.code", outcome.exit_code)
                current.set_attribute("jetreduce.step.timed_out", outcome.timed_out)
        if commit_required and outcome.ok:
            after = await head(cwd)
            if after is None:
                problem = f"commit required, but {cwd} is not a git repository"
                outcome = dataclasses.replace(outcome, exit_code=1, error=problem)
            elif after == before:
                problem = f"commit required: the {step.kind} step made no commit"
                outcome = dataclasses.replace(outcome, error=problem)
        if self.masker:
            outcome = dataclasses.replace(
                outcome,
                stdout=self.masker.mask(outcome.stdout),
                stderr=self.masker.mask(outcome.stderr),
                error=self.masker.mask(outcome.error),
            )
        return outcome

    @staticmethod
    def _describe(steps: list[Step], result: StepsResult) -> str:
        failed = result.failed
        assert failed is not None
        done = result.failed_step or 0
        if not done:  # outside any step: workspace, merge, environment
            return failed.error or f"failed with exit code {failed.exit_code}"
        step = steps[done - 1] if 0 < done <= len(steps) else None
        kind = step.kind if step else "step"
        label = f"step {done} ({kind})"
        if failed.timed_out:
            text = f"{label} timed out"
        elif failed.error:
            text = f"{label} failed: {failed.error}"
        else:
            text = f"{label} exited with code {failed.exit_code}"
        return f"{text} ({result.reason})" if result.reason else text

    @staticmethod
    def _error_type(result: StepsResult) -> str:
        """Prodigy's DLQ classification of the failure (research §3.2)."""
        failed = result.failed
        if failed is None:
            return "Unknown"
        if failed.timed_out:
            return "Timeout"
        if failed.error.startswith("commit required"):
            return "CommitValidationFailed"
        if failed.error.startswith("merge conflict"):
            return "MergeConflict"
        if failed.error.startswith("worktree:"):
            return "WorktreeError"
        return "CommandFailed"

    async def _watch_end(self, also_map_complete: bool) -> None:
        """Set ``stop`` when the workflow ends (or its map phase does)."""

        async def on_end(_msg: Any) -> None:
            self.phase_over.set()
            self.abort.set()
            self.stop.set()

        async def on_map_complete(_msg: Any) -> None:
            # Only a true one (anyone who may publish can send one): every item terminal.
            try:
                terminal = await count_subjects(
                    self.ctx.nc, self.s.results_stream, self.s.terminal_of(self.wf)
                )
            except Exception as exc:
                log.warning("agent: map.complete not checked (%r); going on", exc)
                return
            if terminal < self.total:
                log.error("agent: false map.complete ignored (%d terminal)", terminal)
                return
            self.phase_over.set()
            self.stop.set()

        subs = [
            await self.ctx.nc.subscribe(self.s.workflow(e, self.wf), cb=on_end)
            for e in ("completed", "failed", "cancelled", "timed_out")
        ]
        if also_map_complete:
            subs.append(
                await self.ctx.nc.subscribe(self.s.map("complete", self.wf), cb=on_map_complete)
            )
        self._end_subs = subs

    # -- setup and reduce: one agent at a time --------------------------------------------
    async def _claimed(self, phase: str, body: Callable[[Taken], Awaitable[int]]) -> int:
        """Run ``body`` (the phase's steps) holding the phase's claim (worker/claimed.py)."""
        await self._watch_end(also_map_complete=False)
        self.claim = Claim(
            self.ctx.js,
            self.s.claims_bucket,
            self.s.claim_key(phase, self.wf),
            ttl_s=self.config.claim_ttl_s,
        )
        phase_subject = self.s.setup if phase == "setup" else self.s.reduce
        outcomes = [phase_subject(event, self.wf) for event in ("completed", "failed")]
        state = StateStore(self.ctx.js, self.s)

        async def decided() -> bool:
            for outcome in outcomes:
                if await is_stored(self.ctx.js, self.s.events_stream, outcome):
                    return True
            record = await state.get(self.wf)
            return record is None or record.phase.terminal

        async def taken_hook(taken: Taken) -> None:
            # The predecessor is gone (or fenced): what it left in scratch is not in use.
            _remove_leftovers(self.scratch_prefix, keep=self.scratch)
            if taken.previous is None:
                return
            log.warning(
                "%s attempt %d: the previous run (%s) ended without an outcome (%s)",
                phase,
                taken.attempt,
                taken.previous,
                taken.reason,
            )
            kind = SetupRestarted if phase == "setup" else ReduceRestarted
            event = kind(
                workflow_id=self.wf,
                attempt=taken.attempt,
                previous=taken.previous,
                reason=taken.reason,
            )
            restarted = phase_subject("restarted", self.wf)
            await publish_retrying(
                self.ctx.js,
                restarted,
                encode(event),
                headers={"Nats-Msg-Id": f"{restarted}.{taken.attempt}.{os.getpid()}"},
            )

        return await run_claimed(
            self.claim,
            decided=decided,
            body=body,
            taken_hook=taken_hook,
            stop=self.stop,
            abort=self.abort,
            grace_s=self.config.grace_s,
        )

    async def _still_held(self) -> bool:
        """Right before an outcome is published: is the claim still this agent's? (One that
        lost it was cut off for longer than its time to live: a successor runs the phase.)"""
        return self.claim is None or await self.claim.renew()

    # -- setup ----------------------------------------------------------------------------
    async def run_setup(self) -> int:
        return await self._claimed("setup", self._run_setup)

    async def _run_setup(self, taken: Taken) -> int:
        self.vars_base["setup.attempt"] = taken.attempt
        self.env["SETUP_ATTEMPT"] = str(taken.attempt)
        setup = self.spec.workflow.setup
        steps = setup.steps if setup else []
        deadline = (time.monotonic() + setup.timeout_s) if setup and setup.timeout_s else None
        if self.env_problem is not None:
            await self._setup_failed(f"setup: {self.env_problem}", None)
            return 0
        if self.spec.options.workspace == "item":
            try:  # --worktrees without a usable repository fails here, before any step
                await self.workspaces.prepare()
            except WorkspaceError as exc:
                await self._setup_failed(f"setup: {exc}", None)
                return 0
        before = set(os.listdir(self.workdir))
        variables = dict(self.vars_base)
        captures: dict[str, str] = {}
        result = await self._steps(steps, variables, deadline=deadline, captures=captures)
        outcomes = result.outcomes
        failed = result.failed
        if failed is not None:
            error = self._describe(steps, result)
            detail = _error_tail(failed).strip()
            await self._setup_failed(
                f"setup {error}: {detail}" if detail else f"setup {error}", failed.exit_code
            )
            return 0
        if setup:
            for name, ref in setup.capture_outputs.items():
                index = ref if isinstance(ref, int) else (ref or {}).get("command_index", 0)
                if isinstance(index, int) and 0 <= index < len(outcomes):
                    captures[name] = outcomes[index].stdout.strip()
        variables.update(captures)
        self.env.update({k: v for k, v in captures.items() if _ENV_NAME.fullmatch(k)})
        path, is_command, problem = await self._resolve_input(before, variables)
        if problem is not None:
            await self._setup_failed(problem, None)
            return 0
        store = await self.ctx.js.object_store(self.s.objects_bucket)
        name = f"input/{self.wf}"
        size = path.stat().st_size
        with open(path, "rb") as f:
            await store.put(name, f)
        if not await self._still_held():
            return EXIT_SIGTERM
        await publish_once(
            self.ctx.js,
            self.s.setup("completed", self.wf),
            encode(
                SetupCompleted(
                    workflow_id=self.wf,
                    captures=captures,
                    input_object=name,
                    input_is_command=is_command,
                    input_bytes=size,
                )
            ),
            headers=trace_headers(self.trace),
        )
        return 0

    async def _resolve_input(
        self, before: set[str], variables: dict[str, Any]
    ) -> tuple[Path, bool, str | None]:
        """The map input as a file: a setup-created ``*work-items.json``, the input path, the
        copy of it the submitter uploaded (a pod does not see the submitter's disk; a file
        that setup wrote, or that is here, wins), or the input command's whole stdout
        (spooled to disk, never truncated)."""
        from jetreduce.contract.events import input_upload_object

        new_items = sorted(
            f for f in set(os.listdir(self.workdir)) - before if f.endswith("work-items.json")
        )
        if new_items:
            return Path(self.workdir, new_items[0]), False, None
        source = self.spec.workflow.map.input
        as_path = Path(self.workdir, render_text(source, Variables(variables)))
        if as_path.is_file():
            return as_path, False, None
        if self.spec.options.input_upload:
            uploaded = self.scratch / "map-input.uploaded"
            name = input_upload_object(self.wf)
            try:
                store = await self.ctx.js.object_store(self.s.objects_bucket)
                with open(uploaded, "wb") as sink:
                    await store.get(name, writeinto=sink)
            except Exception as exc:
                why = f"map.input: the uploaded copy ({name}) is unreadable: {exc}"
                return uploaded, False, why
            return uploaded, False, None
        cmd = render_shell(source, Variables(variables), spill_dir=self.scratch)
        spooled = self.scratch / "map-input"
        out = await run_process(
            ["sh", "-c", cmd.script],
            env={**self.env, **cmd.env},
            cwd=self.workdir,
            timeout_s=INPUT_COMMAND_TIMEOUT_S,
            stdout_path=spooled,
        )
        if not out.ok:
            why = "timed out" if out.timed_out else f"exited with code {out.exit_code}"
            detail = self.masker.mask(out.stderr).strip()[-ERROR_TAIL:]
            # A path that is not a file was run as a command: say both, not "not found".
            return (
                spooled,
                True,
                f"map.input {source!r} is neither a file nor a command that succeeded "
                f"(as a command it {why}: {detail})",
            )
        if self.masker:  # items are published: no secret may ride in them
            masked = self.scratch / "map-input.masked"
            with (
                open(spooled, encoding="utf-8", errors="surrogateescape") as src,
                open(masked, "w", encoding="utf-8", errors="surrogateescape") as dst,
            ):
                for line in src:
                    dst.write(self.masker.mask(line))
            masked.replace(spooled)
        return spooled, True, None

    async def _setup_failed(self, error: str, code: int | None) -> None:
        if not await self._still_held():
            return
        await publish_once(
            self.ctx.js,
            self.s.setup("failed", self.wf),
            encode(SetupFailed(workflow_id=self.wf, error=_clip(error), exit_code=code)),
        )

    # -- map ------------------------------------------------------------------------------
    async def run_map(self) -> int:
        await self._watch_end(also_map_complete=True)
        record = await StateStore(self.ctx.js, self.s).get(self.wf)
        if record is None or record.phase.order > Phase.MAPPING.order:
            return 0
        self.total = record.total or 0
        self.queue = ResilientQueue(
            open_queue(self.ctx, self.wf, self.spec.options.queue),
            self.stop,
            self._announce_queue,
        )
        policy = self.spec.workflow.error_policy
        self.retry: RetryConfig = policy.retry
        self.max_attempts = self.spec.options.max_attempts or self.retry.max_attempts
        self.inflight: dict[asyncio.Task[None], Lease] = {}
        self.on_failure = policy.on_item_failure
        if self.on_failure == "skip":
            self.max_attempts = 1  # a skipped item is not retried and not dead-lettered
        self.breaker = CircuitBreaker.from_config(policy.circuit_breaker)
        self.heartbeat_every = (self.spec.options.lease_s or DEFAULT_LEASE_S) / 3
        self.acks = await AckMux(self.ctx.nc).start()
        beats = asyncio.create_task(self._heartbeats())
        draining = False
        batched = False
        try:
            while not self.stop.is_set():
                free = self.config.slots - len(self.inflight)
                if free <= 0:
                    # Every slot busy: wait for one to free up — or for a stop signal, which
                    # must not wait for a long item to end.
                    await self._wait_inflight(None)
                    continue
                if self.inflight and free < self.config.slots // 4 and not batched:
                    # Nearly full: a moment's wait lets several slots free up, so one pull
                    # serves them all instead of one pull per finished item.
                    batched = True
                    await self._wait_inflight(BATCH_WAIT_S)
                    continue
                batched = False
                if self.breaker is not None:
                    before = self.breaker.state
                    free = self.breaker.allowance(free)
                    if self.breaker.state != before:  # open → half_open after its timeout
                        await self._announce_circuit(self.breaker.state)
                    if free <= 0:  # open (or probes used up): dispatch pauses
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(self.stop.wait(), 0.2)
                        continue
                leases = await self._lease(free)
                if leases is None:  # the phase ended while waiting: nothing is left to lease
                    break
                if self.breaker is not None:
                    self.breaker.started(len(leases))
                if self.stop.is_set():
                    for lease in leases:  # raced the stop: give them back at once
                        await self.queue.retry(lease, 0.001)
                    break
                for lease in leases:
                    task = asyncio.create_task(self._run_item(lease))
                    self.inflight[task] = lease
                    task.add_done_callback(self._forget)
            draining = True
            await self._drain()
        finally:
            beats.cancel()
            if not draining:
                for task in list(self.inflight):
                    task.cancel()
            await self.queue.close()
            await self.acks.close()
            await asyncio.shield(self.workspaces.close())
        # Stopped by a signal before the phase ended (an eviction): not a success, so the Job
        # controller (or the local launcher) starts another agent in its place.
        return EXIT_SIGTERM if self.signalled and not self.phase_over.is_set() else 0

    async def _lease(self, free: int) -> list[Lease] | None:
        """Up to ``free`` items (a long poll of a second), or None when the phase ends first:
        after ``map.complete`` no item is left, so the poll is abandoned instead of awaited
        (the launcher waits for map agents to exit before it starts reduce). A signal alone
        lets the poll finish, so nothing it fetched is stranded until its lease runs out."""
        polling = asyncio.ensure_future(self.queue.lease(free, wait_s=1.0))
        ended = asyncio.ensure_future(self.phase_over.wait())
        try:
            await asyncio.wait({polling, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
        if polling.done():
            return polling.result()
        polling.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await polling
        return None

    async def _wait_inflight(self, timeout_s: float | None) -> None:
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait(
                [*self.inflight, stopping], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopping.cancel()

    def _forget(self, task: asyncio.Task[None]) -> None:
        self.inflight.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("item task failed: %r", task.exception())

    async def _drain(self) -> None:
        """Let in-flight items finish within the grace period (unless the workflow ended),
        then kill what is left and hand those items back for another agent at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.grace_s
        aborting = asyncio.ensure_future(self.abort.wait())
        try:
            while self.inflight and not self.abort.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await asyncio.wait(
                    [*self.inflight, aborting],
                    timeout=remaining,
                    return_when=asyncio.FIRST_COMPLETED,
                )
        finally:
            aborting.cancel()
        leftovers = list(self.inflight.items())
        for task, _ in leftovers:
            task.cancel()  # run_process kills the step's process group on cancellation
        await asyncio.gather(*(t for t, _ in leftovers), return_exceptions=True)
        if not self.abort.is_set():
            for _, lease in leftovers:
                with contextlib.suppress(Exception):
                    await self.queue.retry(lease, 0.001)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_every)
            leases = list(self.inflight.values())
            for lease in leases:
                with contextlib.suppress(Exception):
                    await self.queue.heartbeat(lease)
            now = time.monotonic()
            report = LeaseAges(
                workflow_id=self.wf,
                agent=self.name,
                in_flight=len(leases),
                oldest_s=round(max((now - x.leased_at for x in leases), default=0.0), 3),
            )
            with contextlib.suppress(Exception):  # a metric: never worth failing for
                await self.ctx.nc.publish(self.s.telemetry_leases(self.wf), encode(report))

    async def _run_item(self, lease: Lease) -> None:
        """One attempt, traced under the plan (``workflow.planned``'s stored context), its
        log lines tagged with the item id (this task's context only)."""
        item_id = f"item_{lease.item.index}"
        bind(item_id=item_id)
        if not self.trace:
            await self._attempt(lease)
            return
        attributes = {
            **messaging(self.s.work_of(self.wf), "process", f"{self.wf}/{lease.item.index}"),
            "jetreduce.workflow.id": self.wf,
            "jetreduce.item.id": item_id,
            "jetreduce.item.attempt": lease.attempt,
        }
        with span(
            f"item {item_id}",
            parent=self.trace,
            kind="consumer",
            attributes=attributes,
            join_only=True,
        ) as current:
            outcome = await self._attempt(lease)
            if current is not None:
                current.set_attribute("jetreduce.item.outcome", outcome)

    async def _attempt(self, lease: Lease) -> str:
        """Run the item once; ``done``, ``retry`` or ``dead``."""
        work = lease.item
        index = work.index
        item_id = f"item_{index}"
        item = work.item
        unreadable = None
        if work.item_stored:
            try:
                item = await self._stored_item(index)
            except Exception as exc:  # a failed attempt like any other: retried, then dead
                unreadable = f"item data unreadable from the object store: {exc}"
        variables = dict(self.vars_base)
        variables.update(
            item=item,
            item_id=item_id,
            item_index=index,
            item_total=self.total,
            item_json=json.dumps(item, separators=(",", ":")),
            **{"map.total": self.total, "worker.id": self.name},
        )
        m = self.spec.workflow.map
        start = time.monotonic()
        deadline = start + m.agent_timeout_s if m.agent_timeout_s else None
        if unreadable is not None:
            result = _failure(unreadable)
        else:
            result = await self._item_steps(index, m.agent_template, variables, deadline)
        outcomes, failed = result.outcomes, result.failed
        duration = time.monotonic() - start
        await self._breaker_record(failed is None)
        if failed is None:
            output = "\n".join(o.stdout.rstrip("\n") for o in outcomes if o.stdout)
            done = ItemDone(
                workflow_id=self.wf,
                index=index,
                item_id=item_id,
                output=_clip(output),
                exit_code=outcomes[-1].exit_code if outcomes else 0,
                duration_s=duration,
                attempts=lease.attempt,
                agent=self.name,
                output_stored=len(output.encode()) > EVENT_TEXT_LIMIT,
            )
            won = await record_result(
                self.acks, self.ctx.js, self.s, done, {DURATION_HEADER: f"{duration:.6f}"}
            )
            if won and done.output_stored:
                # Written only by the attempt whose result is recorded (a redelivered twin
                # must not overwrite it); reduce falls back to the tail if this fails.
                await self._store_big_output(index, output)
            await self.queue.ack(lease)
            return "done"
        error = self._describe(m.agent_template, result)
        tail = _error_tail(failed)
        # fail_workflow: the author declared this failure fatal, so no item retries either.
        last = lease.attempt >= self.max_attempts or result.fail_workflow
        delay = None if last else self._backoff(lease.attempt)
        await publish_retrying(
            self.ctx.js,
            self.s.item_failed(self.wf, index),
            encode(
                ItemFailed(
                    workflow_id=self.wf,
                    index=index,
                    item_id=item_id,
                    attempt=lease.attempt,
                    error=error,
                    exit_code=failed.exit_code,
                    stderr_tail=tail,
                    retry_in_s=delay,
                )
            ),
        )
        if delay is not None:
            log.info("attempt %d failed, retry in %.1fs: %s", lease.attempt, delay, error)
            await self.queue.retry(lease, delay)
            return "retry"
        log_object = await self._store_log(
            index, lease.attempt, [r.outcome for r in result.records] or outcomes, failed
        )
        if result.fail_workflow:
            # Before the item is recorded dead: once every item is terminal the aggregator
            # completes the map unless it finds this, so it must never come second (or be
            # lost with an agent that dies between the two).
            failed_map = MapFailed(workflow_id=self.wf, index=index, item_id=item_id, error=error)
            await publish_retrying(self.ctx.js, self.s.map("failed", self.wf), encode(failed_map))
        dead = ItemDead(
            workflow_id=self.wf,
            index=index,
            item_id=item_id,
            error=error,
            error_type=self._error_type(result),
            log_object=log_object,
            exit_code=failed.exit_code,
            stderr_tail=tail,
            attempts=lease.attempt,
            duration_s=duration,
            agent=self.name,
        )
        stored = await record_result(
            self.acks, self.ctx.js, self.s, dead, {DURATION_HEADER: f"{duration:.6f}"}
        )
        if stored and self.on_failure != "skip":
            # A stored item stays in the store (the DLQ retry finds it there), not in the entry.
            dead.item = None if work.item_stored else work.item
            await publish_once(self.ctx.js, self.s.dlq(self.wf, index), encode(dead))
        await self.queue.dead(lease, error)
        log.warning("dead after %d attempt(s): %s", lease.attempt, error)
        return "dead"

    async def _item_steps(
        self,
        index: int,
        steps: list[Step],
        variables: dict[str, Any],
        deadline: float | None,
    ) -> StepsResult:
        """An item's steps in its workspace (`worker.workspace`); with worktrees, a successful
        item's commits are merged into the workflow branch before the item counts as done,
        and the workspace is released (removed, reset or kept) whatever happened."""
        if self.env_problem is not None:
            return _failure(self.env_problem)
        if not steps:  # nothing runs: no workspace to make
            return await self._steps(steps, variables, deadline=deadline)
        try:
            ws = await self.workspaces.acquire(index)
        except WorkspaceError as exc:
            return _failure(f"worktree: {exc}")
        merged = False
        try:
            result = await self._steps(steps, variables, deadline=deadline, cwd=ws.path)
            if result.ok and ws.root is not None:
                try:
                    await self.workspaces.merge(ws)
                    merged = True
                except WorkspaceError as exc:
                    text = str(exc)
                    if not text.startswith("merge conflict"):  # the prefix classifies it
                        text = f"merge conflict: {text}"
                    merge_failed = _failure(self.masker.mask(text))
                    result.failed, result.reason = merge_failed.failed, ""
            return result
        finally:
            await asyncio.shield(self.workspaces.release(ws, merged=merged, index=index))

    async def _breaker_record(self, ok: bool) -> None:
        if self.breaker is None:
            return
        changed = self.breaker.record(ok)
        if changed is not None:
            await self._announce_circuit(changed)

    async def _announce_queue(self, state: str, error: str) -> None:
        url = self.spec.options.queue or "jetstream"
        status = QueueStatus(
            workflow_id=self.wf,
            state=state,
            agent=self.name,
            queue=url.split(":", 1)[0],
            error=_clip(error, ERROR_TAIL),
        )
        await publish_retrying(self.ctx.js, self.s.agent("queue", self.wf), encode(status))

    async def _announce_circuit(self, changed: str) -> None:
        assert self.breaker is not None
        log.warning("agent %s: circuit %s", self.name, changed)
        with contextlib.suppress(Exception):
            await publish_retrying(
                self.ctx.js,
                self.s.agent("circuit", self.wf),
                encode(
                    CircuitChanged(
                        workflow_id=self.wf,
                        state=changed,
                        agent=self.name,
                        consecutive_failures=self.breaker.failures,
                    )
                ),
            )

    async def _stored_item(self, index: int) -> Any:
        store = await self.ctx.js.object_store(self.s.objects_bucket)
        obj = await store.get(item_object(self.wf, index))
        return msgspec.json.decode(obj.data or b"null")

    async def _store_big_output(self, index: int, output: str) -> None:
        """Keep an output too large for its event whole in the object store (the event
        carries its tail). A failure to store keeps just the tail."""
        try:
            store = await self.ctx.js.object_store(self.s.objects_bucket)
            await store.put(output_object(self.wf, index), output.encode())
        except Exception as exc:
            log.warning("output of item %d kept as its tail only: %s", index, exc)

    async def _store_log(
        self, index: int, attempt: int, outcomes: list[StepOutcome], failed: StepOutcome
    ) -> str | None:
        """Keep the failed attempt's output (bounded tails) for `jetreduce dlq show`."""
        name = f"logs/{self.wf}/{index}"
        parts = []
        for number, o in enumerate(outcomes, 1):
            parts.append(f"--- step {number}: exit {o.exit_code}{' (timed out)' * o.timed_out}")
            parts.append(f"stdout:\n{o.stdout}\nstderr:\n{o.stderr}")
        body = f"attempt {attempt}\n" + "\n".join(parts)
        try:
            store = await self.ctx.js.object_store(self.s.objects_bucket)
            await store.put(name, body.encode())
        except Exception:
            log.warning("agent: could not store the log of item %d", index)
            return None
        return name

    def _backoff(self, attempt: int) -> float:
        """The workflow's backoff (any kind, `RetryConfig.delay`) with ±20% jitter, so items
        that failed together do not all come back at the same instant."""
        return self.retry.delay(attempt) * random.uniform(0.8, 1.2)

    # -- reduce ---------------------------------------------------------------------------
    async def run_reduce(self) -> int:
        return await self._claimed("reduce", self._run_reduce)

    async def _run_reduce(self, taken: Taken) -> int:
        reduce = self.spec.workflow.reduce
        steps = reduce.steps if reduce else []
        msg = await self.ctx.js.get_last_msg(self.s.events_stream, self.s.map("complete", self.wf))
        complete = decode_as(msg.data or b"", MapComplete)
        started = self.s.reduce("started", self.wf)
        await publish_retrying(  # once per attempt
            self.ctx.js,
            started,
            encode(ReduceStarted(workflow_id=self.wf, attempt=taken.attempt)),
            headers={"Nats-Msg-Id": f"{started}.{taken.attempt}.{os.getpid()}"},
        )
        # Reading every result back costs seconds per 100k items: only when a step (or one of
        # its handlers) refers to them. The counts come from map.complete either way.
        text = msgspec.json.encode(steps).decode()
        wants_results = "map.results" in text or "MAP_RESULTS_FILE" in text
        spool = ResultsSpool(self.scratch)
        spool.done, spool.dead = complete.done, complete.dead
        try:
            results_file = self.scratch / "map-results.jsonl"
            if wants_results:
                await spool.fill(self.ctx.js, self.s, self.wf, complete.done + complete.dead)
            spool.write_jsonl(results_file)
            variables = dict(self.vars_base)
            variables.update(
                {
                    "map.total": complete.total,
                    "map.successful": spool.done,
                    "map.failed": spool.dead,
                    "map.results_file": str(results_file),
                    "reduce.attempt": taken.attempt,
                }
            )
            if any(RESULTS_REF.search(_step_text(s)) for s in steps):
                variables["map.results"] = json.loads(spool.as_json_array())
            self.env.update(
                {
                    "MAP_TOTAL": str(complete.total),
                    "MAP_SUCCESSFUL": str(spool.done),
                    "MAP_FAILED": str(spool.dead),
                    "MAP_RESULTS_FILE": str(results_file),
                    "REDUCE_ATTEMPT": str(taken.attempt),
                }
            )
        finally:
            spool.close()
        start = time.monotonic()
        if self.env_problem is not None:
            result = _failure(self.env_problem)
        else:
            result = await self._steps(steps, variables, deadline=None)
        outcomes, failed = result.outcomes, result.failed
        output = "\n".join(o.stdout.rstrip("\n") for o in outcomes if o.stdout)
        if not await self._still_held():
            return EXIT_SIGTERM
        if failed is not None:
            error = self._describe(steps, result)
            detail = _error_tail(failed).strip()
            await publish_once(
                self.ctx.js,
                self.s.reduce("failed", self.wf),
                encode(
                    ReduceFailed(
                        workflow_id=self.wf,
                        error=f"reduce {error}: {detail}",
                        exit_code=failed.exit_code,
                        output=_clip(output),
                    )
                ),
                headers=trace_headers(self.trace),
            )
            return 0
        await publish_once(
            self.ctx.js,
            self.s.reduce("completed", self.wf),
            encode(
                ReduceCompleted(
                    workflow_id=self.wf, output=_clip(output), duration_s=time.monotonic() - start
                )
            ),
            headers=trace_headers(self.trace),
        )
        return 0


def _traced_by(subjects: Subjects, config: AgentConfig) -> str:
    """The stored event whose trace headers a phase continues: setup the workflow's
    (``workflow.accepted``), map items the plan's, reduce the map completion's."""
    if config.phase == "map":
        return subjects.workflow("planned", config.workflow_id)
    if config.phase == "reduce":
        return subjects.map("complete", config.workflow_id)
    return subjects.workflow("accepted", config.workflow_id)


def _remove_leftovers(prefix: str, keep: Path | None = None) -> None:
    """Remove the scratch directories (spills, spools, workspaces) a predecessor with the
    same phase and index left: one killed (SIGKILL, OOM) had no chance to. Map agents do it
    at start, setup and reduce agents once they hold the phase's claim (runtime/claim.py).
    A directory whose owner (the pid in its name) still runs is kept: a predecessor may live
    on, orphaned, finishing its items within its grace period after the launcher that
    started it died, while a new launcher starts an agent with the same index."""
    for leftover in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        if leftover == keep or _owner_runs(leftover.name.removeprefix(prefix)):
            continue
        shutil.rmtree(leftover, ignore_errors=True)


def _owner_runs(rest: str) -> bool:
    """Whether the process named by ``<pid>-…`` (a scratch directory's name after its
    prefix) runs; False for a name without one (left by an older version)."""
    pid = rest.split("-", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _failure(message: str) -> StepsResult:
    """A failed result for a problem outside the steps (no step index)."""
    return StepsResult(failed=StepOutcome(1, "", message, 0.0, error=message))


def _step_text(step: Step) -> str:
    parts = [step.shell or "", step.claude or ""]
    if step.write_file is not None:
        parts += [step.write_file.path, step.write_file.content]
    return " ".join(parts)


async def run_agent(settings: NatsSettings, config: AgentConfig) -> int:
    """Run one agent to completion; the exit code is what a pod or child process returns."""
    nc = await connect(settings, name=f"jetreduce-agent-{config.phase}-{config.index}")
    agent: Agent | None = None
    try:
        subjects = Subjects(settings.prefix)
        js = nc.jetstream()
        await declare(js, subjects)
        ctx = ServiceContext(nc=nc, js=js, subjects=subjects)
        spec = await StateStore(js, subjects).get_spec(config.workflow_id)
        if spec is None:
            log.error("agent: unknown workflow %s", config.workflow_id)
            return 2
        agent = Agent(ctx, config, spec)
        bind(workflow_id=config.workflow_id)
        if tracing_enabled():
            traced_by = _traced_by(subjects, config)
            agent.trace = await stored_trace(js, subjects.events_stream, traced_by)
            if not agent.trace:  # that event's publisher was not traced: the workflow's
                accepted = subjects.workflow("accepted", config.workflow_id)
                agent.trace = await stored_trace(js, subjects.events_stream, accepted)
        if agent.masker:  # secrets never reach the agent's log either
            masking = MaskingFilter(agent.masker)
            for handler in logging.getLogger().handlers:
                handler.addFilter(masking)
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            agent.signalled = True
            agent.stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        runner = {"setup": agent.run_setup, "map": agent.run_map, "reduce": agent.run_reduce}
        if config.phase not in runner:
            log.error("agent: unknown phase %r", config.phase)
            return 2
        if config.phase == "map":  # no phase span: each item attempt is its own
            return await runner["map"]()
        attributes = {"jetreduce.workflow.id": config.workflow_id, "jetreduce.agent": agent.name}
        with span(
            config.phase, parent=agent.trace, kind="consumer", attributes=attributes, join_only=True
        ):
            return await runner[config.phase]()
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()
        if agent is not None:  # spills, spools and the agent's own workspaces
            shutil.rmtree(agent.scratch, ignore_errors=True)
