"""The peer: the same no-op map-reduce as a Celery chord (Redis broker and result backend).

Method as in research/baselines.md row 4: a prefork worker with as many processes as the
machine has cores (``-c`` = ``os.cpu_count()``, issue 17: the peer gets the whole machine, as
jetreduce's agents do) and prefetch multiplier 64; the chord's header is ``n`` no-op tasks,
its body sums their results; timed from submit to the body's result. The wait uses a fresh
``AsyncResult(res.id)``: the chord's own ``res.get()`` is quadratic on the client (it
re-checks every header result on each event) and would measure Celery's client, not its
throughput.

Celery is imported only here and only in the ``bench`` extra; kombu 5.7's Redis transport
needs ``packaging`` without declaring it (installed with the extra).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from celery import Celery, chord

from loadtest.infra import REPO, stop_group

__all__ = ["CONCURRENCY", "app", "run_chord"]

CONCURRENCY = os.cpu_count() or 1
"""Worker processes: one per core."""

BROKER = os.environ.get("LOADTEST_CELERY_REDIS", "redis://127.0.0.1:6379/0")
app = Celery("loadtest_peer", broker=BROKER, backend=BROKER)
app.conf.update(
    worker_prefetch_multiplier=64,
    task_ignore_result=False,
    result_expires=600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="loadtest.noop")  # type: ignore[untyped-decorator]
def noop(x: int) -> int:
    return x


@app.task(name="loadtest.total")  # type: ignore[untyped-decorator]
def total(xs: list[int]) -> int:
    return len(xs)


def _configure(url: str) -> None:
    app.conf.broker_url = url
    app.conf.result_backend = url


def run_chord(redis_url: str, n: int, workdir: Path, *, timeout_s: float) -> dict[str, Any]:
    """Start a worker, wait until it answers, run the chord, stop the worker."""
    _configure(redis_url)
    env = dict(os.environ, LOADTEST_CELERY_REDIS=redis_url)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "loadtest.celery_peer",
        "worker",
        "--pool",
        "prefork",
        "-c",
        str(CONCURRENCY),
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-l",
        "WARNING",
    ]
    with (workdir / "celery-worker.log").open("ab") as log:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        # Ready = a task makes the round trip (the worker has connected and consumes).
        noop.delay(0).get(timeout=60)
        t0 = time.perf_counter()
        res = chord(noop.s(i) for i in range(n))(total.s())
        t_submitted = time.perf_counter()
        value = app.AsyncResult(res.id).get(timeout=timeout_s)
        wall = time.perf_counter() - t0
        if value != n:
            raise RuntimeError(f"celery chord summed {value}, expected {n}")
        return {
            "items": n,
            "wall_s": round(wall, 3),
            "per_s": round(n / wall, 1),
            "submit_s": round(t_submitted - t0, 3),
            "pool": f"prefork -c {CONCURRENCY}",
        }
    finally:
        stop_group(proc, grace_s=15)
