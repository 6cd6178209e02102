"""What every scenario shares: the harness options (:class:`Run`), the workflow texts, and
following a workflow from submit to its terminal event.

What is timed (stated here because "throughput" hides choices):

* workflows are followed by a *lean* recorder: it subscribes only to the workflow's
  ``workflow.*``/``setup.*``/``map.*``/``reduce.*``/``agent.*`` events (and ``item.done`` only
  where per-item times are needed), not to every item like ``cli.watch.Watcher`` does, so the
  harness process costs the 2-core machine as little as possible;
* ``e2e`` = submit request sent → ``workflow.completed`` received by the harness;
* item start = ``ItemDone.ts - ItemDone.duration_s`` (both taken in the agent), item end =
  ``ItemDone.ts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy

from jetreduce.cli.submit import submit
from jetreduce.contract import events as ev
from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.subjects import TERMINAL_EVENTS, Subjects
from jetreduce.runtime.connection import connect
from jetreduce.runtime.settings import NatsSettings
from loadtest.report import rounded

__all__ = [
    "DONE_DECODER",
    "Followed",
    "Recorder",
    "Run",
    "bound",
    "connect_harness",
    "follow_workflow",
    "noop_workflow",
    "pcts",
    "shell_workflow",
    "stored_events",
]


@dataclass
class Run:
    """Options of one harness invocation."""

    quick: bool
    profile_dir: Path | None = None
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="jr-load-")))

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def profile(self, name: str) -> Path | None:
        return None if self.profile_dir is None else self.profile_dir / f"{name}.txt"


# -- workflow texts ------------------------------------------------------------------------------
def noop_workflow(n: int, parallel: int, template: str = "[]") -> str:
    """``n`` items from ``seq``; ``agent_template: []`` runs nothing per item, so what is
    measured is the orchestration itself."""
    return (
        f'name: load-{n}\nmode: mapreduce\nmap:\n  input: "seq 1 {n}"\n'
        f"  max_parallel: {parallel}\n  agent_template: {template}\n"
        'reduce:\n  - shell: "echo ${map.successful} of ${map.total} items"\n'
    )


def shell_workflow(n: int, parallel: int, command: str) -> str:
    return noop_workflow(n, parallel, f"\n    - shell: {command!r}")


# -- following a workflow ------------------------------------------------------------------------
DONE_DECODER = msgspec.json.Decoder(ev.ItemDone)


class Recorder:
    """Arrival times (``time.time()``) of a workflow's phase events, and optionally every
    ``item.done`` payload (decoded after the run, so the callback stays cheap)."""

    TERMINAL = tuple(f"workflow.{e}" for e in (*TERMINAL_EVENTS, "rejected"))

    def __init__(self, nc: Client, subjects: Subjects, wf: str, *, items: bool = False) -> None:
        self.nc, self.s, self.wf, self.items = nc, subjects, wf, items
        self.times: dict[str, float] = {}
        self.payloads: dict[str, bytes] = {}
        self.raw_items: list[tuple[float, bytes]] = []
        self.done = asyncio.Event()
        self.item_waiters: dict[int, asyncio.Future[tuple[float, bytes]]] = {}
        self.progress: list[tuple[int, int]] = []
        """(in_flight, pending) of each progress snapshot while items were pending."""
        self._subs: list[Any] = []

    async def start(self) -> Recorder:
        async def on_event(msg: Any) -> None:
            kind = msg.subject.rsplit(".", 1)[0]
            self.times.setdefault(kind, time.time())
            self.payloads.setdefault(kind, msg.data)
            if kind in self.TERMINAL:
                self.done.set()

        async def on_item(msg: Any) -> None:
            now = time.time()
            self.raw_items.append((now, msg.data))
            if self.item_waiters:
                index = int(msg.subject.rsplit(".", 1)[1])
                fut = self.item_waiters.pop(index, None)
                if fut is not None and not fut.done():
                    fut.set_result((now, msg.data))

        async def on_progress(msg: Any) -> None:
            with contextlib.suppress(Exception):
                p = msgspec.json.decode(msg.data, type=ev.Progress)
                if p.pending > 0:
                    self.progress.append((p.in_flight, p.pending))

        self._subs.append(await self.nc.subscribe(self.s.progress(self.wf), cb=on_progress))
        for make in (self.s.workflow, self.s.setup, self.s.map, self.s.reduce, self.s.agent):
            self._subs.append(await self.nc.subscribe(make("*", self.wf), cb=on_event))
        if self.items:
            self._subs.append(await self.nc.subscribe(self.s.done_of(self.wf), cb=on_item))
        await self.nc.flush()
        return self

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def until_done(self, timeout_s: float) -> str:
        try:
            await asyncio.wait_for(self.done.wait(), timeout_s)
        except TimeoutError:
            raise TimeoutError(
                f"workflow {self.wf} not finished after {timeout_s:.0f}s "
                f"(events so far: {sorted(self.times)})"
            ) from None
        return next(k for k in self.TERMINAL if k in self.times)

    def item_spans(self) -> list[tuple[float, float]]:
        """(start, end) of every finished item, in agent clock (same host)."""
        spans = []
        for _, data in self.raw_items:
            done = DONE_DECODER.decode(data)
            spans.append((done.ts - done.duration_s, done.ts))
        return spans


async def connect_harness(url: str) -> Client:
    return await connect(NatsSettings(url=url), name="jetreduce-loadtest", forever=False)


@dataclass
class Followed:
    wf: str
    t_submit: float
    rec: Recorder
    outcome: str

    def at(self, kind: str) -> float | None:
        return self.rec.times.get(kind)

    def since_submit(self, kind: str) -> float | None:
        t = self.at(kind)
        return None if t is None else t - self.t_submit

    def mean_in_flight(self) -> float | None:
        """Leased-but-unacked items (``num_ack_pending``) averaged over the progress
        snapshots taken while items were still pending: how many of the slots were busy."""
        v = [i for i, _ in self.rec.progress]
        return round(statistics.fmean(v), 1) if v else None

    def phases(self) -> dict[str, float | None]:
        keys = [
            "workflow.accepted",
            "setup.completed",
            "workflow.planned",
            "agent.launched",
            "map.complete",
            "reduce.completed",
            "workflow.completed",
        ]
        return {k: rounded(self.since_submit(k)) for k in keys}


async def follow_workflow(
    url: str, text: str, *, timeout_s: float, items: bool = False, **options: Any
) -> Followed:
    """Submit ``text`` through the CLI's submit path and follow it to its terminal event."""
    nc = await connect_harness(url)
    try:
        subjects = Subjects("")
        wf = f"load-{secrets.token_hex(4)}"
        rec = await Recorder(nc, subjects, wf, items=items).start()
        t0 = time.time()
        await submit(
            nc, subjects, text, SubmitOptions(**options), workflow_id=wf, source="loadtest"
        )
        outcome = await rec.until_done(timeout_s)
        await rec.stop()
        return Followed(wf, t0, rec, outcome)
    finally:
        await nc.close()


def bound(n: int, per_s: float = 400.0, base_s: float = 120.0) -> float:
    """A generous time limit for ``n`` items: a scenario that stalls fails, it never hangs."""
    return base_s + n / per_s


def pcts(values: list[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean of ``values`` (nearest rank)."""
    v = sorted(values)

    def pct(p: float) -> float:
        return round(v[min(len(v) - 1, int(p * len(v)))], 3)

    return {
        "p50": pct(0.50),
        "p90": pct(0.90),
        "p99": pct(0.99),
        "max": round(v[-1], 3),
        "mean": round(statistics.fmean(v), 3),
    }


async def stored_events(nc: Client, wf: str, *, timeout_s: float = 15.0) -> list[ev.Event]:
    """Every stored event of ``wf``, oldest first: its lifecycle events (EVENTS stream:
    ``workflow``, ``setup``, ``map``, ``reduce``, ``agent`` — ``agent.usage`` included) and
    its ``item.done`` results (RESULTS stream). Their ``ts`` fields are the publishers'
    clocks (same host), which is what the timelines are built from: the harness's arrival
    times would add its own scheduling delay to every step."""
    s = Subjects("")
    js = nc.jetstream()
    events = [build("*", wf) for build in (s.workflow, s.setup, s.map, s.reduce, s.agent)]
    out: list[ev.Event] = []
    for stream, filters in ((s.events_stream, events), (s.results_stream, [s.done_of(wf)])):
        out.extend(await _read_stream(js, stream, filters, timeout_s))
    out.sort(key=lambda e: e.ts)
    return out


async def _read_stream(
    js: Any, stream: str, filters: list[str], timeout_s: float
) -> list[ev.Event]:
    """The stored messages of ``stream`` matching ``filters``, through one ordered consumer
    (no gap, no duplicate), until the last one says nothing is pending."""
    got: list[ev.Event] = []
    drained = asyncio.Event()

    async def on_msg(msg: Any) -> None:
        with contextlib.suppress(ev.BadEvent):
            got.append(ev.decode(msg.data))
        if msg.metadata.num_pending == 0:
            drained.set()

    sub = await js.subscribe(
        filters[0],
        stream=stream,
        cb=on_msg,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
        config=ConsumerConfig(filter_subjects=filters),
    )
    try:
        await asyncio.wait_for(drained.wait(), timeout_s)
    except TimeoutError:
        pass  # nothing stored (no message ever says "0 pending"): what we have is all there is
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return got
