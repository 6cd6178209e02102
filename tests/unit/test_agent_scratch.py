"""An agent removes the scratch directories its predecessors left, never one whose owner
still runs (an orphaned agent finishing its items after its launcher died; issue 13)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from jetreduce.worker.context import remove_leftovers


def test_only_the_dead_owners_scratch_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    prefix = "jetreduce-wf-map0-"
    with subprocess.Popen(["sleep", "30"]) as alive:
        dead = subprocess.Popen(["true"])
        dead.wait()
        running = tmp_path / f"{prefix}{alive.pid}-abc"
        gone = tmp_path / f"{prefix}{dead.pid}-def"
        old_style = tmp_path / f"{prefix}xyz"  # no pid in the name
        other = tmp_path / f"jetreduce-wf-map1-{dead.pid}-ghi"  # another index
        for d in (running, gone, old_style, other):
            (d / "agent-0").mkdir(parents=True)
        try:
            remove_leftovers(prefix)
        finally:
            alive.kill()
    assert running.is_dir() and other.is_dir()
    assert not gone.exists() and not old_style.exists()


def test_the_kept_directory_stays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    mine = tmp_path / f"jetreduce-wf-reduce0-{dead.pid}-x"  # as if its owner had died
    mine.mkdir()
    remove_leftovers("jetreduce-wf-reduce0-", keep=mine)
    assert mine.is_dir()
