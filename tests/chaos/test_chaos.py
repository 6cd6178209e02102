"""Chaos (issue 4, DESIGN.md §4 invariants 1-3): about 1,200 short items while agents are
SIGKILLed at random intervals, every service process is SIGKILLed and restarted at least once
and the nats-server is restarted once. Afterwards every item is terminal exactly once with the
right outcome, ``map.complete`` is stored once, and reduce completed once with every result.

Real nats-server (fixed port, so a restart keeps the URL), services as separate processes
(``python -m jetreduce service NAME``), agents as their children. ``random.Random(seed)`` drives
every choice; seeds come from ``JETREDUCE_CHAOS_SEEDS`` (default 1,2,3,4,5). A failing seed
prints the command that replays it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from helpers import read_stream, stored_terminal_event
from jetreduce.cli.submit import submit
from jetreduce.contract import events as ev
from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.subjects import Subjects
from jetreduce.embedded import EmbeddedServer
from jetreduce.runtime.connection import connect
from jetreduce.runtime.orphans import die_with_parent
from jetreduce.runtime.settings import NatsSettings
from support import env_without_jetreduce

pytestmark = pytest.mark.anyio

SEEDS = [int(s) for s in os.environ.get("JETREDUCE_CHAOS_SEEDS", "1,2,3,4,5").split(",") if s]
ITEMS = int(os.environ.get("JETREDUCE_CHAOS_ITEMS", "1200"))
SERVICES = ("planner", "launcher", "aggregator", "janitor")
RUN_BUDGET_S = 240.0
"""Hard bound on one seed's workflow (submit to terminal event)."""


def fails(i: int) -> bool:
    """Items designed to fail on every attempt (so they end dead)."""
    return i % 97 == 13


ITEM_SH = """
if [ $(( $1 % 97 )) -eq 13 ]; then echo "item $1 is bad" >&2; exit 9; fi
sleep 0.05
echo out-$1
"""

REDUCE_PY = """
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
ids = {r["item_id"] for r in rows}
done = [r for r in rows if r["status"] == "Success"]
total = sum(int(r["output"].split("-")[1]) for r in done)
print(len(rows), len(ids), len(done), len(rows) - len(done), total)
"""

WORKFLOW = """
name: chaos
map:
  input: "seq 0 {last}"
  max_parallel: 8
  agent_template:
    - shell: "sh {work}/item.sh ${{item}}"
error_policy:
  retry_config:
    max_attempts: 2
    backoff:
      exponential:
        initial: 0.1s
        multiplier: 2
reduce:
  # Long enough that the disruption loop (which may itself be busy restarting a service
  # when the map ends) always finds the reduce agent running.
  - shell: "sleep 3"
  - shell: "{python} {work}/reduce.py ${{map.results_file}}"
"""


# -- processes ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def _stat(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return []


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def agents_of(prefix: str, wf: str | None = None, phase: str | None = None) -> list[int]:
    """Live agent processes of this installation (prefix), optionally of one wf / phase."""
    found = []
    for pid in _pids():
        env = _environ(pid)
        if env.get("JETREDUCE_PREFIX") != prefix or "JETREDUCE_WORKFLOW_ID" not in env:
            continue
        if wf is not None and env["JETREDUCE_WORKFLOW_ID"] != wf:
            continue
        if phase is not None and env.get("JETREDUCE_PHASE") != phase:
            continue
        stat = _stat(pid)
        if stat and stat[0] != "Z":
            found.append(pid)
    return found


def kill_sessions(sessions: list[int]) -> None:
    """SIGKILL every process whose session is one of ``sessions`` (an agent and its steps)."""
    wanted = {str(s) for s in sessions}
    for pid in _pids():
        stat = _stat(pid)
        if len(stat) > 3 and stat[3] in wanted:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


@dataclass
class Cluster:
    seed: int
    root: Path
    prefix: str
    port: int = field(default_factory=_free_port)
    server: EmbeddedServer | None = None
    services: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def note(self, what: str) -> None:
        self.log.append(f"{time.monotonic() - self.t0:7.2f}s {what}")

    def start_server(self) -> None:
        self.server = EmbeddedServer(self.root / "nats", port=self.port).start()

    def restart_server(self, rng: random.Random) -> None:
        assert self.server is not None
        how = rng.choice(["kill", "stop"])
        self.note(f"nats-server {how}")
        self.server.kill() if how == "kill" else self.server.stop()
        time.sleep(rng.uniform(0.2, 2.0))  # the outage itself
        self.start_server()
        self.note("nats-server back")

    def start_service(self, name: str, *command: str) -> None:
        """``jetreduce service NAME`` (or ``jetreduce COMMAND``, kept as ``name``)."""
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        env = env_without_jetreduce() | {"JETREDUCE_PREFIX": self.prefix}
        with open(logs / f"{name}.log", "ab") as out:
            self.services[name] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "jetreduce",
                    *(command or ("service", name)),
                    "--nats",
                    self.url,
                    "--log-dir",
                    str(logs / "agents"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.root,
                start_new_session=True,
                # Its own session (so a kill takes its agents too), yet it dies with the test
                # process: a killed or timed-out pytest leaves no services behind.
                preexec_fn=die_with_parent,
            )

    def kill_service(self, name: str) -> None:
        proc = self.services[name]
        self.note(f"SIGKILL {name} (pid {proc.pid})")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def kill_agent(self, wf: str, rng: random.Random) -> None:
        agents = sorted(agents_of(self.prefix, wf, "map"))
        if agents:
            victim = rng.choice(agents)
            self.note(f"SIGKILL agent {victim} of {len(agents)}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)

    def disrupt_reduce(self, wf: str, rng: random.Random) -> None:
        if rng.random() < 0.5:
            self.kill_service("launcher")
            time.sleep(rng.uniform(0.2, 1.0))
            self.start_service("launcher")
            self.note("restarted launcher mid-reduce")
        else:
            for pid in agents_of(self.prefix, wf, "reduce"):
                self.note(f"SIGKILL reduce agent {pid}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def teardown(self) -> None:
        for proc in self.services.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        # Agents of a killed launcher live on in their own sessions: end them and their steps.
        for _ in range(3):
            agents = agents_of(self.prefix)
            if not agents:
                break
            kill_sessions(agents)
            time.sleep(0.2)
        if self.server is not None:
            self.server.stop()

    def service_logs(self) -> str:
        out = []
        for path in sorted((self.root / "logs").rglob("*.log")):
            text = path.read_text(errors="replace")
            if any(w in text for w in ("Traceback", "ERROR", "error")):
                out.append(f"--- {path.name}\n{text[-3000:]}")
        return "\n".join(out)


# -- reading the store --------------------------------------------------------------------------
async def read_all(js: Any, stream: str, subject: str) -> list[Any]:
    return await read_stream(js, stream, subject)


async def count_terminal(nc: Any, s: Subjects, wf: str) -> int:
    resp = await nc.request(
        f"$JS.API.STREAM.INFO.{s.results_stream}",
        json.dumps({"subjects_filter": s.terminal_of(wf), "offset": 1 << 40}).encode(),
        timeout=2,
    )
    return int(json.loads(resp.data).get("total", 0))


# -- the test -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed{s}" for s in SEEDS])
async def test_chaos(seed: int, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    cluster = Cluster(seed, tmp_path, prefix=f"chaos{seed}x{os.getpid()}")
    try:
        await _chaos(cluster, random.Random(seed))
    except BaseException:
        print(
            f"\nreplay: JETREDUCE_CHAOS_SEEDS={seed} pytest tests/chaos -k seed{seed} -p no:kmock"
        )
        print("chaos timeline:\n" + "\n".join(cluster.log))
        print(cluster.service_logs())
        raise
    finally:
        await asyncio.to_thread(cluster.teardown)
    print(f"\nseed {seed} timeline:\n" + "\n".join(cluster.log))


async def _chaos(cluster: Cluster, rng: random.Random) -> None:
    work = cluster.root / "work"
    work.mkdir()
    (work / "item.sh").write_text(ITEM_SH)
    (work / "reduce.py").write_text(REDUCE_PY)
    wf = f"chaos-{cluster.seed}"
    s = Subjects(cluster.prefix)

    await asyncio.to_thread(cluster.start_server)
    for name in SERVICES:
        cluster.start_service(name)
    nc = await connect(NatsSettings(url=cluster.url, prefix=cluster.prefix), forever=True)
    js = nc.jetstream()
    try:
        text = WORKFLOW.format(last=ITEMS - 1, work=work, python=sys.executable)
        await submit(
            nc,
            s,
            text,
            SubmitOptions(workdir=str(work), lease_s=3),
            workflow_id=wf,
            source="chaos",
        )
        cluster.note("submitted")

        # Every disruption happens at a random point of the map phase (a fraction of items
        # terminal); agents are killed every 1.5-4 s throughout.
        plan: list[tuple[float, str]] = [(rng.uniform(0.02, 0.8), f"svc:{n}") for n in SERVICES]
        plan.append((rng.uniform(0.1, 0.8), "server"))
        plan.sort()
        next_agent_kill = time.monotonic() + rng.uniform(1.5, 4.0)
        deadline = time.monotonic() + RUN_BUDGET_S
        end = None
        reduce_hit = False
        while end is None:
            assert time.monotonic() < deadline, f"no terminal event within {RUN_BUDGET_S}s"
            try:
                end = await stored_terminal_event(js, s, wf)
                done = await count_terminal(nc, s, wf)
            except Exception:
                await asyncio.sleep(0.2)  # the server is restarting
                continue
            if end is not None:
                break
            fraction = done / ITEMS
            while plan and fraction >= plan[0][0]:
                _, what = plan.pop(0)
                if what == "server":
                    await asyncio.to_thread(cluster.restart_server, rng)
                else:
                    name = what.split(":")[1]
                    await asyncio.to_thread(cluster.kill_service, name)
                    await asyncio.sleep(rng.uniform(0.2, 2.0))
                    cluster.start_service(name)
                    cluster.note(f"restarted {name}")
            if not plan and not reduce_hit and agents_of(cluster.prefix, wf, "reduce"):
                # Mid-reduce: kill the reduce agent (the launcher re-runs it) or the launcher
                # (its successor starts a second reduce agent): still one reduce.completed.
                reduce_hit = True
                await asyncio.to_thread(cluster.disrupt_reduce, wf, rng)
            if time.monotonic() >= next_agent_kill and fraction < 0.98:
                cluster.kill_agent(wf, rng)
                next_agent_kill = time.monotonic() + rng.uniform(1.5, 4.0)
            await asyncio.sleep(0.1)
        cluster.note(f"terminal: {type(end).__name__}")
        assert not plan, f"the map ended before every disruption happened: {plan}"
        assert reduce_hit, "reduce ended before it was disrupted"
        assert isinstance(end, ev.WorkflowCompleted), end

        results = await read_all(js, s.results_stream, s.terminal_of(wf))
        by_index: dict[int, list[Any]] = {}
        for r in results:
            by_index.setdefault(r.index, []).append(r)
        assert sorted(by_index) == list(range(ITEMS)), "items missing from RESULTS"
        twice = {i: len(rs) for i, rs in by_index.items() if len(rs) != 1}
        assert not twice, f"items recorded more than once: {twice}"
        wrong = []
        for i, (r,) in by_index.items():
            if fails(i):
                if not (isinstance(r, ev.ItemDead) and r.exit_code == 9):
                    wrong.append((i, r))
            elif not (isinstance(r, ev.ItemDone) and r.output == f"out-{i}"):
                wrong.append((i, r))
        assert not wrong, f"items with the wrong outcome: {wrong[:5]}"
        n_dead = sum(1 for i in range(ITEMS) if fails(i))
        n_done = ITEMS - n_dead
        assert (end.total, end.done, end.dead) == (ITEMS, n_done, n_dead)

        dlq = await read_all(js, s.dlq_stream, s.dlq_of(wf))
        assert sorted(e.index for e in dlq) == [i for i in range(ITEMS) if fails(i)]

        complete = await read_all(js, s.events_stream, s.map("complete", wf))
        assert len(complete) == 1, complete
        assert (complete[0].done, complete[0].dead) == (n_done, n_dead)
        reduce_events = await read_all(js, s.events_stream, s.reduce("*", wf))
        completed = [e for e in reduce_events if isinstance(e, ev.ReduceCompleted)]
        assert len(completed) == 1, reduce_events
        assert not [e for e in reduce_events if isinstance(e, ev.ReduceFailed)]
        checksum = sum(i for i in range(ITEMS) if not fails(i))
        expected = f"{ITEMS} {ITEMS} {n_done} {n_dead} {checksum}"
        assert completed[0].output == expected
        assert end.reduce_output == expected
        cluster.note(f"verified in {time.monotonic() - cluster.t0:.1f}s")
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
