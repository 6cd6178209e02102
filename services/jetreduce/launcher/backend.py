"""What the launcher needs from a backend that runs agents (``local`` child processes,
``kubernetes`` Jobs). One class per backend, picked by the launcher's host."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from jetreduce.contract.events import JobStatus, PodFailed
from jetreduce.contract.records import StoredSpec

__all__ = ["AgentBackend", "ExitCallback", "StatusCallback"]


class ExitCallback(Protocol):
    """Called when an agent fails: (workflow id, phase, agent index, exit code, will be
    restarted, agents of the phase still running or restarting, and ``reason``: why the
    backend gives up, when it does and can say more than the exit code). Not called for clean
    exits or stops."""

    def __call__(
        self,
        wf: str,
        phase: str,
        index: int,
        code: int,
        restarted: bool,
        remaining: int,
        reason: str = "",
    ) -> Awaitable[None]: ...


StatusCallback = Callable[[JobStatus | PodFailed], Awaitable[None]]
"""Called with what a backend that can see more than exits (Kubernetes Job and pod status)
reports; the launcher publishes it as is. Backends without such status never call it."""


class AgentBackend(Protocol):
    name: str
    on_exit: ExitCallback | None
    on_status: StatusCallback | None
    may_act: Callable[[], bool]
    """Asked before an action the backend takes on its own (restarting an agent,
    relaunching a Job, a poll that reports): the launcher sets it to its leadership's fence,
    so a replica that does not lead, or no longer may, starts nothing and reports nothing.
    Backends start with one that always allows."""
    earlier_failures: Callable[[str], Awaitable[set[str]]] | None
    """Set by the launcher: workflow → names of the pods whose failure is stored already
    (an earlier leader reported it), so that a new leader does not report their exits
    again. Unused by backends whose agents die with their launcher."""

    def plan(self, parallel: int) -> list[int]:
        """How ``parallel`` agent slots are spread over processes/pods (slots per agent)."""

    on_released: Callable[[str, str], Awaitable[None]] | None
    """Set by the launcher: called with (workflow id, phase) when an agent left its phase
    early and cleanly (it drained: the queue ran dry), so its slots are free for others."""

    def running(self, wf: str, phase: str) -> bool: ...

    def held(self, wf: str, phase: str) -> int | None:
        """Slots the phase's agents hold now (running, starting or to be restarted), or None
        when the backend cannot tell (the launcher then counts the slots it planned)."""

    async def sync(self) -> None:
        """Make :meth:`running` true to the world before slots are counted: a backend whose
        agents outlive the launcher (Kubernetes Jobs) looks once at what runs; one whose
        agents die with it (local processes) knows already."""

    def refusal(self, spec: StoredSpec) -> str | None:
        """Why this backend cannot run the workflow as submitted (it asks for another
        backend, or for a namespace this installation may not use), or None. The launcher
        then fails the workflow with this text instead of running its agents elsewhere."""

    async def launch(self, wf: str, phase: str, slots: list[int], spec: StoredSpec) -> int:
        """Start the phase's agents unless already running (idempotent); returns how many
        agents were started (0 if they were already running)."""

    async def stop(self, wf: str, phase: str | None = None, grace_s: float = 10.0) -> None:
        """Stop a workflow's agents (of one phase, or all) and remove what was created."""

    async def stop_all(self, grace_s: float = 10.0) -> None:
        """Stop acting: the launcher stops or steps down. Local agents are stopped (they
        must not outlive the leadership that counts them); Kubernetes Jobs are left to the
        next leader, and what the poller knew is forgotten (a later term lists afresh)."""
