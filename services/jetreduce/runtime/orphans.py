"""Children that die with their parent.

A local agent or an embedded nats-server started by ``jetreduce run`` must not outlive it:
if the run is SIGKILLed, an orphaned server would keep the JetStream store open and a
``resume`` would start a second server on the same files; an orphaned agent would finish
its items and merge their commits with no one to record them, so ``resume`` would run
them (and commit them) again.

Two mechanisms, because one is not enough:

- Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``, :func:`die_with_parent`)
  makes the kernel signal the child when the thread that started it exits, so children
  must be started from the main (event-loop) thread. It reaches the child only, not what
  the child started.
- An agent's steps run in process groups of their own inside the agent's session. The
  :class:`SessionReaper` is a small process of its own session that the parent tells, over
  a pipe, which sessions (agents) it started and which have ended. When the pipe closes
  without a goodbye (the parent died, however: SIGKILL included), it SIGKILLs every process
  still in those sessions, then exits.

Elsewhere than Linux, both are no-ops.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

__all__ = [
    "SessionReaper",
    "SessionSweeper",
    "die_with_parent",
    "kill_session",
    "kill_sessions",
    "reaper",
]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        _libc = None


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """``preexec_fn`` for a child process: send it ``sig`` when its parent goes away (use
    ``functools.partial`` for another signal than SIGTERM)."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), which tells a pid's reuse apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def kill_session(sid: int, *, leader: bool = True) -> None:
    """SIGKILL every process of session ``sid``; ``leader=False``: its leader has ended (see
    :func:`kill_sessions`). Linux /proc; a no-op elsewhere."""
    kill_sessions({sid: leader})


def kill_sessions(sessions: dict[int, bool]) -> None:
    """SIGKILL every process of each session in ``sessions`` (session id → whether its
    leader goes too), in one pass over /proc: a pass reads every process's ``stat``.

    A session whose leader is not to be killed is one whose leader has ended and been
    reaped (an agent): its id may then have been handed to a new process. Linux reuses a
    pid only once no session or process group holds it, so if a process with that id is
    alive, nothing of the old session is left, and what the pass would find under that id
    is a new session (another agent's steps): it is left alone."""
    proc_root = Path("/proc")
    if not sessions or not proc_root.is_dir():
        return
    wanted = {str(sid): leader for sid, leader in sessions.items()}
    found: list[tuple[str, str]] = []
    alive: set[str] = set()
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        if entry.name in wanted:
            alive.add(entry.name)
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp session ...
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 3 and fields[3] in wanted:
            found.append((entry.name, fields[3]))
    for pid, sid in found:
        if wanted[sid] or (pid != sid and sid not in alive):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(pid), signal.SIGKILL)


class SessionSweeper:
    """Kills what ended sessions left behind (steps of an agent killed mid-item), batched:
    every session that ends while a pass over /proc runs is swept by the next one, in a
    thread. A pass reads every process's ``stat`` (~10 ms with hundreds of processes); one
    per agent exit, 200 agents leaving at ``map.complete`` cost the launcher's process a
    second of CPU, and its loop (the GIL) the reduce's launch (issue 18)."""

    def __init__(self) -> None:
        self._waiting: dict[int, bool] = {}
        self._next: asyncio.Future[None] | None = None
        self._passes: asyncio.Task[None] | None = None
        self.passes = 0
        """Passes made (for tests)."""

    async def sweep(self, sid: int, *, leader: bool = True) -> None:
        """Return once a pass that began after this call has swept session ``sid``
        (``leader=False``: its leader has ended and been reaped). A cancelled caller does not
        stop the pass."""
        self._waiting[sid] = leader
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        swept = self._next
        if self._passes is None or self._passes.done():
            self._passes = asyncio.create_task(self._run())
        await asyncio.shield(swept)

    async def _run(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, {}
            swept, self._next = self._next, None
            try:
                await asyncio.to_thread(kill_sessions, batch)
                self.passes += 1
            except Exception as exc:  # a pass must never strand its waiters
                log.warning("sweeping sessions %s failed: %r", sorted(batch), exc)
            finally:
                if swept is not None and not swept.done():
                    swept.set_result(None)


class SessionReaper:
    """The parent's side: ``watch(sid)`` after starting a session leader, ``forget(sid)``
    once it has been reaped. Writes are a few bytes to a pipe the reaper drains at once."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None

    def _pipe(self) -> subprocess.Popen[bytes] | None:
        if not sys.platform.startswith("linux"):
            return None
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "jetreduce.runtime.orphans"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                # Not in our session or process group: a signal meant for us (Ctrl-C, the
                # launcher's group kill) must not take it away before it is needed.
                start_new_session=True,
            )
        return self._proc

    def start(self) -> None:
        """Start the reaper process now rather than on first use (it is a process-wide
        singleton that lives as long as this process: tests start it with their session)."""
        self._pipe()

    def _send(self, line: str) -> None:
        proc = self._pipe()
        if proc is None or proc.stdin is None:
            return
        with contextlib.suppress(OSError):
            proc.stdin.write(line.encode())
            proc.stdin.flush()

    def watch(self, sid: int) -> None:
        self._send(f"+{sid} {_start_time(sid) or '-'}\n")

    def forget(self, sid: int) -> None:
        self._send(f"-{sid}\n")


_reaper = SessionReaper()


def reaper() -> SessionReaper:
    """This process's reaper (one reaper process, started on first use)."""
    return _reaper


def _serve() -> None:
    """The reaper process: read ``+sid``/``-sid`` lines until the pipe closes, then kill
    what is still watched."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watched: dict[int, str] = {}
    for raw in sys.stdin.buffer:
        words = raw.decode(errors="replace").split()
        with contextlib.suppress(ValueError, IndexError):
            sid = int(words[0][1:])
            if words[0].startswith("+"):
                watched[sid] = words[1] if len(words) > 1 else "-"
            elif words[0].startswith("-"):
                watched.pop(sid, None)
    for sid, started in watched.items():
        # A leader alive with another start time is a reused pid: not ours. (While any
        # member of the old session lives, its id cannot be reused.)
        now = _start_time(sid)
        if now is None or started == "-" or now == started:
            kill_session(sid)


if __name__ == "__main__":
    _serve()
