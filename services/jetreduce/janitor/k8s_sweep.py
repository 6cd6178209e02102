"""Orphan sweep: cluster objects of workflows that are over, or that JetStream no longer knows.

The launcher deletes a workflow's Jobs, ConfigMaps and Secrets when it sees the workflow's
terminal event, so on the normal path nothing is left. The sweep catches what that path
cannot: a launch that raced the terminal event (the reconciler read the workflow as running,
the workflow ended, then the create landed), a relaunch racing ``map.complete``, objects of a
workflow whose record was removed from ``JR_WORKFLOWS``, and anything left by an outage. It
runs when the janitor starts and every ``every_s`` after that.

The janitor never imports the launcher (services share only ``contract``, ``runtime`` and
``queues``) nor the ``kubernetes`` client (only the launcher's adapter may). It takes the
object store as :class:`WorkflowObjects`, a protocol that the launcher's
``KubernetesBackend`` satisfies: ``workflows()`` lists the ids that own objects (by label)
and ``stop(wf)`` deletes them (by label), the one deletion path for both services. The host
that builds the services hands the same kind of backend to both.

Nothing is deleted on doubt: a workflow whose record cannot be read (NATS trouble) is left
for the next sweep. A workflow is swept only when its record says it is over, or when the
read answered that there is no record. This assumes one installation per namespace (object
names carry no installation part either: two would collide already).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from jetreduce.runtime.state import StateStore

__all__ = ["ORPHAN_SWEEP_S", "OrphanSweeper", "WorkflowObjects"]

log = logging.getLogger(__name__)

ORPHAN_SWEEP_S = 60.0
"""Between sweeps. Three LISTs a sweep (Jobs, ConfigMaps, Secrets), whatever the number of
workflows; an orphan costs little while it waits (a finished Job's pods are gone, an
unfinished orphan's agents find their workflow over and exit)."""


class WorkflowObjects(Protocol):
    """What the sweep needs from whoever creates a workflow's cluster objects."""

    async def workflows(self) -> set[str]:
        """Ids of every workflow that owns objects; may raise on an API failure."""

    async def stop(self, wf: str, phase: str | None = None, grace_s: float = 10.0) -> None:
        """Delete every object of ``wf`` (idempotent)."""


class OrphanSweeper:
    def __init__(
        self, state: StateStore, objects: WorkflowObjects, every_s: float = ORPHAN_SWEEP_S
    ) -> None:
        self.state = state
        self.objects = objects
        self.every_s = every_s

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep now, then every ``every_s`` until ``stop``; a failed sweep is logged and
        retried at the next interval."""
        while not stop.is_set():
            try:
                await self.sweep_once()
            except Exception as exc:
                log.warning("janitor: orphan sweep failed: %s", exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.every_s)

    async def sweep_once(self) -> list[str]:
        """Delete the objects of every workflow that is terminal or unknown; returns those
        workflow ids (sorted)."""
        swept: list[str] = []
        for wf in sorted(await self.objects.workflows()):
            try:
                record = await self.state.get(wf)
            except Exception as exc:  # unknown is an answer; an error is not
                log.warning("janitor: cannot read workflow %s, not swept: %s", wf, exc)
                continue
            if record is not None and not record.phase.terminal:
                continue
            await self.objects.stop(wf)
            swept.append(wf)
            log.info(
                "janitor: swept the cluster objects of %s workflow %s",
                "unknown" if record is None else record.phase.value,
                wf,
            )
        return swept
