"""Where a map agent runs an item's steps: the workflow directory, or a git worktree of it.

Without ``--worktrees`` every agent runs in the workflow directory (as setup and reduce do).
Prodigy gives each agent its own worktree; a plain empty per-agent directory would break
the relative paths workflows use (``input: items.json``, ``cat src/${item}``), so the shared
directory is the default and the isolation is opt-in.

With ``--worktrees`` (the workflow directory must be in a git repository, on a branch):

* each item gets ``git worktree add -B jetreduce-<wf>-item_<i> <tmp> <workflow branch tip>``
  and its steps run there (in the same sub-directory the workflow directory is of its repo);
* ``commit_required: true`` steps must move HEAD (checked by the agent with :func:`head`);
* after the item's steps succeed, its branch is merged into the workflow branch, in the
  workflow directory, **one merge at a time** across all agents on the host (an ``flock`` in
  the repository's git directory). A conflict aborts the merge and fails the item
  (:class:`WorkspaceError` with ``error_type="MergeConflict"``). Map completion waits for
  every item, so every merge is in before reduce starts;
* the worktree is removed afterwards; the branch too, unless it holds commits that were not
  merged (a failed item's work stays inspectable).

All git calls go through :func:`~jetreduce.worker.steps.run_process` (bounded, killable).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from jetreduce.worker.steps import StepOutcome, base_env, run_process

__all__ = [
    "GIT_TIMEOUT_S",
    "LOCK_WAIT_S",
    "Workspace",
    "WorkspaceError",
    "Workspaces",
    "head",
]

log = logging.getLogger(__name__)

GIT_TIMEOUT_S: Final = 120.0
"""Bound on one git command (a merge of a large branch included)."""
LOCK_WAIT_S: Final = 600.0
"""Longest wait for the host-wide merge lock: many agents may queue behind one another."""
LOCK_POLL_S: Final = 0.05
LOCK_FILE: Final = "jetreduce-merge.lock"
FALLBACK_IDENTITY: Final = {
    "GIT_AUTHOR_NAME": "jetreduce",
    "GIT_AUTHOR_EMAIL": "jetreduce@localhost",
    "GIT_COMMITTER_NAME": "jetreduce",
    "GIT_COMMITTER_EMAIL": "jetreduce@localhost",
}


class WorkspaceError(Exception):
    """A worktree could not be made, or an item's branch could not be merged."""

    def __init__(self, message: str, error_type: str = "WorktreeError") -> None:
        super().__init__(message)
        self.error_type = error_type


@dataclass
class Workspace:
    path: str
    """Where the item's commands run."""
    root: str | None = None
    """The worktree's top directory (None: the shared workflow directory)."""
    branch: str | None = None
    base: str | None = None
    """The commit the branch started from."""


def _git_env() -> dict[str, str]:
    return {**base_env(), "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}


async def _git(*args: str, cwd: str, env: dict[str, str] | None = None) -> StepOutcome:
    return await run_process(
        ["git", *args], env=env or _git_env(), cwd=cwd, timeout_s=GIT_TIMEOUT_S
    )


async def head(cwd: str) -> str | None:
    """The commit HEAD points at in ``cwd``; None outside a git repository (or before the
    first commit)."""
    out = await _git("rev-parse", "--verify", "-q", "HEAD", cwd=cwd)
    return (out.stdout.strip() or None) if out.ok else None


def _why(out: StepOutcome) -> str:
    text = (out.stderr or out.stdout or out.error).strip()
    return text[-1000:] if text else f"exit code {out.exit_code}"


class Workspaces:
    """Hands out one :class:`Workspace` per item for one agent process."""

    def __init__(self, workdir: str, workflow_id: str, *, worktrees: bool, scratch: Path) -> None:
        self.workdir = workdir
        self.wf = workflow_id
        self.worktrees = worktrees
        self.scratch = scratch
        self.top: str | None = None
        self.git_dir: str | None = None
        self.branch: str | None = None
        self.subdir = "."

    async def prepare(self) -> None:
        """Find the repository and the workflow branch. Raises :class:`WorkspaceError` when
        worktrees are asked for and the workflow directory cannot give them."""
        if not self.worktrees:
            return
        top = await _git("rev-parse", "--show-toplevel", cwd=self.workdir)
        if not top.ok:
            raise WorkspaceError(
                f"--worktrees needs the workflow directory {self.workdir} to be in a git "
                f"repository: {_why(top)}"
            )
        self.top = top.stdout.strip()
        common = await _git("rev-parse", "--path-format=absolute", "--git-common-dir", cwd=self.top)
        self.git_dir = common.stdout.strip() if common.ok else os.path.join(self.top, ".git")
        branch = await _git("symbolic-ref", "--short", "-q", "HEAD", cwd=self.top)
        if not branch.ok or not branch.stdout.strip():
            raise WorkspaceError(
                f"--worktrees needs the workflow directory on a branch (HEAD of {self.top} is "
                "detached): agents' branches are merged into it"
            )
        self.branch = branch.stdout.strip()
        if await head(self.top) is None:
            raise WorkspaceError(
                f"--worktrees needs at least one commit on {self.branch} to branch from"
            )
        self.subdir = os.path.relpath(os.path.realpath(self.workdir), os.path.realpath(self.top))

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """The host-wide lock serialising merges (and worktree bookkeeping) of all agents."""
        assert self.git_dir is not None
        path = os.path.join(self.git_dir, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise WorkspaceError(
                            f"waited {LOCK_WAIT_S:.0f}s for the merge lock {path}"
                        ) from None
                    await asyncio.sleep(LOCK_POLL_S)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    async def acquire(self, index: int) -> Workspace:
        """A workspace for item ``index``: a fresh worktree on its own branch off the
        workflow branch's current tip, or the workflow directory itself."""
        if not self.worktrees:
            return Workspace(path=self.workdir)
        assert self.top is not None and self.branch is not None
        branch = f"jetreduce-{self.wf}-item_{index}"
        root = str(self.scratch / f"worktree-{index}")
        async with self._locked():
            await _git("worktree", "prune", cwd=self.top)
            base = await head(self.top)
            out = await _git(
                "worktree", "add", "-f", "-B", branch, root, base or self.branch, cwd=self.top
            )
        if not out.ok:
            raise WorkspaceError(f"git worktree add for item {index} failed: {_why(out)}")
        path = Path(root, self.subdir)
        path.mkdir(parents=True, exist_ok=True)
        return Workspace(path=str(path), root=root, branch=branch, base=base)

    async def merge(self, ws: Workspace) -> None:
        """Merge the item's branch into the workflow branch (serially). A branch without new
        commits is not merged. Raises :class:`WorkspaceError` (``MergeConflict``)."""
        if ws.root is None or ws.branch is None:
            return
        assert self.top is not None
        tip = await head(ws.root)
        if tip is None or tip == ws.base:
            return
        async with self._locked():
            current = await _git("symbolic-ref", "--short", "-q", "HEAD", cwd=self.top)
            if current.stdout.strip() != self.branch:
                raise WorkspaceError(
                    f"the workflow directory is no longer on {self.branch} "
                    f"(now {current.stdout.strip() or 'detached'}): {ws.branch} not merged",
                    "MergeConflict",
                )
            env = _git_env()
            email = await _git("config", "user.email", cwd=self.top)
            if not email.stdout.strip():
                env.update(FALLBACK_IDENTITY)
            out = await _git(
                "merge",
                "--no-edit",
                "-m",
                f"Merge {ws.branch} (jetreduce {self.wf})",
                ws.branch,
                cwd=self.top,
                env=env,
            )
            if out.ok:
                return
            files = await _git("diff", "--name-only", "--diff-filter=U", cwd=self.top)
            await _git("merge", "--abort", cwd=self.top)
        conflicted = ", ".join(files.stdout.split()) if files.ok and files.stdout.strip() else ""
        detail = f"conflicting files: {conflicted}" if conflicted else _why(out)
        raise WorkspaceError(
            f"merge conflict: branch {ws.branch} could not be merged into {self.branch}: {detail}",
            "MergeConflict",
        )

    async def release(self, ws: Workspace, *, merged: bool) -> None:
        """Remove the item's worktree, and its branch unless it holds unmerged commits.
        Never raises: cleanup trouble must not change an item's verdict."""
        if ws.root is None or ws.branch is None or self.top is None:
            return
        try:
            tip = await head(ws.root)
            async with self._locked():
                out = await _git("worktree", "remove", "--force", ws.root, cwd=self.top)
                if not out.ok:
                    log.warning("could not remove worktree %s: %s", ws.root, _why(out))
                if merged or tip is None or tip == ws.base:
                    await _git("branch", "-D", ws.branch, cwd=self.top)
        except Exception as exc:  # cleanup only: report, never fail the item
            log.warning("worktree cleanup of %s failed: %s", ws.root, exc)
