"""Where map items run (``--workspace``): each agent in a directory of its own by default (a
git worktree in a repository, else a copy of the workflow directory), setup and reduce in
the workflow directory; ``shared`` opts out. Real nats-server, agents as child processes,
real git."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import Harness, item_results, services
from jetreduce.cli.submit import SubmitRejected, submit
from jetreduce.contract import events as ev
from jetreduce.contract.events import SubmitOptions
from support import env_without_jetreduce, git, init_repo, wait_for

pytestmark = pytest.mark.anyio


async def cleaned_up(repo: Path, h: Harness) -> None:
    """Wait (bounded) for :func:`no_agent_branches`; if it never holds, fail with what is
    left and what the agents logged (fresh clone 25 once saw it fail with no clue)."""
    try:
        await wait_for(lambda: no_agent_branches(repo), timeout_s=20)
    except AssertionError:
        left = git(repo, "worktree", "list") + git(repo, "branch", "--list")
        raise AssertionError(f"agents left behind:\n{left}\n{h.agent_logs()[-6000:]}") from None


def no_agent_branches(repo: Path) -> bool:
    """Every agent's worktree and slot branch is gone (agents clean up as they exit, which
    may be just after the workflow's end)."""
    return git(repo, "worktree", "list").count("\n") == 1 and "jetreduce-" not in git(
        repo, "branch", "--list"
    )


async def test_prodigy_context_example_runs_agents_outside_the_workflow_directory(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path, prodigy_examples: Path
) -> None:
    """Prodigy's test-mapreduce-context.yml, unchanged: setup writes the input with a relative
    path, agents print where they run (not the workflow directory), reduce counts."""
    text = (prodigy_examples / "test-mapreduce-context.yml").read_text()
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(text, workdir)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        results = await item_results(h, done.workflow_id)
    here = str(workdir.resolve())
    assert done.reduce_output == f"Reduce phase executed in:\n{here}\nProcessed 2 out of 2 items"
    where = {r.output.splitlines()[-1] for r in results.values()}
    assert here not in where
    assert all(Path(p).is_absolute() for p in where)


async def test_each_agent_has_its_own_copy_of_the_workflow_directory(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    """Three items run at once (a barrier holds each until all have started): each sees the
    workflow directory's files by relative path, writes into a directory no other agent sees,
    and the workflow directory gets none of it. Setup and reduce run in the workflow
    directory; the copies leave out the data directory and are removed afterwards."""
    (workdir / "data").mkdir()
    (workdir / "data" / "in.txt").write_text("shared input\n")
    (workdir / ".jetreduce").mkdir()
    (workdir / ".jetreduce" / "state").write_text("not for agents\n")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    text = f"""
name: own-dirs
mode: mapreduce
setup:
  - shell: pwd > setup-ran-in.txt
map:
  input: "echo '[1, 2, 3]'"
  max_parallel: 3
  agent_template:
    - shell: |
        touch {barrier}/${{item}}
        for _ in $(seq 200); do [ "$(ls {barrier} | wc -l)" -ge 3 ] && break; sleep 0.05; done
        echo "mine ${{item}}" > mine.txt
        sleep 0.2
        echo "$(cat data/in.txt)|$(cat mine.txt)|$(ls -A | tr '\\n' ' ')|$(pwd)"
reduce:
  - shell: echo "$(pwd)|$(cat setup-ran-in.txt)"
"""
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(text, workdir, max_attempts=1)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        results = await item_results(h, done.workflow_id)
    here = str(workdir.resolve())
    assert done.reduce_output == f"{here}|{here}"
    assert (done.done, done.dead) == (3, 0)
    assert len(os.listdir(barrier)) == 3  # all three ran at the same time
    dirs = set()
    for index, result in results.items():
        data, mine, listing, where = result.output.split("|")
        assert data == "shared input"
        assert mine == f"mine {index + 1}"  # nobody else's mine.txt
        assert ".jetreduce" not in listing.split() and "data" in listing.split()
        dirs.add(where)
    assert len(dirs) == 3 and here not in dirs
    assert not (workdir / "mine.txt").exists()
    await wait_for(lambda: not any(Path(d).exists() for d in dirs), timeout_s=20)


async def test_shared_workspace_runs_items_in_the_workflow_directory(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    text = """
name: shared
mode: mapreduce
map:
  input: "echo '[1, 2]'"
  agent_template:
    - shell: echo ${item} > out-${item}.txt && pwd
reduce:
  - shell: cat out-*.txt | tr '\\n' ' '
"""
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(text, workdir, workspace="shared")
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        results = await item_results(h, done.workflow_id)
    assert done.reduce_output.split() == ["1", "2"]
    assert {r.output for r in results.values()} == {str(workdir.resolve())}


async def test_git_repository_gives_each_agent_a_worktree_and_merges_commits(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path, prodigy_examples: Path
) -> None:
    """Prodigy's minimal-mapreduce.yml, unchanged and without any option: agents commit in
    worktrees of their own, the commits are merged into the workflow branch before reduce
    (whose check fails the workflow otherwise), and nothing is left behind."""
    init_repo(workdir)
    text = (prodigy_examples / "minimal-mapreduce.yml").read_text()
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(text, workdir, max_attempts=1)  # no retry hides a failure
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
    assert (done.total, done.done, done.dead) == (3, 3, 0)
    for name in ("item-one", "item-two", "item-three"):
        assert (
            (workdir / f"output-{name}.txt").read_text().startswith(f"Processed by agent: {name}\n")
        )
        assert f"Process {name}" in git(workdir, "log", "--format=%s", "main")
    assert git(workdir, "branch", "--show-current").strip() == "main"
    assert git(workdir, "status", "--porcelain", "--untracked-files=no").strip() == ""
    await cleaned_up(workdir, h)


async def test_failed_item_in_an_agent_worktree_is_kept_apart_and_reset(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    """One agent, three items in turn: item 2 commits, leaves a stray file and fails. Its
    commit stays on its own branch, never merged; item 3 starts from a clean worktree."""
    init_repo(workdir)
    text = """
name: reset
mode: mapreduce
map:
  input: "echo '[1, 2, 3]'"
  max_parallel: 1
  agent_template:
    - shell: |
        test ! -e stray.txt || { echo "dirty worktree"; exit 9; }
        echo ${item} > f${item}.txt && git add f${item}.txt && git commit -q -m "item ${item}"
        if [ ${item} = 2 ]; then echo junk > stray.txt; exit 3; fi
reduce:
  - shell: ls f*.txt | tr '\\n' ' '
"""
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(text, workdir, max_attempts=1)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        results = await item_results(h, done.workflow_id)
    assert (done.done, done.dead) == (2, 1)
    assert isinstance(results[1], ev.ItemDead) and results[1].error_type == "CommandFailed"
    assert done.reduce_output.split() == ["f1.txt", "f3.txt"]
    log = git(workdir, "log", "--format=%s", "main")
    assert "item 1" in log and "item 3" in log and "item 2" not in log
    kept = f"jetreduce-{done.workflow_id}-item_1"
    assert git(workdir, "log", "-1", "--format=%s", kept).strip() == "item 2"
    await wait_for(
        lambda: (
            git(workdir, "worktree", "list").count("\n") == 1
            and git(workdir, "branch", "--list", "jetreduce-*").split() == [kept]
        ),
        timeout_s=20,
    )


@pytest.mark.parametrize("workspace", ["agent", "item"])
async def test_worktree_merge_conflict_fails_that_item(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path, workspace: str
) -> None:
    init_repo(workdir)
    text = """
name: conflicting
mode: mapreduce
map:
  input: "echo '[1, 2]'"
  max_parallel: 2
  agent_template:
    - shell: |
        sleep 0.5
        echo "written by ${item}" > shared.txt
        git add shared.txt && git commit -q -m "item ${item}"
      commit_required: true
reduce:
  - shell: cat shared.txt
"""
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(text, workdir, workspace=workspace, max_attempts=1)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        results = await item_results(h, done.workflow_id)
    assert (done.done, done.dead) == (1, 1)
    dead = next(r for r in results.values() if isinstance(r, ev.ItemDead))
    assert dead.error_type == "MergeConflict"
    assert "merge conflict" in dead.error and "shared.txt" in dead.error
    winner = next(r for r in results.values() if isinstance(r, ev.ItemDone))
    assert done.reduce_output == f"written by {winner.index + 1}"
    assert git(workdir, "status", "--porcelain").strip() == ""  # the merge was aborted


async def test_an_unknown_workspace_is_rejected_at_submit(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    text = "name: w\nmode: mapreduce\nmap:\n  input: \"echo '[1]'\"\n  agent_template: []\n"
    async with services(nats_url, prefix, tmp_path) as h:
        with pytest.raises(SubmitRejected) as rejected:
            await submit(
                h.nc,
                h.subjects,
                text,
                SubmitOptions(workdir=str(workdir), workspace="sideways"),
                workflow_id="wf-bad-workspace",
                source="test",
            )
    reply = rejected.value.reply
    assert not reply.accepted
    assert [(p.path, p.message) for p in reply.problems] == [
        ("options.workspace", "must be one of agent, item, shared")
    ]


def test_cli_workspace_choices(tmp_path: Path) -> None:
    workflow = tmp_path / "wf.yml"
    workflow.write_text(
        "name: w\nmode: mapreduce\nmap:\n  input: \"echo '[1]'\"\n  agent_template: []\n"
    )
    cli = [sys.executable, "-m", "jetreduce", "run", str(workflow), "--dry-run"]

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, *extra],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env=env_without_jetreduce(),
        )

    default = run()
    assert default.returncode == 0, default.stderr
    assert "map items run in: a directory of each agent's own" in default.stdout
    assert "a git worktree per item" in run("--worktrees").stdout
    assert "the workflow directory itself" in run("--workspace", "shared").stdout
    bad = run("--workspace", "sideways")
    assert bad.returncode == 2 and "unknown --workspace 'sideways'" in bad.stderr
    both = run("--worktrees", "--workspace", "shared")
    assert both.returncode == 2 and "--worktrees contradicts --workspace shared" in both.stderr


async def test_a_killed_agents_worktree_and_scratch_are_swept_by_its_successor(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    """The agent dies (SIGKILL) mid-item after committing in its worktree. Its successor
    removes what it left (scratch directory, worktree, slot branch), the item is redelivered
    and done, and its first attempt's commit never reaches the workflow branch."""
    init_repo(workdir)
    marker = tmp_path / "killed-once"
    text = f"""
name: killed
map:
  input: "echo '[1]'"
  max_parallel: 1
  agent_template:
    - shell: |
        if [ ! -e {marker} ]; then
          touch {marker}
          echo wip > wip.txt && git add wip.txt && git commit -q -m "first attempt"
          kill -9 $PPID
          sleep 30
        fi
        echo done > f.txt && git add f.txt && git commit -q -m "second attempt"
reduce:
  - shell: ls
"""
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(text, workdir, workflow_id="wf-killed", lease_s=2)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
    assert (done.done, done.dead) == (1, 0)
    assert marker.exists()
    log = git(workdir, "log", "--format=%s", "main")
    assert "second attempt" in log and "first attempt" not in log
    assert not (workdir / "wip.txt").exists()
    try:
        await cleaned_up(workdir, h)
    except AssertionError:
        left = git(workdir, "worktree", "list") + git(workdir, "branch", "--list")
        raise AssertionError(f"left behind:\n{left}\n{h.agent_logs()}") from None
    scratch = Path(tempfile.gettempdir())
    await wait_for(lambda: not list(scratch.glob("jetreduce-wf-killed-*")), timeout_s=20)
