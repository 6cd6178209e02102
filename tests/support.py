"""Plain helpers for tests. Not in a ``conftest.py``: ``tests/k8s/conftest.py`` shares that
module name, so ``from support import …`` would depend on which directory was collected
last."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from jetreduce.contract.records import Phase, WorkflowRecord

__all__ = ["env_without_jetreduce", "git", "init_repo", "mapping_record", "wait_for"]


def env_without_jetreduce() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("JETREDUCE_")}


def mapping_record(wf: str, total: int, name: str = "test", **fields: Any) -> WorkflowRecord:
    """A workflow record as the planner leaves it: mapping ``total`` items, created now
    (``fields`` override the rest: ``max_parallel``, ``created_ts``…)."""
    now = time.time()
    values: dict[str, Any] = {"created_ts": now, "updated_ts": now, **fields}
    return WorkflowRecord(workflow_id=wf, name=name, phase=Phase.MAPPING, total=total, **values)


async def wait_for(predicate: Any, timeout_s: float = 10.0, every_s: float = 0.05) -> Any:
    """Poll an async or sync predicate until truthy; fail the test after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(every_s)


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, check=True, timeout=30
    )
    return out.stdout


def init_repo(path: Path) -> None:
    """A git repository on ``main`` with one commit and a committer identity."""
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.email", "test@example.com")
    git(path, "config", "user.name", "Test")
    (path / "README").write_text("repo\n")
    git(path, "add", "README")
    git(path, "commit", "-q", "-m", "initial")
