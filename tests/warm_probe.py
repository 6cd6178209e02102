"""A stand-in agent for the warm-agent tests: it writes what it sees of its own process (one
JSON line on stdout, its log file) and then does what ``PROBE_MODE`` says. Run by the warm
host (``entry="warm_probe:main"``) or by exec (``python -c 'import warm_probe; ...'``) for
comparison: both must see the same kind of process."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import uuid


def state() -> dict[str, object]:
    from nats.aio.client import Client

    fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    handlers = {}
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        handler = signal.getsignal(sig)
        handlers[int(sig)] = handler if isinstance(handler, int) else repr(handler)
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "sid": os.getsid(0),
        "pgid": os.getpgid(0),
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "stdin": os.readlink("/proc/self/fd/0"),
        "stdout": os.readlink("/proc/self/fd/1"),
        "fds": fds,
        "handlers": handlers,
        "mask": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "inbox": Client().new_inbox(),
        "random": random.random(),
        "uuid": str(uuid.uuid4()),
        "loggers": len(__import__("logging").getLogger().handlers),
    }


def main() -> int:
    print(json.dumps(state()), flush=True)
    mode = os.environ.get("PROBE_MODE", "exit:0")
    kind, _, arg = mode.partition(":")
    if kind == "exit":
        return int(arg)
    if kind == "signal":
        signal.signal(int(arg), signal.SIG_DFL)
        os.kill(os.getpid(), int(arg))
    if kind == "raise":
        raise RuntimeError("probe failed on purpose")
    if kind == "step":
        # A step in its own process group, as an agent's are: the launcher's stop must
        # reach it through the agent's session.
        step = subprocess.Popen(["sleep", "600"], process_group=0)
        print(json.dumps({"step": step.pid}), flush=True)
    signal.pause()  # until a signal ends it (SIGTERM: default disposition)
    return 0


if __name__ == "__main__":
    sys.exit(main())
