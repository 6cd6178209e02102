"""What the harness reads from ``/proc`` about the services process and its agents: CPU,
peak memory, which processes are agents (of which workflow and phase), and when each agent
lived.

Agents are found among *all* descendants of the services process, not only its children,
and CPU is summed over the whole process tree (:func:`tree_cpu_seconds`): an agent host
that forks agents (warm agents) keeps them as its own children, whose CPU the kernel adds
to the host's reaped-children total only when the host itself is reaped.

An agent is recognised by ``JETREDUCE_PHASE`` in ``/proc/<pid>/environ`` (the environment it
was exec'd with); a forked agent that never execs keeps its host's environment there and is
not recognised (the scenarios that need it say so by reporting nothing).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field

__all__ = [
    "AgentInfo",
    "AgentWatcher",
    "MemorySampler",
    "agent_pids",
    "cpu_seconds",
    "descendants",
    "peak_rss_mb",
    "tree_cpu_seconds",
]

TICK = os.sysconf("SC_CLK_TCK")


def _status_kb(pid: int, key: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (VmRSS, VmHWM); 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def peak_rss_mb(pid: int) -> float:
    """Peak resident set (VmHWM) of one process, in MiB: read from /proc, no psutil."""
    return _status_kb(pid, "VmHWM") / 1024.0


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(own, reaped children) CPU seconds (user + system) of a process, from
    ``/proc/<pid>/stat``. The second covers agents once the launcher has waited for them."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0, 0.0
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / TICK, (cutime + cstime) / TICK


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(p) for p in f.read().split())
    return out


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first, then theirs)."""
    out: list[int] = []
    todo = _children(pid)
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(_children(child))
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid``'s whole tree: its own, its reaped children's, and the same for
    every live descendant. Sampled before and after a run, the difference is what the tree
    used meanwhile, wherever in the tree the agents live."""
    own, reaped = cpu_seconds(pid)
    return own + reaped + sum(sum(cpu_seconds(c)) for c in descendants(pid))


def _agent_env(pid: int) -> dict[str, str]:
    """The ``JETREDUCE_*`` identity of an agent process (empty for anything else)."""
    out: dict[str, str] = {}
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for entry in f.read().split(b"\0"):
                if entry.startswith(b"JETREDUCE_"):
                    key, _, value = entry.partition(b"=")
                    out[key.decode()] = value.decode(errors="replace")
    except OSError:
        pass
    return out if "JETREDUCE_PHASE" in out else {}


def _agent_phase(pid: int) -> str | None:
    """``map``/``reduce``/``setup`` for a jetreduce agent process (from its environment)."""
    return _agent_env(pid).get("JETREDUCE_PHASE")


def agent_pids(services_pid: int, phase: str = "map") -> list[int]:
    """The live agent processes of ``phase`` under the services process."""
    return [c for c in descendants(services_pid) if _agent_phase(c) == phase]


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return ""


def _start_epoch(pid: int) -> float | None:
    """When ``pid`` started (epoch seconds, clock-tick resolution)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return btime + ticks / TICK


@dataclass
class AgentInfo:
    pid: int
    workflow: str
    phase: str
    slots: int
    started: float
    """Epoch seconds the process started (from ``/proc``)."""
    last_seen: float
    """Epoch seconds of the last sample that found it alive."""
    cpu_s: float = 0.0
    """Own CPU at the last sample (the last ``every_s`` of its life is missed)."""
    index: int = -1
    command: str = ""


@dataclass
class AgentWatcher:
    """Samples the agents under the services process every ``every_s`` (a thread): when
    each started (exact) and was last seen alive (within ``every_s`` of its exit), its
    workflow, phase, slots and CPU. The harness's own account of slots held, for when the
    services report none."""

    pid: int
    every_s: float = 0.05
    agents: dict[int, AgentInfo] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> AgentWatcher:
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="agent watcher", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def _sample(self) -> None:
        now = time.time()
        for pid in descendants(self.pid):
            info = self.agents.get(pid)
            if info is None:
                env = _agent_env(pid)
                started = _start_epoch(pid)
                if not env or started is None:
                    continue
                info = AgentInfo(
                    pid=pid,
                    workflow=env.get("JETREDUCE_WORKFLOW_ID", ""),
                    phase=env["JETREDUCE_PHASE"],
                    slots=int(env.get("JETREDUCE_SLOTS", "1") or 1),
                    started=started,
                    last_seen=now,
                    index=int(env.get("JETREDUCE_AGENT_INDEX", "-1") or -1),
                    command=_command(pid),
                )
                self.agents[pid] = info
            info.last_seen = now
            info.cpu_s = cpu_seconds(pid)[0]

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def of(self, workflow: str, phase: str = "map") -> list[AgentInfo]:
        return [a for a in self.agents.values() if a.workflow == workflow and a.phase == phase]

    def cpu_by_phase(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for a in self.agents.values():
            out[a.phase] = out.get(a.phase, 0.0) + a.cpu_s
        return out


@dataclass
class MemorySampler:
    """Samples the services process and its agent children every ``every_s``.

    The services process's own VmHWM is exact (the kernel keeps it). Agents are separate,
    short-lived processes whose VmHWM disappears with them, so their peaks are sampled: a
    spike shorter than ``every_s`` between samples can be missed.
    """

    pid: int
    every_s: float = 0.2
    agent_peak_mb: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> MemorySampler:
        self._thread = threading.Thread(target=self._loop, name="rss sampler", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            for child in descendants(self.pid):
                phase = _agent_phase(child)
                if phase is None:
                    continue
                mb = _status_kb(child, "VmHWM") / 1024.0
                self.agent_peak_mb[phase] = max(self.agent_peak_mb.get(phase, 0.0), mb)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
