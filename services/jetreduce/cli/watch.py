"""Following one workflow: its events and progress snapshots until it ends.

Subscribes before looking at stored state, so nothing that happens in between is missed. On
a terminal, a live progress bar (done / failed / total, rate, ETA); otherwise plain lines, at
most one every few seconds, so logs of CI runs stay readable.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import time
from typing import IO, Any

from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from jetreduce.cli.text import printable
from jetreduce.contract import events as ev
from jetreduce.contract.subjects import TERMINAL_EVENTS, Subjects

__all__ = ["Watcher", "describe"]

TERMINAL = (
    ev.WorkflowCompleted,
    ev.WorkflowFailed,
    ev.WorkflowCancelled,
    ev.WorkflowTimedOut,
    ev.WorkflowRejected,
)
Terminal = (
    ev.WorkflowCompleted
    | ev.WorkflowFailed
    | ev.WorkflowCancelled
    | ev.WorkflowTimedOut
    | ev.WorkflowRejected
)
PLAIN_EVERY_S = 2.0


def slot_use(event: ev.WorkflowCompleted) -> str:
    """``, map slots busy 75% of the time held`` (the map agents' own reports), or nothing
    when no map agent reported (no map, or agents that never started)."""
    if event.utilisation is None:
        return ""
    return f", map slots busy {event.utilisation:.0%} of the time held"


def describe(event: ev.Event) -> str:
    """One readable line per event: names, reasons and errors come from submitters and
    steps, so their control characters are escaped (a newline cannot split the line, an
    escape sequence cannot drive the terminal)."""
    return printable(_describe(event))


def _describe(event: ev.Event) -> str:
    kind = type(event).__name__
    if isinstance(event, ev.Progress):
        eta = f", ETA {event.eta_s:.0f}s" if event.eta_s is not None else ""
        return (
            f"progress: {event.done + event.dead}/{event.total} "
            f"({event.done} done, {event.dead} failed, {event.in_flight} running), "
            f"{event.rate_per_s:.1f} items/s{eta}"
        )
    if isinstance(event, ev.WorkflowPlanned):
        return f"planned: {event.total} items, {event.max_parallel} in parallel"
    if isinstance(event, ev.AgentLaunched):
        return f"launched {event.agents} {event.phase} agent(s), {event.slots} slot(s)"
    if isinstance(event, ev.AgentExited):
        return f"{event.phase} agent {event.index} exited with {event.exit_code}" + (
            " (restarting)" if event.restarted else f": {event.reason}" if event.reason else ""
        )
    if isinstance(event, ev.AgentUsage):
        return _usage(event)
    if isinstance(event, ev.PodFailed):
        code = f", exit code {event.exit_code}" if event.exit_code is not None else ""
        note = " (disruption: retried, not counted)" if event.disruption else ""
        where = f"{event.phase} pod {event.pod} (index {event.index})"
        return f"{where} failed: {event.reason}{code}{note}"
    if isinstance(event, ev.JobStatus):
        counts = f"{event.active} active, {event.succeeded} succeeded, {event.failed} failed"
        why = f" ({event.reason})" if event.reason else ""
        return f"{event.phase} Job {event.job} {event.state}{why}: {counts}"
    if isinstance(event, ev.ItemFailed):
        retry = (
            f"; retry in {event.retry_in_s:.1f}s"
            if event.retry_in_s is not None
            else "; no attempts left"
        )
        return f"item {event.item_id} attempt {event.attempt} failed: {event.error}{retry}"
    if isinstance(event, ev.ItemDead):
        return f"item {event.item_id} dead after {event.attempts} attempt(s): {event.error}"
    if isinstance(event, ev.MapComplete):
        return f"map complete: {event.done} done, {event.dead} failed of {event.total}"
    if isinstance(event, ev.MapFailed):
        return f"map failed: {event.item_id} failed and its on_failure sets fail_workflow"
    if isinstance(event, ev.SetupCompleted):
        return f"setup completed ({event.input_bytes} bytes of input)"
    if isinstance(event, ev.SetupFailed):
        return f"setup failed: {event.error}"
    if isinstance(event, ev.ReduceFailed):
        return f"reduce failed: {event.error}"
    if isinstance(event, ev.WorkflowCompleted):
        return (
            f"completed: {event.done} done, {event.dead} failed of {event.total} "
            f"in {event.duration_s:.1f}s{slot_use(event)}"
        )
    if isinstance(event, ev.WorkflowFailed):
        return f"failed: {event.reason}"
    if isinstance(event, ev.WorkflowCancelled):
        return f"cancelled: {event.reason}"
    if isinstance(event, ev.WorkflowRejected):
        return "rejected: " + "; ".join(p.message for p in event.problems)
    if isinstance(event, ev.QueueStatus):
        if event.state == "available":
            return f"agent {event.agent}: {event.queue} queue available again"
        return f"agent {event.agent}: {event.queue} queue unavailable ({event.error}); backing off"
    if isinstance(event, ev.CircuitChanged):
        return f"agent {event.agent}: circuit {event.state.replace('_', '-')}"
    if isinstance(event, ev.WorkflowReopened):
        return f"reopened: {event.retried} dead item(s) retried"
    # ReduceStarted → "reduce started", WorkflowAccepted → "workflow accepted"…
    return re.sub(r"(?<!^)(?=[A-Z])", " ", kind).lower()


def _usage(event: ev.AgentUsage) -> str:
    """What an agent did with the slots it held: a low share busy says the workflow kept
    more slots than its items needed (``max_parallel`` too high, or a long tail); "drained
    early" says the agent handed its slots back when the queue ran dry."""
    share = f" ({event.busy_s / event.held_s:.0%})" if event.held_s > 0 else ""
    left = "drained early" if event.drained else "not drained"
    return (
        f"agent {event.agent} usage: {event.slots} slot(s), busy {event.busy_s:.1f} of "
        f"{event.held_s:.1f} slot-seconds held{share}, {event.items} item(s), {left}"
    )


class Watcher:
    def __init__(
        self,
        nc: Client,
        subjects: Subjects,
        workflow_id: str,
        *,
        out: IO[str] | None = None,
        tty: bool | None = None,
        show_events: bool = True,
        show_items: bool = False,
        quiet: bool = False,
        from_start: bool = False,
    ) -> None:
        """``quiet``: show nothing while following (no progress, no events). ``from_start``:
        show the workflow's stored lifecycle events from its first one (``watch`` started
        after ``submit``), not only those published once watching."""
        self.nc = nc
        self.s = subjects
        self.wf = workflow_id
        self.out = out or sys.stderr
        self.tty = self.out.isatty() if tty is None else tty
        self.show_events = show_events
        self.show_items = show_items
        self.quiet = quiet
        self.from_start = from_start
        self.queue: asyncio.Queue[ev.Event] = asyncio.Queue()
        self._subs: list[Any] = []
        self.last_progress: ev.Progress | None = None

    async def start(self) -> None:
        async def on_msg(msg: Any) -> None:
            with contextlib.suppress(ev.BadEvent):
                self.queue.put_nowait(ev.decode(msg.data))

        live = self.s.all_of(self.wf, done_items=self.show_items)
        if self.from_start:
            # Lifecycle events come from the EVENTS stream, oldest first, then as they are
            # stored (one ordered consumer: no gap, no duplicate); the rest stays live.
            phases = [
                build("*", self.wf)
                for build in (self.s.workflow, self.s.setup, self.s.map, self.s.reduce)
            ] + [self.s.agent("*", self.wf)]
            self._subs.append(
                await self.nc.jetstream().subscribe(
                    phases[0],
                    stream=self.s.events_stream,
                    cb=on_msg,
                    ordered_consumer=True,
                    deliver_policy=DeliverPolicy.ALL,
                    config=ConsumerConfig(filter_subjects=phases),
                )
            )
            live = [x for x in live if x.split(".")[-3:] != ["*", "*", self.wf]]
        for subject in live:
            self._subs.append(await self.nc.subscribe(subject, cb=on_msg))

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):  # cleanup: the connection may be closing
                await sub.unsubscribe()
        self._subs.clear()

    async def stored_terminal(self) -> Terminal | None:
        js = self.nc.jetstream()
        for name in (*TERMINAL_EVENTS, "rejected"):
            try:
                msg = await js.get_last_msg(self.s.events_stream, self.s.workflow(name, self.wf))
            except NotFoundError:
                continue
            event = ev.decode(msg.data or b"")
            if isinstance(event, TERMINAL):
                return event
        return None

    async def until_done(self, timeout_s: float | None = None) -> Terminal:
        """Follow the workflow; returns its terminal event."""
        if not self._subs:
            await self.start()
        # From the start, the stored history (its end included) is replayed anyway.
        stored = None if self.from_start else await self.stored_terminal()
        if stored is not None:
            return stored
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._display() as show:
            while True:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    event = await asyncio.wait_for(self.queue.get(), wait)
                except TimeoutError:
                    raise TimeoutError(f"workflow {self.wf} did not finish in time") from None
                show(event)
                if isinstance(event, TERMINAL):
                    return event

    @contextlib.contextmanager
    def _display(self) -> Any:
        if self.quiet:
            yield lambda event: None
        elif self.tty:
            console = Console(file=self.out)
            bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[failed]} failed"),
                TextColumn("{task.fields[rate]} items/s"),
                TextColumn("ETA {task.fields[eta]}"),
                TimeElapsedColumn(),
                console=console,
                transient=False,
            )
            task: TaskID | None = None
            with bar:

                def show(event: ev.Event) -> None:
                    nonlocal task
                    if isinstance(event, ev.Progress):
                        fields: dict[str, Any] = {
                            "failed": event.dead,
                            "rate": f"{event.rate_per_s:.1f}",
                            "eta": "-" if event.eta_s is None else f"{event.eta_s:.0f}s",
                        }
                        if task is None:
                            task = bar.add_task(self.wf, total=event.total, **fields)
                        bar.update(
                            task, completed=event.done + event.dead, total=event.total, **fields
                        )
                    elif self._wanted(event):
                        bar.console.print(describe(event))

                yield show
        else:
            last = 0.0

            def show(event: ev.Event) -> None:
                nonlocal last
                if isinstance(event, ev.Progress):
                    self.last_progress = event
                    now = time.monotonic()
                    if now - last >= PLAIN_EVERY_S or event.done + event.dead >= event.total:
                        last = now
                        print(describe(event), file=self.out, flush=True)
                elif self._wanted(event):
                    print(describe(event), file=self.out, flush=True)

            yield show

    def _wanted(self, event: ev.Event) -> bool:
        if isinstance(event, ev.ItemDone):
            return self.show_items
        return self.show_events
