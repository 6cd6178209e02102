"""Local backend: agents are child processes, forked by a warm agent host that has imported
the agent already (``launcher/warm.py``, ``cli/agent_host.py``: milliseconds per agent), or
started by exec as ``python -m jetreduce.cli.agent_main`` (what ``jetreduce worker`` runs,
without loading the whole CLI) where the host cannot be had: elsewhere than Linux, with
``JETREDUCE_WARM_AGENTS=0``, with a custom ``command``, or once a host failed to start. Both
give an agent the same environment, working directory, session, log file and exit codes, so
the supervision below does not know which it got.

An agent that exits 0 has finished its phase. One that was killed from outside (SIGKILL,
SIGTERM, SIGINT, SIGHUP, or 143 after handing its items back on SIGTERM: OOM killer,
operator, chaos) is restarted after a short pause and does not use up the crash budget, as
Kubernetes does not count disruptions; an item that keeps killing its agent is
dead-lettered by the work consumer's max deliveries instead. Kills within the healthy-run
window have their own, larger budget (``QUICK_KILLS_PER_RESTART``), so an agent killed at
every start still ends. An agent that fails by
itself is restarted with a growing delay, up to ``max_restarts`` failures in a row; one that
had run ``HEALTHY_RUN_S`` before failing starts its count over, so only crash loops (an agent
that cannot start) exhaust it. Every child is killed when
the workflow ends or the launcher stops, so nothing is left running; if the launcher's
process dies without stopping them (SIGKILL), the agents are SIGKILLed by the kernel and
their steps by the session reaper (``runtime/orphans.py``): no one is left to record what
they would finish, so they must not finish it (a resume runs those items again).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from jetreduce.contract.records import StoredSpec
from jetreduce.launcher.backend import ExitCallback, StatusCallback
from jetreduce.launcher.warm import NOT_INHERITED, WarmHost, WarmUnavailable, warm_supported
from jetreduce.runtime.orphans import SessionSweeper, die_with_parent, reaper
from jetreduce.runtime.settings import NatsSettings

__all__ = ["AgentSpec", "LocalBackend"]

log = logging.getLogger(__name__)

HEALTHY_RUN_S = 5.0
"""An agent that ran this long before dying was healthy: its restart count starts over."""

KILLED_RESTART_S = 0.5
"""Pause before replacing an agent killed from outside."""

HANDED_BACK = 143
"""The agent's exit code after SIGTERM (it stops taking items and hands its leases back)."""

KILLED_FROM_OUTSIDE = frozenset(
    {HANDED_BACK, -signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP}
)
"""Exits that say nothing about the agent itself (an operator, the OOM killer, an eviction).
A crash by its own signal (SIGSEGV, SIGABRT…) counts as a failure."""

QUICK_KILLS_PER_RESTART = 5
"""Kills from outside within ``HEALTHY_RUN_S`` of a start are allowed ``max_restarts`` times
this many in a row: generous, since chaos or an eviction storm is no fault of the agent, but
finite, so an agent that is OOM-killed at every start (a reduce that cannot fit) ends."""

AGENT_COMMAND = (sys.executable, "-m", "jetreduce.cli.agent_main")

AGENT_ENTRY = "jetreduce.cli.agent_main:main"
"""What a warm child calls: the same entry point as ``AGENT_COMMAND``."""


class AgentProcess(Protocol):
    """What supervision uses of an agent: an asyncio subprocess or a :class:`WarmProcess`."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...


@dataclass
class AgentSpec:
    workflow_id: str
    phase: str
    index: int
    slots: int
    workdir: str


@dataclass(eq=False)  # by identity: held in a set while stopping
class _Running:
    spec: AgentSpec
    proc: AgentProcess | None = None
    restarts: int = 0
    quick_kills: int = 0
    task: asyncio.Task[None] | None = None
    stopping: bool = False
    ended: bool = False
    extra: dict[str, str] = field(default_factory=dict)


class LocalBackend:
    name = "local"

    def __init__(
        self,
        settings: NatsSettings,
        *,
        log_dir: Path | None = None,
        max_processes: int | None = None,
        max_restarts: int = 10,
        on_exit: ExitCallback | None = None,
        command: tuple[str, ...] = AGENT_COMMAND,
        warm: bool | None = None,
        entry: str = AGENT_ENTRY,
    ) -> None:
        """``warm``: fork agents from a warm host (None: unless ``JETREDUCE_WARM_AGENTS=0``);
        never with a custom ``command``, which only exec runs. ``entry``: what a warm child
        calls (tests give a probe)."""
        self.settings = settings
        self.log_dir = log_dir
        self.max_processes = max_processes or max(2, os.cpu_count() or 2)
        self.max_restarts = max_restarts
        self.on_exit = on_exit
        self.on_status: StatusCallback | None = None
        """Unused: a child process has no status beyond its exit (``on_exit``)."""
        self.may_act: Callable[[], bool] = _always
        """Asked before an agent is restarted (the launcher's leadership fence)."""
        self.earlier_failures: Callable[[str], Awaitable[set[str]]] | None = None
        """Unused: a new leader's local agents are its own."""
        self.on_released: Callable[[str, str], Awaitable[None]] | None = None
        self.command = command
        self.entry = entry
        use_warm = warm_supported() if warm is None else warm and warm_supported()
        self._warm: WarmHost | None = None
        if use_warm and command == AGENT_COMMAND:
            host_log = log_dir / "agent-host.log" if log_dir is not None else None
            self._warm = WarmHost(log_file=host_log)
        self._agents: dict[tuple[str, str], list[_Running]] = {}
        self._sweeper = SessionSweeper()
        self._stopping: set[_Running] = set()
        """Runs taken out of ``_agents`` by a :meth:`stop` still under way: one cancelled
        midway (its caller's term ended) leaves them here for :meth:`stop_all`."""

    def plan(self, parallel: int) -> list[int]:
        """Slots per process: ``parallel`` slots spread over at most ``max_processes``."""
        procs = max(1, min(parallel, self.max_processes))
        base, extra = divmod(parallel, procs)
        return [base + (1 if i < extra else 0) for i in range(procs)]

    def refusal(self, spec: StoredSpec) -> str | None:
        """A workflow that asks for pods (``backend: kubernetes``, a namespace or an image)
        is not run here as processes: its submitter chose isolation or an image this host
        does not give, and running it anyway would hide that."""
        opts = spec.options
        if opts.backend != "local" or opts.namespace or opts.image:
            asked = opts.backend if opts.backend != "local" else "kubernetes (namespace/image)"
            return (
                f"could not start: the workflow asks for the {asked} backend, but this "
                "installation's launcher runs agents as local processes (start the services "
                "with --backend kubernetes, or submit without --backend kubernetes)"
            )
        return None

    def running(self, wf: str, phase: str) -> bool:
        return any(r.task and not r.task.done() for r in self._agents.get((wf, phase), []))

    def held(self, wf: str, phase: str) -> int | None:
        return sum(
            r.spec.slots
            for r in self._agents.get((wf, phase), [])
            if r.task and not r.task.done() and not r.ended
        )

    async def sync(self) -> None:
        """Nothing to look at: local agents die with the launcher that started them. The
        warm host is started now if it is not running, so that the first agent need not
        wait for its imports."""
        if self._warm is not None:
            self._warm.prestart()

    async def launch(self, wf: str, phase: str, slots: list[int], spec: StoredSpec) -> int:
        """Start the phase's agents unless they are already running. Returns how many."""
        workdir = spec.options.workdir or os.getcwd()
        if self.running(wf, phase):
            return 0
        runs = [_Running(AgentSpec(wf, phase, i, n, workdir)) for i, n in enumerate(slots)]
        self._agents[(wf, phase)] = runs
        for run in runs:
            run.task = asyncio.create_task(self._supervise(run), name=f"agent {wf}/{phase}")
        return len(runs)

    async def _spawn(self, run: _Running) -> AgentProcess:
        spec = run.spec
        # The launcher's environment passes through (agent settings such as
        # JETREDUCE_GRACE_S included), except its own connection and identity variables.
        env = {k: v for k, v in os.environ.items() if not k.startswith(NOT_INHERITED)}
        env.update(self.settings.to_env())
        env.update(
            JETREDUCE_WORKFLOW_ID=spec.workflow_id,
            JETREDUCE_PHASE=spec.phase,
            JETREDUCE_AGENT_INDEX=str(spec.index),
            JETREDUCE_SLOTS=str(spec.slots),
            PYTHONUNBUFFERED="1",
        )
        out: int | None = asyncio.subprocess.DEVNULL
        handle = None
        if self.log_dir is not None:
            directory = self.log_dir / spec.workflow_id
            directory.mkdir(parents=True, exist_ok=True)
            handle = open(directory / f"{spec.phase}-{spec.index}.log", "ab")  # noqa: SIM115
            out = handle.fileno()
        host = self._warm
        if host is not None and handle is None:
            handle = open(os.devnull, "ab")  # noqa: SIM115
        cwd = spec.workdir if os.path.isdir(spec.workdir) else None
        try:
            if host is not None and handle is not None:
                try:
                    proc: AgentProcess = await host.spawn(
                        env, cwd or os.getcwd(), handle.fileno(), self.entry, self.command
                    )
                    reaper().watch(proc.pid)
                    return proc
                except WarmUnavailable as exc:
                    if self._warm is host:  # the first spawn to learn it: say it once
                        log.warning("%s; starting agents by exec from now on", exc)
                        self._warm = None
                        await host.stop()
            proc = await asyncio.create_subprocess_exec(
                *self.command,
                env=env,
                cwd=cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                preexec_fn=functools.partial(die_with_parent, signal.SIGKILL),
            )
            reaper().watch(proc.pid)
            return proc
        finally:
            if handle is not None:
                handle.close()

    async def _supervise(self, run: _Running) -> None:
        spec = run.spec
        while True:
            started = time.monotonic()
            run.proc = await self._spawn(run)
            if run.stopping:  # stopped while it was being started: it must not outlive that
                _signal(run.proc, signal.SIGTERM)
            try:
                code = await run.proc.wait()
            finally:
                # Steps an agent left behind (it was killed mid-item) die with it: swept in
                # passes over /proc shared by the agents that ended meanwhile (SessionSweeper).
                if run.proc.returncode is not None:
                    await self._sweeper.sweep(run.proc.pid, leader=False)
                    reaper().forget(run.proc.pid)
            if code == 0:
                run.ended = True  # its slots are no longer held
            if code == 0 and not run.stopping and self.on_released is not None:
                # It left its phase on its own: drained early (its slots are free for
                # others), or the phase ended. The launcher admits waiting workflows.
                with contextlib.suppress(Exception):  # a report: supervision must go on
                    await self.on_released(spec.workflow_id, spec.phase)
            if code == 0 or run.stopping:
                return
            killed = code in KILLED_FROM_OUTSIDE
            if time.monotonic() - started >= HEALTHY_RUN_S:
                run.restarts = run.quick_kills = 0
            elif killed:
                run.quick_kills += 1
            if killed:
                restart = run.quick_kills < self.max_restarts * QUICK_KILLS_PER_RESTART
            else:
                restart = run.restarts < self.max_restarts
            log.warning(
                "agent %s/%s-%d exited with %d%s",
                spec.workflow_id,
                spec.phase,
                spec.index,
                code,
                "; restarting" if restart else "; giving up",
            )
            if self.on_exit is not None:
                others = sum(
                    1
                    for r in self._agents.get((spec.workflow_id, spec.phase), [])
                    if r is not run and r.task is not None and not r.task.done()
                )
                with contextlib.suppress(Exception):  # a report: supervision must go on
                    await self.on_exit(
                        spec.workflow_id,
                        spec.phase,
                        spec.index,
                        code,
                        restart,
                        others + (1 if restart else 0),
                    )
            if not restart:
                return
            if killed:
                await asyncio.sleep(KILLED_RESTART_S)
            else:
                run.restarts += 1
                await asyncio.sleep(min(10.0, 0.5 * 2 ** (run.restarts - 1)))
            if run.stopping or not self.may_act():
                return

    async def stop(self, wf: str, phase: str | None = None, grace_s: float = 10.0) -> None:
        keys = [k for k in self._agents if k[0] == wf and (phase is None or k[1] == phase)]
        runs = [r for k in keys for r in self._agents.pop(k)]
        self._stopping.update(runs)
        try:
            await self._terminate(runs, grace_s)
        finally:
            self._stopping.difference_update(r for r in runs if r.task is None or r.task.done())

    async def stop_all(self, grace_s: float = 10.0) -> None:
        runs = [r for rs in self._agents.values() for r in rs] + list(self._stopping)
        self._agents.clear()
        self._stopping.clear()
        try:
            await self._terminate(runs, grace_s)
        finally:
            if self._warm is not None:
                await self._warm.stop()  # a later launch starts a new one

    async def _terminate(self, runs: list[_Running], grace_s: float) -> None:
        for run in runs:
            run.stopping = True
            _signal(run.proc, signal.SIGTERM)
        tasks = [r.task for r in runs if r.task is not None]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        for run in runs:
            if run.task in pending:
                _signal_group(run.proc, signal.SIGKILL)
        if pending:
            await asyncio.wait(pending, timeout=5)
            for task in pending:
                task.cancel()
            # Until each has ended: a task cancelled and left would outlive the stop.
            await asyncio.gather(*pending, return_exceptions=True)


def _always() -> bool:
    return True


def _signal(proc: AgentProcess | None, sig: int) -> None:
    """Ask the agent alone to stop. Not its process group: its steps and git commands run
    in groups of their own, so the group holds nothing else but a child the agent has just
    forked and that has not left the group yet, and a SIGTERM there kills that child as it
    execs (its handlers are reset first): an item's step, or the `git branch -D` of the
    agent's cleanup as it left on ``map.complete`` (fresh clone 28). The agent stops its
    steps itself; a SIGKILL after the grace period goes to the group (`_signal_group`)."""
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(proc.pid, sig)


def _signal_group(proc: AgentProcess | None, sig: int) -> None:
    """Signal the agent and everything it started in its own process group."""
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
