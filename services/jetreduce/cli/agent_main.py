"""Entry point of an agent process (``jetreduce worker``, or ``python -m
jetreduce.cli.agent_main`` as the local backend execs it: without the CLI's imports, which
cost a third of a second at every agent start): everything comes from environment variables,
as a pod's would.

:func:`main` is also what a warm agent runs (``cli/agent_host.py``): called in a child
forked from a host that has imported this module, after the child has been given the
environment, working directory and stdio an exec would have given it. So it must build
every piece of process state itself (logging, telemetry, its event loop and connection),
and this module must do nothing at import beyond importing."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from jetreduce.cli import exit_codes
from jetreduce.cli.logs import configure
from jetreduce.runtime import telemetry
from jetreduce.runtime.connection import CONNECT_TIMEOUT_ENV, ConnectFailed
from jetreduce.runtime.settings import NatsSettings
from jetreduce.worker.agent import AgentConfig, run_agent

AGENT_CONNECT_TIMEOUT_S = 120.0
"""An agent's first connection waits longer than a command's (unless
``JETREDUCE_CONNECT_TIMEOUT_S`` says otherwise): a pod may start while the network or NATS is
still coming up, and failing it would spend its Job's retries on that."""


def main() -> int:
    """Run one agent; returns its exit code (the caller exits with it)."""
    configure()
    os.environ.setdefault(CONNECT_TIMEOUT_ENV, str(AGENT_CONNECT_TIMEOUT_S))
    settings = NatsSettings.from_env()
    config = AgentConfig.from_env()
    telemetry.configure(f"jetreduce-agent-{config.phase}")
    _watch_steps_by_pidfd()
    try:
        return asyncio.run(run_agent(settings, config))
    except ConnectFailed as exc:
        logging.getLogger(__name__).error("agent: %s", exc)
        return exit_codes.UNREACHABLE
    finally:
        telemetry.shutdown()  # flush the last spans before the process ends


def _watch_steps_by_pidfd() -> None:
    """Wait for step processes through pidfds, not a thread per child. On Python 3.11 asyncio
    starts a thread for every subprocess to block in ``waitpid``: in the shell and efficiency
    load tests that thread's start and wait were ~40 % of the agents' samples, more than the
    fork and exec of the step. 3.12 and later use pidfds by themselves (and deprecate
    choosing the watcher), so only 3.11 on a kernel with ``pidfd_open`` changes here."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # the kernel has no pidfds (before Linux 5.3): keep the default
        return
    asyncio.get_event_loop_policy().set_child_watcher(asyncio.PidfdChildWatcher())


if __name__ == "__main__":
    raise SystemExit(main())
