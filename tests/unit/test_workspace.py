"""The agent workspace rules that need no NATS: reading HEAD without git, the copy limit, and
distinct workspaces for items that start at the same moment."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from jetreduce.worker import workspace as workspace_module
from jetreduce.worker.workspace import Workspaces, read_head
from support import git, init_repo

pytestmark = pytest.mark.anyio


def rev_parse(repo: Path) -> str:
    return git(repo, "rev-parse", "HEAD").strip()


def test_read_head_agrees_with_git(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    init_repo(repo)
    assert read_head(str(repo)) == rev_parse(repo)
    tree = tmp_path / "tree"
    git(repo, "worktree", "add", "-q", "-b", "side", str(tree))
    (tree / "x").write_text("x\n")
    git(tree, "add", "x")
    git(tree, "commit", "-q", "-m", "x")
    assert read_head(str(tree)) == rev_parse(tree) != rev_parse(repo)
    git(repo, "pack-refs", "--all")  # refs move into packed-refs
    assert read_head(str(tree)) == rev_parse(tree)
    git(tree, "checkout", "-q", "--detach")
    assert read_head(str(tree)) == rev_parse(tree)
    assert read_head(str(tmp_path)) is None  # not a repository: the caller asks git


async def test_a_directory_too_big_to_copy_is_shared_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    for i in range(5):
        (work / f"f{i}").write_text("data\n")
    monkeypatch.setattr(workspace_module, "COPY_LIMIT_FILES", 4)
    spaces = Workspaces(str(work), "wf", mode="agent", scratch=tmp_path / "scratch")
    with caplog.at_level(logging.WARNING):
        ws = await spaces.acquire(0)
    assert spaces.kind == "shared" and ws.path == str(work)
    assert "more than 4 files" in caplog.text and "--workspace shared" in caplog.text


async def test_items_starting_together_get_distinct_copies_reused_afterwards(
    tmp_path: Path,
) -> None:
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "a.txt").write_text("a\n")
    (work / ".jetreduce").mkdir()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    spaces = Workspaces(str(work), "wf", mode="agent", scratch=scratch)
    first, second = await asyncio.gather(spaces.acquire(0), spaces.acquire(1))
    assert spaces.kind == "copy" and first.path != second.path
    for ws in (first, second):
        assert Path(ws.path, "sub", "a.txt").read_text() == "a\n"
        assert not Path(ws.path, ".jetreduce").exists()
    await spaces.release(first, merged=True, index=0)
    assert (await spaces.acquire(2)).path == first.path  # the freed slot's directory
    await spaces.close()
    assert not Path(first.path).exists() and not Path(second.path).exists()


async def test_a_data_directory_under_another_name_is_not_copied(tmp_path: Path) -> None:
    """``jetreduce run --data-dir state`` inside the workflow directory: the live store is
    no item's input (copying it made each run slower than the last); a directory that
    merely has a ``jetstream`` folder, without the server's lock, is data and is copied."""
    work = tmp_path / "work"
    (work / "state" / "jetstream").mkdir(parents=True)  # `jetreduce server --data-dir`
    (work / "state" / "lock").write_text("{}")
    (work / "run" / "nats" / "jetstream").mkdir(parents=True)  # `jetreduce run --data-dir`
    (work / "run" / "nats" / "lock").write_text("{}")
    (work / "run" / "logs").mkdir()
    (work / "data" / "jetstream").mkdir(parents=True)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    spaces = Workspaces(str(work), "wf", mode="agent", scratch=scratch)
    ws = await spaces.acquire(0)
    try:
        assert not Path(ws.path, "state").exists()
        assert not Path(ws.path, "run").exists()
        assert Path(ws.path, "data", "jetstream").is_dir()
    finally:
        await spaces.close()


async def test_item_worktrees_need_a_repository(tmp_path: Path) -> None:
    spaces = Workspaces(str(tmp_path), "wf", mode="item", scratch=tmp_path / "s")
    with pytest.raises(workspace_module.WorkspaceError, match="git repository"):
        await spaces.prepare()


async def test_an_uncommitted_directory_in_a_repository_gets_a_copy(tmp_path: Path) -> None:
    """A worktree would hold none of its files: the agent copies it instead."""
    init_repo(tmp_path)
    work = tmp_path / "scratchpad"
    work.mkdir()
    (work / "input.json").write_text("[1]")
    scratch = tmp_path / "s"
    scratch.mkdir()
    spaces = Workspaces(str(work), "wf", mode="agent", scratch=scratch)
    ws = await spaces.acquire(0)
    assert spaces.kind == "copy" and Path(ws.path, "input.json").read_text() == "[1]"
    git(tmp_path, "add", "scratchpad")
    git(tmp_path, "commit", "-q", "-m", "add")
    committed = Workspaces(str(work), "wf", mode="agent", scratch=scratch)
    await committed.prepare()
    assert committed.kind == "agent-worktree"


async def test_a_predecessors_worktrees_and_slot_branches_go_even_if_its_directory_stayed(
    tmp_path: Path,
) -> None:
    """What a killed agent with the same index left (its worktree directory still there, a
    commit on its slot branch) is removed when its successor prepares; others' stay."""
    repo = tmp_path / "repo"
    repo.mkdir()
    init_repo(repo)
    stale = tmp_path / "stale"
    git(repo, "worktree", "add", "-q", "-b", "jetreduce-wf-a0-0", str(stale))
    (stale / "wip.txt").write_text("wip\n")
    git(stale, "add", "wip.txt")
    git(stale, "commit", "-q", "-m", "wip")
    other = tmp_path / "other"
    git(repo, "worktree", "add", "-q", "-b", "jetreduce-wf-a1-0", str(other))
    scratch = tmp_path / "s"
    scratch.mkdir()
    spaces = Workspaces(str(repo), "wf", mode="agent", scratch=scratch, agent=0)
    await spaces.prepare()
    assert spaces.kind == "agent-worktree"
    assert not stale.exists()
    assert git(repo, "branch", "--list", "jetreduce-*").split() == ["+", "jetreduce-wf-a1-0"]
    assert str(other) in git(repo, "worktree", "list")
