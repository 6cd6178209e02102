"""The warm agent host: a fork server that has imported everything an agent needs, so that
the local backend starts setup, map and reduce agents in milliseconds instead of paying an
interpreter start and the imports (~0.3 s wall, ~0.5 CPU-s) for every one.

Started by the launcher (``launcher/warm.py``) as ``python -m jetreduce.cli.agent_host FD``,
where FD is its end of a ``SOCK_SEQPACKET`` socket pair (one message per datagram). Before
it forks anything it imports, freezes the garbage collector's view of those imports (so
children do not copy the pages that collection would touch) and does nothing else: no event
loop, no connection, no thread, no logging configuration, no OpenTelemetry provider. A
child therefore starts from the state an exec'd ``python -m jetreduce.cli.agent_main`` has
after its imports, and builds the rest itself, as that one would.

Protocol (JSON per datagram):

- host → launcher ``{"ready": pid}`` once imported;
- launcher → host ``{"spawn": n}`` with two file descriptors attached: a ``memfd``
  holding the request (``env``, ``cwd``, ``entry``) and the agent's log file. The host
  never reads the request: only the child does, after the fork, so an agent's
  environment (credentials included) never enters the host's memory, and so is never
  inherited by the agents forked after it;
- host → launcher ``{"spawned": n, "pid": pid}`` (or ``"error"``) once the child leads its
  own session: a ``killpg`` from the launcher reaches it from then on, as after an exec.

**The children are the launcher's, not the host's** (``clone(CLONE_PARENT)``): the launcher
waits for each itself (exit codes exactly as for a subprocess; a pid cannot be reused before
the launcher has reaped it), their CPU time adds up in the launcher's children's as an
exec'd agent's did, and the parent-death signal (``runtime/orphans.die_with_parent``) ties
each to the launcher: if the launcher is SIGKILLed its agents are, and the session reaper
kills their steps, as before. The host itself dies with the launcher too, and exits when
its socket closes; its death costs no agent (the next spawn starts a new host).

What a child gets (the isolation an exec gave, ``_become_agent``): its own session and
process group; exactly the environment the launcher computed (``os.environ`` cleared and
refilled, and written where ``/proc/PID/environ`` shows it; ``TZ`` re-read, ``PYTHONPATH``
put in front of ``sys.path``); the working directory; stdin from /dev/null and
stdout/stderr on its log file (unbuffered, as ``PYTHONUNBUFFERED`` makes them); the signal
dispositions and mask the host had when it started (a fresh interpreter's); no other open
file descriptor; a reseeded ``random``. What cannot be redone after a fork stays the
host's: the interpreter's flags and hash seed (``PYTHON*`` variables other than
``PYTHONPATH``, read at start-up), which the launcher starts the host with from its own
environment, the agents' base environment; and the umask, resource limits and nice value,
which are the launcher's as they were when it started the host. nats-py's NUID (inbox
prefixes) is drawn from ``secrets`` when a client is made, in the child; ssl contexts,
uuid4 and tempfile names draw from the OS after the fork as well.

The clone is a raw system call (Python's ``os.fork`` has no flags), wrapped in the C API's
fork hooks as ``os.fork`` is. glibc's cached thread id of the child's main thread is then
the host's: glibc ≥ 2.34 no longer uses it where a process signals itself (``raise``), and
nothing else in the agent does (tested: tests/integration/test_warm_agents.py).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import importlib
import importlib.util
import io
import json
import os
import random
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

# What an agent imports, imported once here (the point of the host).
import jetreduce.cli.agent_main  # noqa: F401
from jetreduce.runtime import telemetry
from jetreduce.runtime.orphans import die_with_parent

__all__ = ["AGENT_ENTRY", "main"]

AGENT_ENTRY = "jetreduce.cli.agent_main:main"
"""What a child runs by default: the agent process's entry point."""

SETUP_FAILED = 127
"""A child's exit code when it could not become an agent (no working directory, say)."""

_MAX_MESSAGE = 65536

_CLONE_PARENT = 0x00008000
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}.get(os.uname().machine)
"""The clone syscall's number (no other architecture is supported: the launcher falls back
to exec there, see ``launcher/warm.warm_supported``)."""
_libc = ctypes.PyDLL(None, use_errno=True)  # PyDLL: the GIL is held across the call
_libc.syscall.restype = ctypes.c_long


class _Host:
    def __init__(self, fd: int) -> None:
        self.pid = os.getpid()
        self.launcher = os.getppid()
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(True)
        # A fresh interpreter's dispositions and mask, restored in every child.
        self.handlers = {
            sig: signal.getsignal(sig)
            for sig in signal.valid_signals()
            if sig not in (signal.SIGKILL, signal.SIGSTOP)
        }
        self.mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        self.env_region, self.argv_region = _regions()

    def send(self, message: dict[str, Any]) -> None:
        self.sock.send(json.dumps(message).encode())

    def serve(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides when we end
        with contextlib.suppress(OSError):  # EPIPE, ECONNRESET: the launcher is gone
            self.send({"ready": self.pid})
            while self.on_message():
                pass
        with contextlib.suppress(OSError):
            self.sock.close()

    def on_message(self) -> bool:
        data, fds, _, _ = socket.recv_fds(self.sock, _MAX_MESSAGE, 2)
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        n = json.loads(data).get("spawn")
        go = None
        try:
            if len(fds) != 2:
                raise ValueError(f"a spawn request carries 2 descriptors, not {len(fds)}")
            pid, go = self.fork(fds[0], fds[1])
            reply: dict[str, Any] = {"spawned": n, "pid": pid}
        except Exception as exc:  # told to the launcher, which raises it there
            reply = {"spawned": n, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            for fd in fds:
                os.close(fd)
        try:
            self.send(reply)
            if go is not None:
                os.write(go, b"g")  # the launcher knows its pid: it may run
        finally:
            if go is not None:
                os.close(go)  # unwritten (the launcher is gone): the child exits unrun
        return True

    def fork(self, request_fd: int, log_fd: int) -> tuple[int, int]:
        """Fork a child; returns its pid once it leads its own session, and the pipe end
        on which it waits for leave to run (written once the launcher has its pid: an agent
        runs only if its launcher can supervise it)."""
        if threading.active_count() != 1:  # a fork from a threaded process may deadlock
            raise AssertionError("the agent host has threads: it cannot fork safely")
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = _fork_sibling()
        except BaseException:
            for fd in (ready_r, ready_w, go_r, go_w):
                os.close(fd)
            raise
        if pid == 0:
            os.close(ready_r)
            os.close(go_w)
            _become_agent(self, request_fd, log_fd, ready_w, go_r)  # never returns
        os.close(ready_w)
        os.close(go_r)
        # The child closes its end once it leads its own session (or has failed to).
        while os.read(ready_r, 512):
            pass
        os.close(ready_r)
        return pid, go_w


def _fork_sibling() -> int:
    """``os.fork()``, except that the child is the launcher's (``CLONE_PARENT``): the
    launcher waits for it, its CPU time counts in the launcher's children's, and the
    parent-death signal ties it to the launcher, as for an exec'd agent. The public C API's
    fork hooks (``PyOS_BeforeFork``/``AfterFork_*``) do what ``os.fork`` does around it."""
    api = ctypes.pythonapi
    api.PyOS_BeforeFork()
    pid = int(_libc.syscall(_SYS_CLONE, _CLONE_PARENT | signal.SIGCHLD, 0, 0, 0, 0))
    if pid == 0:
        api.PyOS_AfterFork_Child()
        return 0
    errno = ctypes.get_errno()
    api.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(errno, f"clone: {os.strerror(errno)}")
    return pid


Region = tuple[int, int] | None


def _regions() -> tuple[Region, Region]:
    """Where the kernel shows this process's environment and command line from
    (``/proc/PID/environ`` and ``cmdline`` read the strings the process started with, not
    what ``putenv`` made since)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # Fields 48 to 51 of proc(5): arg_start, arg_end, env_start, env_end.
        bounds = [int(x) for x in fields[45:49]]
    except (OSError, IndexError, ValueError):
        return None, None
    argv, env = (bounds[0], bounds[1]), (bounds[2], bounds[3])
    return (env if 0 < env[0] < env[1] else None), (argv if 0 < argv[0] < argv[1] else None)


def _show(region: Region, entries: list[str]) -> None:
    """Write NUL-terminated ``entries`` where the kernel reads them from (the rest of the
    region zeroed), so that what is seen from outside (``ps``, ``/proc``, tests and tools
    that find agents by their command line and ``JETREDUCE_*`` variables) is the agent's
    command line and environment, as after an exec, not the host's. The launcher starts
    the host with room to spare in its environment (``JETREDUCE_AGENT_HOST_ROOM``) and a
    command line of an agent's length; entries past the room are left out of that view
    (never out of the environment itself)."""
    if region is None:
        return
    start, end = region
    size = end - start
    block = bytearray()
    for entry in entries:
        raw = entry.encode(errors="surrogateescape") + b"\0"
        if len(block) + len(raw) > size:
            break
        block += raw
    block += bytes(size - len(block))
    ctypes.memmove(start, bytes(block), size)


def _become_agent(host: _Host, request_fd: int, log_fd: int, ready_w: int, go_r: int) -> None:
    """In the child: turn the host's copy into what an exec'd agent would be, run the
    entry point, exit. Never returns."""
    try:
        os.setsid()
        die_with_parent(signal.SIGKILL)
        if os.getppid() != host.launcher:  # the launcher died before the line above
            os._exit(SETUP_FAILED)
        for sig, handler in host.handlers.items():
            with contextlib.suppress(OSError, ValueError, TypeError):
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, host.mask)
        host.sock.close()
        request = json.loads(os.pread(request_fd, os.fstat(request_fd).st_size, 0))
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        # Nothing else of the host's stays open: its socket, the request, the log's copy.
        keep = sorted((ready_w, go_r))
        os.closerange(3, keep[0])
        os.closerange(keep[0] + 1, keep[1])
        os.closerange(keep[1] + 1, os.sysconf("SC_OPEN_MAX"))
        os.chdir(request["cwd"])
        env: dict[str, str] = request["env"]
        os.environ.clear()
        os.environ.update(env)
        _show(host.env_region, [f"{k}={v}" for k, v in env.items()])
        argv: list[str] = request.get("argv") or []
        _show(host.argv_region, argv)
        if argv[1:2] == ["-m"] and len(argv) > 2:  # as ``python -m module`` sets it
            spec = importlib.util.find_spec(argv[2])
            sys.argv = [(spec.origin if spec else None) or argv[2], *argv[3:]]
        del env
        time.tzset()
        _stdio(unbuffered=bool(os.environ.get("PYTHONUNBUFFERED")))
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[0:0] = [os.path.abspath(p) for p in paths]
        sys.dont_write_bytecode = bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
        random.seed()
        entry = _entry(request.get("entry") or AGENT_ENTRY)
        del request
    except BaseException:
        # The exit code says it failed; the traceback is a courtesy (its log may be gone).
        with contextlib.suppress(BaseException):
            os.write(2, traceback.format_exc().encode(errors="replace"))
        os._exit(SETUP_FAILED)
    os.close(ready_w)
    if os.read(go_r, 1) != b"g":  # the host died, or could not tell the launcher our pid
        os._exit(SETUP_FAILED)
    os.close(go_r)
    os._exit(_run(entry))


def _stdio(*, unbuffered: bool) -> None:
    """New ``sys.std*`` on fds 0-2, as the interpreter makes them at start (``-u`` /
    ``PYTHONUNBUFFERED``: no buffer; else a buffer, flushed at exit)."""
    encoding = sys.__stdout__.encoding if sys.__stdout__ else "utf-8"

    def out(fd: int, errors: str, lines: bool) -> io.TextIOWrapper:
        raw = io.FileIO(fd, "w", closefd=False)
        if unbuffered:
            return io.TextIOWrapper(raw, encoding=encoding, errors=errors, write_through=True)
        buffered = io.BufferedWriter(raw)
        return io.TextIOWrapper(buffered, encoding=encoding, errors=errors, line_buffering=lines)

    sys.stdout = out(1, "strict", lines=False)
    sys.stderr = out(2, "backslashreplace", lines=True)  # as since Python 3.9
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding=encoding)


def _entry(name: str) -> Callable[[], object]:
    module, _, func = name.partition(":")
    target: Callable[[], object] = getattr(importlib.import_module(module), func)
    return target


def _run(entry: Callable[[], object]) -> int:
    """Run ``entry`` and return the exit code an interpreter would have ended with."""
    code = 0
    try:
        result = entry()
        code = result if isinstance(result, int) else 0
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        _finish()
        # As the interpreter does: die by the signal, so the parent sees -SIGINT.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    _finish()
    return code & 0xFF


def _finish() -> None:
    """What an interpreter does at exit that ``os._exit`` skips."""
    # The exit code is decided: a failing handler or a closed stream must not change it
    # (an interpreter prints and goes on too).
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):  # as above
            stream.flush()


HOST_FD_ENV = "JETREDUCE_AGENT_HOST_FD"
"""The host's end of its socket (in the environment, not the command line, which then has
the length of an agent's: ``python -m jetreduce.cli.agent_main``, see ``_show``)."""


_TELEMETRY_MODULES = (
    "opentelemetry.sdk.resources",
    "opentelemetry.sdk.trace",
    "opentelemetry.sdk.trace.export",
    "opentelemetry.sdk.metrics",
    "opentelemetry.sdk.metrics.export",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
)


def _preload() -> None:
    """Import what the agents of this environment import later, lazily: the OpenTelemetry
    SDK when telemetry is configured (modules only: providers, exporters and their threads
    are made by each agent, after the fork)."""
    if telemetry.TelemetryConfig.from_env("jetreduce-agent").active:
        for name in _TELEMETRY_MODULES:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)


def main() -> None:
    fd = int(os.environ.pop(HOST_FD_ENV))
    die_with_parent(signal.SIGKILL)
    _preload()
    host = _Host(fd)
    gc.collect()
    gc.freeze()  # children then leave the imported objects' pages shared
    host.serve()


if __name__ == "__main__":
    main()
