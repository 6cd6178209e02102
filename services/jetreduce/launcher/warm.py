"""The launcher's side of warm agents: a :class:`WarmHost` starts and talks to the agent
host (``python -m jetreduce.cli.agent_host``, a fork server that has imported the agent),
and hands back a :class:`WarmProcess` per agent that the local backend supervises exactly
as an asyncio subprocess (``pid``, ``returncode``, ``wait()``; a death by signal is the
negative signal number, as asyncio reports it).

Why a fork server: an exec'd agent pays a fresh interpreter and the imports (~0.3 s wall,
~0.5 CPU-s) at every start, three in series per workflow (setup, map, reduce) and once per
agent process (issues 17, 18). A fork of the warm host costs a few milliseconds.

The host clones each agent as a child of this process (``CLONE_PARENT``, see
``cli/agent_host.py``), so the launcher waits for its agents itself, through a pidfd: the
exit status is the kernel's, the pid stays ours until reaped, the CPU time counts in this
process's children's as before, and agents die with this process (parent-death signal),
not with the host. The host dying costs no agent; the next spawn starts a new one.

The request (environment, working directory, entry point) travels in a ``memfd`` whose
descriptor is passed with ``SCM_RIGHTS``: the host forks without reading it, and only the
child reads it. An agent's credentials are thus in the launcher (which computed them, as
before) and in that agent, never in the host nor in agents forked later. The agent's log
file is opened here, as it was for an exec, and passed the same way.

Lifecycle: started lazily (or early, by :meth:`WarmHost.prestart`), one per backend, and
stopped with it (:meth:`stop` closes its socket, upon which it exits). A host that cannot
start raises :class:`WarmUnavailable` and the backend falls back to exec.

Spawns are one at a time (a lock): each is a datagram and a fork, a few milliseconds, and
the socket never holds more than one request, so the launcher's writes never block. A host
that does not answer within ``SPAWN_S`` is killed and replaced: a child it had forked then
never gets its go and exits unrun (a zombie of this process until it exits: the price of
an event that needs a host stuck for half a minute).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import resource
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from jetreduce.contract.errors import PermanentError, TemporaryError
from jetreduce.runtime.orphans import die_with_parent

__all__ = [
    "NOT_INHERITED",
    "WARM_ENV",
    "WarmHost",
    "WarmProcess",
    "WarmUnavailable",
    "warm_supported",
]

log = logging.getLogger(__name__)

WARM_ENV = "JETREDUCE_WARM_AGENTS"
"""``0`` (or ``false``/``no``/``off``) starts every local agent by exec, as before."""

HOST_MODULE = "jetreduce.cli.agent_host"

HOST_START_S = 60.0
"""Bound on the host's start (an interpreter and the agent's imports: ~0.5 s, more on a
loaded machine)."""

SPAWN_S = 30.0
"""Bound on one fork round trip (milliseconds, unless the machine is swapping)."""

HOST_STOP_S = 10.0
"""Bound on the host's exit once told to stop (it SIGKILLs and reaps what is left)."""

_MAX_MESSAGE = 65536

NOT_INHERITED = (
    "JETREDUCE_NATS_",
    "JETREDUCE_PREFIX",
    "JETREDUCE_WORKFLOW_ID",
    "JETREDUCE_PHASE",
    "JETREDUCE_AGENT_INDEX",
    "JETREDUCE_SLOTS",
)
"""Prefixes of the launcher's variables that agents do not inherit: their connection and
identity are set per agent. The host does not get them either."""


class WarmUnavailable(PermanentError, RuntimeError):
    """The agent host is not running and could not be started: start the agent by exec."""


class _HostLost(TemporaryError, RuntimeError):
    """The host went away during a spawn (it died, or did not answer): worth a new one."""


HOST_ENV_ROOM = 65536
"""Bytes of room the host's initial environment holds, where each child writes its own for
``/proc/PID/environ`` to show (``cli/agent_host._show_environment``)."""


def warm_supported() -> bool:
    """Linux on x86-64 or arm64 (memfd, pidfd, SCM_RIGHTS, ``CLONE_PARENT``, the
    parent-death signal) and not switched off."""
    off = os.environ.get(WARM_ENV, "").strip().lower() in {"0", "false", "no", "off"}
    return (
        sys.platform.startswith("linux")
        and os.uname().machine in {"x86_64", "aarch64"}
        and hasattr(os, "memfd_create")
        and hasattr(os, "pidfd_open")
        and not off
    )


def pidfd_budget() -> int:
    """How many agents are waited for through a pidfd at most: a quarter of this process's
    descriptor limit, so that 1,000 agents never starve the launcher of descriptors (its
    connection, the agents' log files); past it, a thread waits, as asyncio's child watcher
    does for exec'd agents."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (65536 if soft == resource.RLIM_INFINITY else soft) // 4


class WarmProcess:
    """An agent forked by the host, a child of this process: what the backend's supervision
    uses of a process. Its exit is waited for through a pidfd on the event loop, or by a
    thread past :func:`pidfd_budget`."""

    pidfds = 0
    """pidfds open in this process."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = loop.create_future()
        self._pidfd: int | None = None
        if WarmProcess.pidfds < pidfd_budget():
            with contextlib.suppress(OSError):
                self._pidfd = os.pidfd_open(pid)
        if self._pidfd is not None:
            WarmProcess.pidfds += 1
            loop.add_reader(self._pidfd, self._check)
        else:
            threading.Thread(
                target=self._wait_blocking, args=(loop,), name=f"waitpid {pid}", daemon=True
            ).start()

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def _check(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored): the code is lost
            pid, status = self.pid, 255 << 8
        if pid == 0 or self._pidfd is None:
            return
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        WarmProcess.pidfds -= 1
        self._set(os.waitstatus_to_exitcode(status))

    def _wait_blocking(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            status = 255 << 8
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(self._set, os.waitstatus_to_exitcode(status))

    def _set(self, code: int) -> None:
        self.returncode = code
        if not self._exited.done():
            self._exited.set_result(code)


class WarmHost:
    """One agent host process and its socket; restarts it on demand."""

    def __init__(self, *, log_file: Path | None = None) -> None:
        self.log_file = log_file
        """Where the host's own stdout/stderr go (none of an agent's)."""
        self.proc: asyncio.subprocess.Process | None = None
        self._sock: socket.socket | None = None
        self._starting: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._pending: asyncio.Future[WarmProcess] | None = None
        self._ready: asyncio.Future[int] | None = None
        self._serial = 0

    @property
    def alive(self) -> bool:
        return self._sock is not None

    def prestart(self) -> None:
        """Start the host in the background if it is not running (the first spawn then
        need not wait for the imports)."""
        if self._sock is None and (self._starting is None or self._starting.done()):
            self._starting = asyncio.create_task(self._start(), name="agent host start")
            self._starting.add_done_callback(_retrieve)

    async def _ensure(self) -> socket.socket:
        if self._sock is None:
            self.prestart()
            assert self._starting is not None
            starting = self._starting
            try:
                await asyncio.shield(starting)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if starting.cancelled() and not (task and task.cancelling()):
                    raise WarmUnavailable("the agent host's start was cancelled") from None
                raise
            except Exception as exc:
                raise WarmUnavailable(f"the agent host did not start: {exc}") from exc
        if self._sock is None:
            raise WarmUnavailable("the agent host exited as it started")
        return self._sock

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        out: int | None = asyncio.subprocess.DEVNULL
        handle = None
        try:
            if self.log_file is not None:
                self.log_file.parent.mkdir(parents=True, exist_ok=True)
                handle = open(self.log_file, "ab")  # noqa: SIM115
                out = handle.fileno()
            env = dict(os.environ)
            # Identity and connection variables are the agents' own (passed per spawn).
            for key in [k for k in env if k.startswith(NOT_INHERITED)]:
                del env[key]
            env["PYTHONUNBUFFERED"] = "1"
            env["JETREDUCE_AGENT_HOST_ROOM"] = "." * HOST_ENV_ROOM
            env["JETREDUCE_AGENT_HOST_FD"] = str(theirs.fileno())
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                HOST_MODULE,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
                preexec_fn=functools.partial(die_with_parent, signal.SIGKILL),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            if handle is not None:
                handle.close()
        ours.setblocking(False)
        self.proc, self._sock = proc, ours
        self._ready = loop.create_future()
        loop.add_reader(ours.fileno(), self._on_readable)
        try:
            pid = await asyncio.wait_for(asyncio.shield(self._ready), HOST_START_S)
        except BaseException:
            await self._lost()
            raise
        log.info("agent host %d ready", pid)

    async def spawn(
        self,
        env: dict[str, str],
        cwd: str,
        log_fd: int,
        entry: str,
        argv: tuple[str, ...] = (),
    ) -> WarmProcess:
        """Fork an agent with exactly ``env`` as its environment, in ``cwd``, its output on
        ``log_fd`` (which the caller still owns), running ``entry`` (``module:function``),
        shown with ``argv`` as its command line (what an exec would have run). Returns once
        the agent leads its own session. Raises :class:`WarmUnavailable` if no host can be
        had, ``OSError`` if the fork failed."""
        request = json.dumps({"env": env, "cwd": cwd, "entry": entry, "argv": argv}).encode()
        async with self._lock:
            for attempt in (1, 2):
                sock = await self._ensure()
                try:
                    return await self._spawn_once(sock, request, log_fd)
                except _HostLost as exc:
                    # Its child, if forked, exits unrun (it waits for the host's go).
                    if attempt == 2:
                        raise WarmUnavailable(str(exc)) from exc
                    log.warning("%s during a spawn; starting another host", exc)
        raise AssertionError("unreachable")

    async def _spawn_once(self, sock: socket.socket, request: bytes, log_fd: int) -> WarmProcess:
        memfd = os.memfd_create("jetreduce-agent-request", os.MFD_CLOEXEC)
        try:
            with open(memfd, "wb", closefd=False) as f:
                f.write(request)
            self._serial += 1
            self._pending = asyncio.get_running_loop().create_future()
            message = json.dumps({"spawn": self._serial}).encode()
            try:
                socket.send_fds(sock, [message], [memfd, log_fd])
            except OSError as exc:
                await self._lost()
                raise _HostLost(f"the agent host is gone ({exc})") from exc
        finally:
            os.close(memfd)
        try:
            return await asyncio.wait_for(asyncio.shield(self._pending), SPAWN_S)
        except TimeoutError:
            await self._lost()  # a host that does not answer is not trusted again
            raise _HostLost(f"the agent host did not answer within {SPAWN_S} s") from None
        finally:
            self._pending = None

    def _on_readable(self) -> None:
        sock = self._sock
        while sock is not None:
            try:
                data = sock.recv(_MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                asyncio.get_running_loop().create_task(self._lost()).add_done_callback(_retrieve)
                return
            self._on_message(json.loads(data))

    def _on_message(self, message: dict[str, Any]) -> None:
        if "spawned" in message:
            pending = self._pending
            agent = None
            if "pid" in message:  # ours to wait for, whoever asked
                agent = WarmProcess(int(message["pid"]))
            if pending is not None and not pending.done():
                if agent is not None:
                    pending.set_result(agent)
                else:
                    pending.set_exception(OSError(f"agent host: {message.get('error')}"))
        elif "ready" in message and self._ready is not None and not self._ready.done():
            self._ready.set_result(int(message["ready"]))

    async def _lost(self) -> None:
        """The host's socket closed (it died, or :meth:`stop`): wait for it to exit. Its
        agents are this process's children and go on."""
        sock, proc = self._sock, self.proc
        self._sock = self.proc = None
        if sock is not None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
        for fut in (self._pending, self._ready):
            if fut is not None and not fut.done():
                fut.set_exception(_HostLost("the agent host is gone"))
        if proc is not None:
            try:
                await asyncio.wait_for(proc.wait(), HOST_STOP_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    async def stop(self) -> None:
        """Stop the host and wait for it (agents are not its: the backend stops them). A
        later :meth:`spawn` starts a new one."""
        starting = self._starting
        if starting is not None and not starting.done():
            starting.cancel()
            # Its end is all we wait for: a failed or cancelled start leaves nothing running.
            with contextlib.suppress(BaseException):
                await starting
        async with self._lock:  # a spawn under way ends first
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
                await self._lost()


def _retrieve(task: asyncio.Task[None]) -> None:
    """Done callback: a failed start is raised to the spawn that waits for it, if any."""
    if not task.cancelled():
        task.exception()
