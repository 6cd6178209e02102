"""Chaos on the production topology (issue 19): the shared 3-node cluster, streams and buckets
at R3, two ``services up`` processes, one workflow whose items and reduce record their side
effects. While it maps: SIGKILL the node leading the WORK stream and restart it, SIGKILL the
meta leader (and restart it), SIGKILL one services process for good (its agents with it).
Afterwards the workflow completed, every item's result is stored exactly once, reduce ran and
completed exactly once, and nothing of it is left running.

``random.Random(seed)`` orders and places the faults; seeds come from
``JETREDUCE_CLUSTER_CHAOS_SEEDS`` (default 1,2,3). Each seed prints its timeline: every fault,
and how long the map stalled after it (the take-over time)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import hygiene
from chaos.test_chaos import agents_of, count_terminal, kill_sessions
from helpers import read_stream, stored_terminal_event
from jetreduce.cli.submit import submit
from jetreduce.cluster import LocalCluster
from jetreduce.contract import events as ev
from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.subjects import Subjects
from jetreduce.runtime.connection import connect
from jetreduce.runtime.orphans import die_with_parent
from jetreduce.runtime.settings import NatsSettings
from support import env_without_jetreduce, wait_for

pytestmark = pytest.mark.anyio

SEEDS = [int(s) for s in os.environ.get("JETREDUCE_CLUSTER_CHAOS_SEEDS", "1,2,3").split(",") if s]
ITEMS = int(os.environ.get("JETREDUCE_CLUSTER_CHAOS_ITEMS", "600"))
MAX_PARALLEL = 8
RUN_BUDGET_S = 120.0
"""Hard bound on one seed's workflow (submit to terminal event)."""

ITEM_SH = """
sleep 0.02
echo "$1" >> {work}/effects
echo out-$1
"""

REDUCE_SH = """
echo reduce >> {work}/reduce-runs
{python} -c '
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(len(rows), len({{r["item_id"] for r in rows}}), sum(int(r["output"][4:]) for r in rows))
' "$1"
"""

WORKFLOW = """
name: cluster-chaos
map:
  input: "seq 0 {last}"
  max_parallel: {parallel}
  agent_template:
    - shell: "sh {work}/item.sh ${{item}}"
reduce:
  - shell: "sh {work}/reduce.sh ${{map.results_file}}"
"""


@dataclass
class Run:
    seed: int
    root: Path
    prefix: str
    cluster: LocalCluster
    services: list[subprocess.Popen[bytes]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    def note(self, what: str) -> None:
        self.log.append(f"{time.monotonic() - self.t0:7.2f}s {what}")

    def start_services(self, index: int) -> None:
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        env = env_without_jetreduce() | {"JETREDUCE_PREFIX": self.prefix}
        command = [sys.executable, "-m", "jetreduce", "services", "up", "--nats"]
        with open(logs / f"services{index}.log", "ab") as out:
            self.services.append(
                subprocess.Popen(
                    [
                        *command,
                        self.cluster.url,
                        "--stream-replicas",
                        "3",
                        "--log-dir",
                        str(logs / f"agents{index}"),
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    cwd=self.root,
                    start_new_session=True,  # a kill takes its agents too
                    preexec_fn=die_with_parent,
                )
            )

    def kill_services(self, index: int) -> None:
        proc = self.services[index]
        self.note(f"SIGKILL services process {index} (pid {proc.pid}) for good")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def kill_node(self, name: str, why: str) -> None:
        self.note(f"SIGKILL node {name} ({why})")
        self.cluster.kill(name)

    async def restart_node(self, name: str) -> None:
        """Start it from this (the main) thread: a server dies with the thread that started
        it (runtime/orphans.py), and a worker thread ends. Back once it has rejoined (knows
        the meta leader); catching up is raft's business."""
        self.cluster.restart(name)
        node = self.cluster.node(name)
        assert node.proc is not None
        hygiene.keep(node.proc.pid)  # the session's server again, not this test's leak
        deadline = time.monotonic() + 30
        while (leader := await asyncio.to_thread(node.meta_leader)) is None:
            assert node.running and time.monotonic() < deadline, f"{name} did not rejoin"
            await asyncio.sleep(0.05)
        self.note(f"node {name} back, meta leader {leader}")

    def running_map(self, wf: str) -> int | None:
        """Index of the services process whose launcher runs ``wf``'s map agents."""
        parents = {_ppid(pid) for pid in agents_of(self.prefix, wf, "map")}
        for index, proc in enumerate(self.services):
            if proc.pid in parents:
                return index
        return None

    def teardown(self) -> None:
        for proc in self.services:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        for _ in range(3):
            agents = agents_of(self.prefix)
            if not agents:
                break
            kill_sessions(agents)
            time.sleep(0.2)

    def service_logs(self) -> str:
        out = []
        for path in sorted((self.root / "logs").rglob("*.log")):
            text = path.read_text(errors="replace")
            if any(w in text for w in ("Traceback", "ERROR")):
                out.append(f"--- {path.name}\n{text[-3000:]}")
        return "\n".join(out)


async def _leader(run: Run, js: Any, s: Subjects, what: str) -> str:
    """The node leading the WORK stream or the meta group now (asked again while an
    election from the previous fault is still on)."""
    deadline = time.monotonic() + 30
    while True:
        if what == "meta-leader":
            leader = await asyncio.to_thread(run.cluster.meta_leader)
        else:
            leader = None
            with contextlib.suppress(Exception):
                info = await js.stream_info(s.work_stream)
                leader = info.cluster.leader if info.cluster is not None else None
        if leader and run.cluster.node(leader).running:
            return str(leader)
        assert time.monotonic() < deadline, f"no {what} within 30 s"
        await asyncio.sleep(0.1)


def _ppid(pid: int) -> int:
    with contextlib.suppress(OSError, IndexError, ValueError):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return 0


def map_slots(prefix: str, wf: str) -> int:
    """Map slots of the live agents of ``wf`` (each agent runs JETREDUCE_SLOTS items at once).
    Not an agent's child: an agent forking a step is itself for a moment (same environment
    until the exec); counted, it showed 12 slots for ``max_parallel: 8``."""
    total = 0
    agents = agents_of(prefix, wf, "map")
    for pid in [a for a in agents if _ppid(a) not in set(agents)]:
        with contextlib.suppress(OSError, ValueError):
            raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            env = dict(kv.decode().split("=", 1) for kv in raw if b"=" in kv)
            total += int(env.get("JETREDUCE_SLOTS", "1"))
    return total


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed{s}" for s in SEEDS])
async def test_cluster_chaos(
    seed: int, tmp_path: Path, nats_cluster: LocalCluster, cluster_url: str, prefix: str
) -> None:
    run = Run(seed, tmp_path, f"{prefix}c{seed}", nats_cluster)
    try:
        await _chaos(run, random.Random(seed))
    except BaseException:
        print(f"\nreplay: JETREDUCE_CLUSTER_CHAOS_SEEDS={seed} pytest tests/cluster -k seed{seed}")
        print("timeline:\n" + "\n".join(run.log))
        print(run.service_logs())
        raise
    finally:
        await asyncio.to_thread(run.teardown)
    print(f"\nseed {seed} timeline:\n" + "\n".join(run.log))


async def _chaos(run: Run, rng: random.Random) -> None:
    work = run.root / "work"
    work.mkdir()
    (work / "item.sh").write_text(ITEM_SH.format(work=work))
    (work / "reduce.sh").write_text(REDUCE_SH.format(work=work, python=sys.executable))
    wf = f"cluster-chaos-{run.seed}"
    s = Subjects(run.prefix)
    for index in range(2):
        run.start_services(index)
    # Both replicas up (topology declared, services started) before the workflow exists.
    logs = [run.root / "logs" / f"services{i}.log" for i in range(2)]
    await wait_for(
        lambda: all("jetreduce services running" in p.read_text() for p in logs), timeout_s=60
    )
    nc = await connect(NatsSettings(url=run.cluster.url, prefix=run.prefix), forever=True)
    js = nc.jetstream()
    try:
        text = WORKFLOW.format(last=ITEMS - 1, parallel=MAX_PARALLEL, work=work)
        await submit(
            nc, s, text, SubmitOptions(workdir=str(work), lease_s=3), workflow_id=wf, source="ha"
        )
        run.note("submitted")
        # The three faults in one burst, so their stalls overlap and a seed stays short: the
        # first node dies, the services process dies while it is down, the second node dies
        # as soon as the first is back (a 3-node cluster survives one loss at a time).
        at = rng.uniform(0.05, 0.3)
        order = rng.sample(["work-leader", "meta-leader"], 2)
        faulted = False
        # Odd seeds kill the process running the map agents (its launcher's work must be
        # taken over), even seeds the other one (its aggregator may be the one counting).
        kill_runner = run.seed % 2 == 1
        stalls: list[tuple[str, float, int]] = []  # (fault, time, terminal count then)
        deadline = time.monotonic() + RUN_BUDGET_S
        end = None
        done = 0
        peak_slots = 0
        while end is None:
            assert time.monotonic() < deadline, f"no terminal event within {RUN_BUDGET_S}s"
            peak_slots = max(peak_slots, map_slots(run.prefix, wf))
            try:
                end = await stored_terminal_event(js, s, wf)
                done = await count_terminal(nc, s, wf)
            except Exception:
                await asyncio.sleep(0.1)  # no leader for a moment
                continue
            for fault, at, before in list(stalls):
                if done > before:
                    run.note(f"map moving again after {fault}: {time.monotonic() - at:.1f}s")
                    stalls.remove((fault, at, before))
            if end is not None:
                break
            runner = run.running_map(wf)
            if not faulted and done / ITEMS >= at and runner is not None:
                faulted = True
                assert done < ITEMS, "the map ended before the faults"
                run.note(f"{done}/{ITEMS} terminal")
                for what in order:
                    name = await _leader(run, js, s, what)
                    stalls.append((what, time.monotonic(), done))
                    run.kill_node(name, what)
                    if what == order[0]:
                        stalls.append(("services", time.monotonic(), done))
                        victim = runner if kill_runner else 1 - runner
                        await asyncio.to_thread(run.kill_services, victim)
                    await asyncio.sleep(rng.uniform(0.5, 2.0))  # the outage itself
                    await run.restart_node(name)
            await asyncio.sleep(0.1)
        run.note(f"terminal: {type(end).__name__}; peak map slots {peak_slots}")
        assert faulted, "the map ended before the faults"
        assert isinstance(end, ev.WorkflowCompleted), end
        # One launcher leads (runtime/leadership.py): the two never ran map agents together.
        assert peak_slots <= MAX_PARALLEL, f"{peak_slots} map slots ran at once"

        results = await read_stream(js, s.results_stream, s.terminal_of(wf))
        by_index: dict[int, list[Any]] = {}
        for r in results:
            by_index.setdefault(r.index, []).append(r)
        assert sorted(by_index) == list(range(ITEMS)), "items missing from RESULTS"
        twice = {i: len(rs) for i, rs in by_index.items() if len(rs) != 1}
        assert not twice, f"items recorded more than once: {twice}"
        wrong = [
            (i, r)
            for i, (r,) in by_index.items()
            if not isinstance(r, ev.ItemDone) or r.output != f"out-{i}"
        ]
        assert not wrong, f"items with the wrong outcome: {wrong[:5]}"
        assert (end.total, end.done, end.dead) == (ITEMS, ITEMS, 0)

        complete = await read_stream(js, s.events_stream, s.map("complete", wf))
        assert len(complete) == 1, complete
        reduce_events = await read_stream(js, s.events_stream, s.reduce("*", wf))
        completed = [e for e in reduce_events if isinstance(e, ev.ReduceCompleted)]
        assert len(completed) == 1, reduce_events
        checksum = sum(range(ITEMS))
        assert completed[0].output == f"{ITEMS} {ITEMS} {checksum}" == end.reduce_output
        runs = (work / "reduce-runs").read_text().split()
        executions = (work / "effects").read_text().split()
        run.note(
            f"reduce ran {len(runs)}x; items executed {len(executions)}x for {ITEMS} "
            f"({len(executions) - ITEMS} re-executions after kills)"
        )
        assert len(runs) == 1, f"reduce ran {len(runs)} times"
        assert set(executions) == {str(i) for i in range(ITEMS)}

        # Nothing of this installation runs on: the killed process's agents died with it,
        # the survivor's ended with their phases.
        deadline = time.monotonic() + 15
        while agents_of(run.prefix):
            assert time.monotonic() < deadline, f"agents still running: {agents_of(run.prefix)}"
            await asyncio.sleep(0.1)
        run.note(f"verified in {time.monotonic() - run.t0:.1f}s")
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
