"""What the launcher needs from a backend that runs agents (``local`` child processes,
``kubernetes`` Jobs). One class per backend, picked by the launcher's host."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from jetreduce.contract.records import StoredSpec

__all__ = ["AgentBackend", "ExitCallback"]

ExitCallback = Callable[[str, str, int, int, bool, int], Awaitable[None]]
"""Called when an agent fails: (workflow id, phase, agent index, exit code, will be restarted,
agents of the phase still running or restarting). Not called for clean exits or stops."""


class AgentBackend(Protocol):
    name: str
    on_exit: ExitCallback | None

    def plan(self, parallel: int) -> list[int]:
        """How ``parallel`` agent slots are spread over processes/pods (slots per agent)."""

    def running(self, wf: str, phase: str) -> bool: ...

    async def launch(self, wf: str, phase: str, slots: list[int], spec: StoredSpec) -> int:
        """Start the phase's agents unless already running (idempotent); returns how many
        agents were started (0 if they were already running)."""

    async def stop(self, wf: str, phase: str | None = None, grace_s: float = 10.0) -> None:
        """Stop a workflow's agents (of one phase, or all) and remove what was created."""

    async def stop_all(self, grace_s: float = 10.0) -> None: ...
