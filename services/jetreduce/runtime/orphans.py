"""Children that die with their parent.

A local agent or an embedded nats-server started by ``jetreduce run`` must not outlive it:
if the run is SIGKILLed, an orphaned server would keep the JetStream store open and a
``resume`` would start a second server on the same files. Linux's parent-death signal
(``prctl(PR_SET_PDEATHSIG)``) makes the kernel deliver SIGTERM to the child when the thread
that started it exits, so children must be started from the main (event-loop) thread.
Elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1
_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        _libc = None


def die_with_parent() -> None:
    """``preexec_fn`` for a child process: SIGTERM it when its parent goes away."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
