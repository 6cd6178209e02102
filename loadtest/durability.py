"""What durability costs: fsync on every write, and three replicas of every stream.

Both scenarios run the dispatch workflow (``scenarios.dispatch_once``) several times in one
run, so the ratios compare like with like on the same machine at the same moment:

* ``durability``: one server, the embedded default lazy fsync against
  ``sync_interval: always`` (DESIGN.md's durability note; the prod overlay's choice);
* ``cluster``: a local 3-node cluster (``jetreduce.cluster``), streams at R1 against R3,
  and R3 with ``sync_interval: always`` on every node (docs/operations.md, "running it
  highly available", argues the trade-off from these figures).
"""

from __future__ import annotations

import time
from typing import Any

from loadtest.common import Run
from loadtest.dispatching import DISPATCH_PARALLEL, dispatch_once
from loadtest.report import Result

__all__ = ["cluster", "durability"]


def durability(run: Run) -> Result:
    """The dispatch scenario under the embedded server's default lazy fsync and under
    ``sync_interval: always`` (what the prod overlay sets: DESIGN.md's durability note), in
    the same run; the ratio is what fsync on every write costs here."""
    n = run.size(50_000, 5_000)
    start = time.monotonic()
    lazy = dispatch_once(run, n, DISPATCH_PARALLEL)
    always = dispatch_once(run, n, DISPATCH_PARALLEL, sync_always=True, profile="durability")
    lazy_rate, always_rate = lazy["e2e_per_s"] or 0.0, always["e2e_per_s"] or 0.0
    outcomes = [lazy["outcome"], always["outcome"]]
    return Result(
        name="durability",
        figure=always_rate,
        unit="items/s",
        ceiling=lazy_rate,
        ceiling_what="default lazy fsync, same size",
        ratio=round(always_rate / lazy_rate, 3) if lazy_rate else None,
        target="both complete (measured trade-off)",
        passed=all(o.endswith("completed") for o in outcomes),
        wall_s=round(time.monotonic() - start, 1),
        params={"items": n},
        details={"lazy": lazy, "sync_always": always},
        summary=f"sync_interval always {always_rate:,.0f} vs lazy {lazy_rate:,.0f} items/s "
        f"e2e ({n:,} no-op items)",
        quick=run.quick,
    )


CLUSTER_RUNS: dict[str, dict[str, Any]] = {
    "single_r1": {},
    "cluster_r1": {"cluster": True},
    "cluster_r3": {"cluster": True, "stream_replicas": 3},
    "cluster_r3_sync_always": {"cluster": True, "stream_replicas": 3, "sync_always": True},
}
"""The cluster scenario's runs, in order; the single server is the baseline."""


def cluster(run: Run) -> Result:
    """Dispatch on one server (R1), on a local 3-node cluster at R1 and at R3, and at R3
    with fsync on every write, in the same run. The figure is R3 (what the prod overlay
    runs, lazy fsync); the ceiling is the single server. All three nodes share the machine's
    two cores here, so the R3 cost is an upper bound of what separate machines would pay
    in CPU, and a lower bound in network latency (loopback)."""
    n = run.size(50_000, 2_000)
    start = time.monotonic()
    runs = {
        name: dispatch_once(run, n, DISPATCH_PARALLEL, **kw) for name, kw in CLUSTER_RUNS.items()
    }
    rates = {name: r["e2e_per_s"] or 0.0 for name, r in runs.items()}
    base, r3 = rates["single_r1"], rates["cluster_r3"]
    return Result(
        name="cluster",
        figure=r3,
        unit="items/s",
        ceiling=base,
        ceiling_what="one server, R1, same size",
        ratio=round(r3 / base, 3) if base else None,
        target="all complete (measured trade-off)",
        passed=all(r["outcome"].endswith("completed") for r in runs.values()),
        wall_s=round(time.monotonic() - start, 1),
        params={"items": n, "max_parallel": DISPATCH_PARALLEL},
        details={"rates_per_s": rates, **runs},
        summary="3-node cluster: "
        + ", ".join(f"{name} {rate:,.0f}" for name, rate in rates.items())
        + f" items/s e2e ({n:,} no-op items)",
        quick=run.quick,
    )
