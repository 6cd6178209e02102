"""What the launcher needs from a backend that runs agents (``local`` child processes,
``kubernetes`` Jobs). One class per backend, picked by the launcher's host."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from jetreduce.contract.events import JobStatus, PodFailed
from jetreduce.contract.records import StoredSpec

__all__ = ["AgentBackend", "ExitCallback", "StatusCallback", "Stops"]

log = logging.getLogger(__name__)


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


STOP_ATTEMPTS = 5
"""Tries of a background stop whose backend call fails (a transient API error): the
agents left behind stop taking items on ``map.complete`` anyway, and the workflow's end
(or the janitor) removes them."""


class Stops:
    """Stops of agents run in the background, so that what follows starts at once instead
    of waiting for them to exit: the reduce after ``map.complete`` (issue 18: 1,000 map
    agents took 14 s), the next workflow's events after one ended. Until a stop has
    returned, the map slots its agents held stay counted (:meth:`slots`): an admission must
    not hand them out while they still run. ``after(wf, phase)`` is awaited once a stop has
    returned (the launcher admits waiting workflows). Every stop is tracked: :meth:`cancel`
    ends them (the backend's ``stop_all`` then takes what they had not finished)."""

    def __init__(
        self,
        backend: AgentBackend,
        after: Callable[[str, str | None], Awaitable[None]],
        retry_s: float = 0.5,
    ) -> None:
        self.backend = backend
        self.after = after
        self.retry_s = retry_s
        self._tasks: dict[asyncio.Task[None], tuple[str, str | None, int]] = {}
        self._after: set[asyncio.Task[None]] = set()
        """Stops that returned and now run ``after`` (no longer counted as stopping, still
        tracked: :meth:`cancel` must end them too, or they outlive the term)."""

    def start(self, wf: str, phase: str | None, map_slots: int) -> None:
        """Stop ``wf``'s agents of ``phase`` (None: all) in the background, counting
        ``map_slots`` (the map slots they hold) meanwhile. Idempotent: nothing new is
        started while such a stop is under way (a second ``map.complete`` delivery, the
        reconciler); the launcher starts no agents of a phase that is being stopped."""
        if self.stopping(wf, phase):
            return
        task = asyncio.create_task(self._stop(wf, phase), name=f"stop {wf}/{phase or 'all'}")
        self._tasks[task] = (wf, phase, map_slots)
        task.add_done_callback(self._forget)

    def stopping(self, wf: str, phase: str | None) -> bool:
        return any(k[:2] == (wf, phase) for k in self._tasks.values())

    def slots(self) -> int:
        """Map slots held by agents that are being stopped."""
        return sum(n for *_, n in self._tasks.values())

    async def wait(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) for the stops under way."""
        if self._tasks or self._after:
            await asyncio.wait([*self._tasks, *self._after], timeout=timeout_s)

    async def cancel(self) -> None:
        """End every stop under way (a term ends): the backend's ``stop_all`` that follows
        stops whatever they had not (local agents mid-stop are kept for it)."""
        tasks = [*self._tasks, *self._after]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("stop failed", exc_info=task.exception())

    async def _stop(self, wf: str, phase: str | None) -> None:
        for attempt in range(STOP_ATTEMPTS):
            try:
                await self.backend.stop(wf, phase)
                break
            except Exception as exc:
                what = f"{phase} agents" if phase else "agents"
                if attempt == STOP_ATTEMPTS - 1:
                    log.error("workflow %s: %s not stopped: %s", wf, what, exc)
                    return
                log.warning("workflow %s: stopping %s failed (%s); retrying", wf, what, exc)
                await asyncio.sleep(self.retry_s * 2**attempt)
        me = asyncio.current_task()
        if me is None:
            await self.after(wf, phase)
            return
        self._tasks.pop(me, None)  # its slots are free from now on
        self._after.add(me)
        try:
            await self.after(wf, phase)
        finally:
            self._after.discard(me)
