"""SIGINT and SIGTERM end a long-running command whatever it is waiting for.

A command installs :class:`Signals` around its body. Until the body says it reacts to
:attr:`Signals.event` itself (:meth:`Signals.handle`), a signal cancels the body, so a
connect, a server start or any other wait cannot swallow Ctrl-C. A second signal always
cancels, so a body whose own reaction hangs still ends.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from types import TracebackType

from jetreduce.cli import exit_codes

__all__ = ["Signals", "block_until_signalled"]

_HANDLED = (signal.SIGINT, signal.SIGTERM)


class Signals:
    """Use inside a running event loop: ``with Signals() as signals: …``."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.event = asyncio.Event()
        self._handled = False
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()

    def __enter__(self) -> Signals:
        for sig in _HANDLED:
            self._loop.add_signal_handler(sig, self._on_signal, sig)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig in _HANDLED:
            self._loop.remove_signal_handler(sig)

    def handle(self) -> None:
        """From now on the body watches :attr:`event` itself (the first signal only)."""
        self._handled = True

    def _on_signal(self, sig: int) -> None:
        self.received.append(sig)
        self.event.set()
        if (not self._handled or len(self.received) > 1) and self._task is not None:
            self._task.cancel()

    def interrupted_by(self, exc: BaseException) -> bool:
        """Whether ``exc`` (a CancelledError) is this signal's doing; if so the task's
        cancellation is consumed so the command can still clean up and exit."""
        if not isinstance(exc, asyncio.CancelledError) or not self.received:
            return False
        if self._task is not None:
            self._task.uncancel()
        return True

    @property
    def terminated(self) -> bool:
        return signal.SIGTERM in self.received

    @property
    def why(self) -> str:
        return "terminated (SIGTERM)" if self.terminated else "interrupted (Ctrl-C)"

    @property
    def exit_code(self) -> int:
        return exit_codes.TERMINATED if self.terminated else exit_codes.INTERRUPTED


def block_until_signalled(alive: Callable[[], bool], poll_s: float = 0.5) -> int | None:
    """Block (no event loop: the foreground servers) while ``alive()``, until SIGINT or
    SIGTERM; the signal received, or None if ``alive()`` turned false.

    Handlers of its own, not Python's ``KeyboardInterrupt``: a shell starts background jobs
    with SIGINT ignored, Python then installs no handler for it, and Ctrl-C (or a
    supervisor's SIGINT) would be lost. SIGTERM must stop the servers cleanly too."""
    received: list[int] = []
    woken = threading.Event()

    def on_signal(sig: int, _frame: object) -> None:
        received.append(sig)
        woken.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in _HANDLED}
    try:
        while alive() and not woken.wait(poll_s):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return received[0] if received else None
