"""Agent entry point: one process runs one phase of one workflow (`run_agent`).

`Agent` assembles the phase runners, each in a module of its own on the shared `AgentBase`
(`context.py`): `setup_phase.SetupRunner`, `map_phase.MapRunner` (which records attempts
through `recording.ItemRecorder`, having decided them with `outcome.decide`) and
`reduce_phase.ReduceRunner`. The agent exits 0 when its phase is over or the workflow ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal

from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.runtime.connection import connect
from jetreduce.runtime.service import ServiceContext
from jetreduce.runtime.settings import NatsSettings
from jetreduce.runtime.state import StateStore
from jetreduce.runtime.telemetry import (
    bind,
    span,
    stored_trace,
    tracing_enabled,
)
from jetreduce.worker.context import AgentBase, AgentConfig
from jetreduce.worker.map_phase import MapRunner
from jetreduce.worker.reduce_phase import ReduceRunner
from jetreduce.worker.secrets import (
    MaskingFilter,
)
from jetreduce.worker.setup_phase import SetupRunner

__all__ = ["Agent", "AgentConfig", "run_agent"]

log = logging.getLogger(__name__)


class Agent(SetupRunner, MapRunner, ReduceRunner, AgentBase):
    """One agent: the runner of whichever phase its config names."""


def _traced_by(subjects: Subjects, config: AgentConfig) -> str:
    """The stored event whose trace headers a phase continues: setup the workflow's
    (``workflow.accepted``), map items the plan's, reduce the map completion's."""
    if config.phase == "map":
        return subjects.workflow("planned", config.workflow_id)
    if config.phase == "reduce":
        return subjects.map("complete", config.workflow_id)
    return subjects.workflow("accepted", config.workflow_id)


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
        with contextlib.suppress(Exception):  # exiting: the connection may be broken
            await nc.drain()
        if agent is not None:  # spills, spools and the agent's own workspaces
            shutil.rmtree(agent.scratch, ignore_errors=True)
        _quiet_exit()


def _quiet_exit() -> None:
    """Exiting: a stop signal now changes nothing. The event loop closes its wakeup pipe
    before it removes its signal handlers, and a SIGTERM in between (the launcher stopping
    the map agents just as they end on ``map.complete``) made the interpreter print
    "Exception ignored when trying to write to the signal wakeup fd" into the agent's log,
    breaking its one-JSON-object-per-line format. The handlers go first, then the signals
    are ignored for the last instants of the process."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
