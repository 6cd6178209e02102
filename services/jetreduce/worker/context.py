"""An agent's shared state and helpers, whatever phase it runs (`AgentBase`): its config, the
workflow spec and environment (secrets resolved, masker), scratch space and workspaces, the
step runner (commit checks, masking), the watch for the workflow's end, and the claim under
which one agent at a time runs setup or reduce. Each phase adds its own runner on top
(`setup_phase`, `map_phase`, `reduce_phase`); `agent.Agent` assembles them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jetreduce.contract.events import (
    BadEvent,
    MapComplete,
    ReduceRestarted,
    SetupRestarted,
    decode_as,
    encode,
)
from jetreduce.contract.records import StoredSpec, counted_complete
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.workflow.model import Step
from jetreduce.lang.interpolate import Variables
from jetreduce.runtime.claim import CLAIM_TTL_S, Claim, Taken
from jetreduce.runtime.counts import count_subjects
from jetreduce.runtime.flag import Flag
from jetreduce.runtime.publish import is_stored, publish_retrying
from jetreduce.runtime.service import ServiceContext
from jetreduce.runtime.state import StateStore
from jetreduce.runtime.telemetry import (
    span,
)
from jetreduce.worker.claimed import run_claimed
from jetreduce.worker.elastic import DRAIN_IDLE_S
from jetreduce.worker.outcome import COMMIT_VALIDATION_FAILED
from jetreduce.worker.secrets import (
    EnvironmentProblem,
    Masker,
    WorkflowEnvironment,
    resolve_environment,
)
from jetreduce.worker.stepflow import StepsResult, run_steps
from jetreduce.worker.steps import StepOutcome, base_env, run_step
from jetreduce.worker.workspace import Workspaces, head

__all__ = ["AgentBase", "AgentConfig", "remove_leftovers"]

log = logging.getLogger(__name__)


BATCH_WAIT_S = 0.005
"""With nearly every slot busy, wait this long for more to free up before pulling."""
DEFAULT_LEASE_S = 30.0
"""Lease of a work item unless the submission set ``lease_s``; heartbeats at a third."""
CLAIMED_PHASES = ("setup", "reduce")
"""Phases whose steps one agent at a time runs, under a claim (runtime/claim.py)."""
RESULTS_REF = re.compile(r"map\.results(?!_file)")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
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
    drain_idle_s: float | None = DRAIN_IDLE_S
    """Map: how long an agent (index > 0) holds nothing before it asks whether the queue ran
    dry and leaves (worker/elastic.py); None (``JETREDUCE_DRAIN_IDLE_S=0``) keeps every agent
    until ``map.complete``."""

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
                drain_idle_s=float(env.get("JETREDUCE_DRAIN_IDLE_S", str(DRAIN_IDLE_S))) or None,
            )
        except KeyError as exc:
            raise SystemExit(f"agent: missing environment variable {exc}") from None
        except ValueError as exc:
            raise SystemExit(f"agent: bad numeric setting: {exc}") from None


class AgentBase:
    """What every phase of an agent shares: the workflow's spec and environment, the step
    runner, the end-of-workflow watch and the setup/reduce claim."""

    def __init__(self, ctx: ServiceContext, config: AgentConfig, spec: StoredSpec) -> None:
        self.ctx = ctx
        self.s: Subjects = ctx.subjects
        self.config = config
        self.spec = spec
        self.wf = config.workflow_id
        self.name = f"{socket.gethostname()}/{os.getpid()}/{config.phase}-{config.index}"
        self.workdir = spec.options.workdir or os.getcwd()
        self.stop = Flag()
        """Stop taking items; in-flight ones finish within the grace period (SIGTERM)."""
        self.phase_over = Flag()
        """The map phase or the workflow ended: the agent's job is done."""
        self.signalled = False
        self.abort = Flag()
        """The workflow ended (cancelled, failed…): in-flight steps are killed at once."""
        self.scratch_prefix = f"jetreduce-{self.wf}-{config.phase}{config.index}-"
        if config.phase not in CLAIMED_PHASES:
            # Setup and reduce clean up after a predecessor only once they hold the claim.
            remove_leftovers(self.scratch_prefix)
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
        captures_env = {k: v for k, v in spec.captures.items() if ENV_NAME.fullmatch(k)}
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
                outcome = dataclasses.replace(
                    outcome, exit_code=1, error=problem, kind=COMMIT_VALIDATION_FAILED
                )
            elif after == before:
                problem = f"commit required: the {step.kind} step made no commit"
                outcome = dataclasses.replace(outcome, error=problem, kind=COMMIT_VALIDATION_FAILED)
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

    async def _map_complete_holds(self, msg: Any) -> bool:
        """Whether the ``map.complete`` in ``msg`` is true (anyone who may publish events can
        send one): vouched for by the workflow's record (one read, ``counted_complete``),
        else by the exact count of terminal items, O(items) on the server, so made only for
        an event the record does not vouch for."""
        try:
            complete = decode_as(msg.data, MapComplete, subject=msg.subject)
        except BadEvent as exc:
            log.error("agent: unreadable map.complete ignored: %s", exc)
            return False
        try:
            if counted_complete(await StateStore(self.ctx.js, self.s).get(self.wf), complete):
                return True
            terminal = await count_subjects(
                self.ctx.nc, self.s.results_stream, self.s.terminal_of(self.wf)
            )
        except Exception as exc:
            log.warning("agent: map.complete not checked (%r); going on", exc)
            return False
        if terminal < self.total:
            log.error("agent: false map.complete ignored (%d terminal)", terminal)
            return False
        return True

    async def _watch_end(self, also_map_complete: bool) -> None:
        """Set ``stop`` when the workflow ends (or its map phase does)."""

        async def on_end(_msg: Any) -> None:
            self.phase_over.set()
            self.abort.set()
            self.stop.set()

        async def on_map_complete(msg: Any) -> None:
            if await self._map_complete_holds(msg):
                self.phase_over.set()
                self.stop.set()

        subs = [
            await self.ctx.nc.subscribe(subject, cb=on_end)
            for subject in self.s.workflow_ends(self.wf)
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
            remove_leftovers(self.scratch_prefix, keep=self.scratch)
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


def remove_leftovers(prefix: str, keep: Path | None = None) -> None:
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
