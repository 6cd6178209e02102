"""A smoke run of the load-test harness at its quick sizes (issue 7), so it cannot rot
unnoticed. It checks that every scenario runs to the end and reports a figure; whether the
figures meet their targets is the harness's business (docs/performance.md), not a test's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from support import env_without_jetreduce

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = ["enqueue", "dispatch", "latency", "efficiency", "shell"]
"""The ones needing only the test extra (memory is long; backends and peer need bench)."""
FIXED_COSTS = ["tiny", "run", "utilisation"]
"""Issue 17's scenarios: a tiny workflow's latency, ``jetreduce run`` of it, slot use."""


def _quick(*scenarios: str) -> list[dict[str, Any]]:
    return _quick_run(*scenarios)[0]


def _quick_run(*scenarios: str) -> tuple[list[dict[str, Any]], str]:
    """The results of a quick ``--no-report`` run, and its stderr (the issue tables)."""
    done = subprocess.run(
        [sys.executable, "-m", "loadtest", *scenarios, "--quick", "--no-report"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        env=env_without_jetreduce(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["name"] for r in results] == list(scenarios)
    return results, done.stderr


def _ran_to_the_end(r: dict[str, Any]) -> None:
    assert r["error"] is None, (r["name"], r["error"])
    assert r["quick"] is True
    assert isinstance(r["figure"], int | float) and r["figure"] > 0, r
    outcome = r["details"].get("outcome")
    assert outcome in (None, "workflow.completed"), (r["name"], outcome)


def test_quick_harness_run_reports_every_scenario() -> None:
    for r in _quick(*SCENARIOS):
        _ran_to_the_end(r)


def test_fixed_cost_scenarios_report_a_timeline_and_utilisation() -> None:
    """Its own test (and process) so that it runs beside the others under xdist."""
    (tiny, run, utilisation), tables = _quick_run(*FIXED_COSTS)
    for r in (tiny, run, utilisation):
        _ran_to_the_end(r)
    steps = tiny["details"]["step_median_ms"]
    assert next(iter(steps)).startswith("submit → ") and len(steps) >= 5, steps
    assert len(run["details"]["wall_s_each"]) == run["params"]["runs"]
    for wf in ("a", "b"):
        assert utilisation["details"][wf]["source"] is not None, utilisation["details"][wf]
    # The issue 17 table has a verdict on the rows these fill, "not run" on the others.
    rows = {line.split(" | ")[0].lstrip("| "): line for line in tables.splitlines()}
    for figure in ("4-item trivial workflow", "`jetreduce run`", "utilisation (busy"):
        row = next(line for name, line in rows.items() if name.startswith(figure))
        assert "met" in row or "missed" in row, row
    assert "dispatch: not run" in tables


def test_cluster_scenario_runs_r1_r3_and_fsync_on_a_three_node_cluster() -> None:
    """Its own test (and process) so that it runs beside the others under xdist."""
    (result,) = _quick("cluster")
    assert result["error"] is None and result["passed"] is True, result
    rates = result["details"]["rates_per_s"]
    assert set(rates) == {"single_r1", "cluster_r1", "cluster_r3", "cluster_r3_sync_always"}
    assert all(rate > 0 for rate in rates.values()), rates
    assert result["details"]["cluster_r3"]["outcome"] == "workflow.completed"


def test_agents1000_reports_issue_18_verdicts_and_the_one_slot_ceiling() -> None:
    """Its own test (and process) so that it runs beside the others under xdist: 20 one-slot
    agents beside 2 processes, idle agents, and bare one-slot workers (the ceiling)."""
    (result,), tables = _quick_run("agents1000")
    _ran_to_the_end(result)
    bare = result["details"]["one_slot_ceiling"]
    assert bare["processes"] == result["params"]["processes"] and bare["per_s"] > 0, bare
    assert bare["ratio_to_few_processes"] > 0, bare
    rows = [line for line in tables.splitlines() if line.startswith("| ")]
    for figure in ("e2e, ", "map.complete → workflow.completed", "leased but not running"):
        row = next(line for line in rows if line.startswith(f"| {figure}"))
        assert "met" in row or "missed" in row, row
    assert "bare one-slot ceiling" in next(line for line in rows if line.startswith("| e2e, "))
