"""Running a one-agent phase (setup, reduce) under its claim (runtime/claim.py).

The agent first waits for the claim (or for the phase's outcome, when another agent ran it
meanwhile: then there is nothing to do). Holding it, it runs the phase while renewing the
claim, and stops the steps when

* the claim is lost (taken by a successor, or not renewed in time): no outcome is published;
* the workflow ended (cancelled, timed out…): the steps are killed at once;
* SIGTERM arrives (an eviction, or the local launcher that started it died): the steps may
  finish within the grace period, as a map agent's items may; past it they are killed and the
  claim is released, so a successor re-runs them at once (the next attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from jetreduce.runtime.claim import Claim, Taken

__all__ = ["EXIT_SIGTERM", "run_claimed"]

EXIT_SIGTERM = 143
"""An agent's exit code when stopped (SIGTERM) before its phase ended: not a success, so the
launcher or the Job controller starts another in its place."""


async def _first(*aws: Awaitable[object], timeout_s: float | None = None) -> None:
    """Wait until the first of ``aws`` is done (or ``timeout_s``); the rest are cancelled
    unless they are tasks owned by the caller."""
    futures = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(futures, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future, given in zip(futures, aws, strict=True):
            if future is not given:
                future.cancel()


async def run_claimed(
    claim: Claim,
    *,
    decided: Callable[[], Awaitable[bool]],
    body: Callable[[Taken], Awaitable[int]],
    taken_hook: Callable[[Taken], Awaitable[None]],
    stop: asyncio.Event,
    abort: asyncio.Event,
    grace_s: float,
) -> int:
    """Run ``body`` once this agent holds ``claim``; its exit code, 0 when ``decided()``
    (the phase has an outcome) before the claim was won, 143 when stopped without one."""
    waiting = asyncio.ensure_future(claim.acquire(decided))
    await _first(waiting, stop.wait())
    if not waiting.done():
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        return 0 if abort.is_set() else EXIT_SIGTERM
    taken = waiting.result()
    if taken is None:
        return 0
    if await decided():  # the previous holder published its outcome just before the take
        await claim.finish()
        return 0
    holding = asyncio.Event()
    holder = asyncio.ensure_future(claim.hold(holding))
    work: asyncio.Future[int] | None = None
    try:
        await taken_hook(taken)
        work = asyncio.ensure_future(body(taken))
        await _first(work, claim.lost.wait(), abort.wait(), stop.wait())
        if not work.done() and stop.is_set() and not abort.is_set() and not claim.lost.is_set():
            await _first(work, claim.lost.wait(), abort.wait(), timeout_s=grace_s)
        if work.done():
            code = work.result()
            if code == 0 and not claim.lost.is_set():
                holding.set()
                await holder  # no renewal may race the removal
                await claim.finish()
            return code
        work.cancel()  # kills the running step's process group
        with contextlib.suppress(asyncio.CancelledError):
            await work
        if abort.is_set():
            return 0
        if not claim.lost.is_set():
            await claim.release()
        return EXIT_SIGTERM
    finally:
        holding.set()
        with contextlib.suppress(Exception):  # the renewer's end; the outcome is the work's
            await holder
        if work is not None and not work.done():
            work.cancel()
