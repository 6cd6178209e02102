"""Where a map item's steps run: the workflow directory, a directory of the agent's own, or
a git worktree per item (``SubmitOptions.workspace``).

Setup and reduce always run in the workflow directory. Map items run in:

``agent`` (the default)
    each map agent — one of the ``max_parallel`` slots — has a working directory of its own,
    made when the slot runs its first item that has steps, and reused by the slot's later
    items (Prodigy makes one per item; a jetreduce agent serves many items, so the cost is
    per slot, not per item).

    * In a git repository on a branch with a commit, it is a **worktree of its own**, on
      branch ``jetreduce-<wf>-a<agent>-<slot>``. After an item succeeds, commits it made are
      merged into the workflow branch (serially, see below); after an item fails, its
      commits are kept on ``jetreduce-<wf>-item_<i>`` for inspection and the worktree is
      reset to where the item started (``checkout -f -B`` + ``clean -fd``), so no failed work
      reaches a later item's merge. A worktree holds committed files only, as Prodigy's do
      (a workflow directory that is not committed at all gets a copy instead).
    * Elsewhere it is a **copy** of the workflow directory (``.git`` and the embedded
      server's data directory, ``.jetreduce`` or another, left out): relative paths keep
      working, and what an item writes stays in its agent's copy, as in a Kubernetes pod.
      Results travel through item outputs (``${map.results}``), as in Prodigy. A directory
      over :data:`COPY_LIMIT_BYTES` or :data:`COPY_LIMIT_FILES` is not copied: the agent
      warns and runs in the workflow directory (``--workspace shared`` says so explicitly).

``item`` (``--worktrees``)
    each item gets a fresh ``git worktree add -B jetreduce-<wf>-item_<i>`` off the workflow
    branch's current tip — Prodigy's isolation, at the price of a checkout per item. The
    workflow directory must be in a git repository, on a branch, with a commit.

``shared``
    every item runs in the workflow directory itself: parallel items share its files.

Merges happen in the workflow directory, **one at a time** across all agents on the host
(an ``flock`` in the repository's git directory). A conflict aborts the merge and fails the
item (:class:`WorkspaceError` with ``error_type="MergeConflict"``). Map completion waits for
every item, so every merge is in before reduce starts.

All git calls go through :func:`~jetreduce.worker.steps.run_process` (bounded, killable);
the per-item HEAD check reads the refs directly (:func:`read_head`), so an agent that makes
no commits spawns no git process per item.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from jetreduce.contract.errors import PermanentError
from jetreduce.worker.steps import StepOutcome, base_env, run_process

__all__ = [
    "COPY_LIMIT_BYTES",
    "COPY_LIMIT_FILES",
    "GIT_TIMEOUT_S",
    "LOCK_WAIT_S",
    "Workspace",
    "WorkspaceError",
    "Workspaces",
    "head",
    "read_head",
]

log = logging.getLogger(__name__)

GIT_TIMEOUT_S: Final = 120.0
"""Bound on one git command (a merge of a large branch included)."""
LOCK_WAIT_S: Final = 600.0
"""Longest wait for the host-wide merge lock: many agents may queue behind one another."""
LOCK_POLL_S: Final = 0.05
LOCK_FILE: Final = "jetreduce-merge.lock"
COPY_LIMIT_BYTES: Final = 64 * 1024 * 1024
"""Largest workflow directory copied for each agent; larger ones are shared (with a warning):
a virtualenv or a build tree copied per slot would cost more than the items."""
COPY_LIMIT_FILES: Final = 10_000
NOT_COPIED: Final = frozenset({".git", ".jetreduce"})
"""Top-level entries an agent's copy leaves out: the repository (a copy's commits would be
lost silently) and the embedded server's default data directory."""
FALLBACK_IDENTITY: Final = {
    "GIT_AUTHOR_NAME": "jetreduce",
    "GIT_AUTHOR_EMAIL": "jetreduce@localhost",
    "GIT_COMMITTER_NAME": "jetreduce",
    "GIT_COMMITTER_EMAIL": "jetreduce@localhost",
}


def _is_data_dir(path: str) -> bool:
    """An embedded server's data directory under another name (``jetreduce run --data-dir
    state``), recognised by its store and lock: a live JetStream store copied into every
    agent's workspace made each run slower than the last, and is no input of any item."""
    for store in (path, os.path.join(path, "nats")):  # `jetreduce server` / `jetreduce run`
        if os.path.isdir(os.path.join(store, "jetstream")) and os.path.isfile(
            os.path.join(store, "lock")
        ):
            return True
    return False


class WorkspaceError(PermanentError):
    """A worktree could not be made, or an item's branch could not be merged."""

    def __init__(self, message: str, error_type: str = "WorktreeError") -> None:
        super().__init__(message)
        self.error_type = error_type


@dataclass
class Workspace:
    path: str
    """Where the item's commands run."""
    root: str | None = None
    """The worktree's top directory (None: not a worktree)."""
    branch: str | None = None
    base: str | None = None
    """The commit HEAD was at when the item started."""
    reused: bool = False
    """An agent's own workspace, handed back to its pool after the item (not removed)."""


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


def read_head(root: str) -> str | None:
    """HEAD of the worktree whose top directory is ``root``, read from the ref files without
    running git; None when the layout is not the plain one (a reftable, a symbolic ref
    chain…): callers then ask :func:`head`."""
    try:
        dotgit = Path(root, ".git")
        if dotgit.is_file():
            text = dotgit.read_text().strip()
            if not text.startswith("gitdir:"):
                return None
            gitdir = Path(root, text.removeprefix("gitdir:").strip())
        else:
            gitdir = dotgit
        value = (gitdir / "HEAD").read_text().strip()
        if not value.startswith("ref:"):
            return value or None
        ref = value.removeprefix("ref:").strip()
        common = gitdir
        if (gitdir / "commondir").is_file():
            common = gitdir / (gitdir / "commondir").read_text().strip()
        for base in (gitdir, common):
            loose = base / ref
            if loose.is_file():
                return loose.read_text().strip() or None
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                sha, _, name = line.partition(" ")
                if name == ref:
                    return sha
    except (OSError, UnicodeDecodeError):
        pass
    return None


async def _head_of(root: str) -> str | None:
    return read_head(root) or await head(root)


def _why(out: StepOutcome) -> str:
    text = (out.stderr or out.stdout or out.error).strip()
    return text[-1000:] if text else f"exit code {out.exit_code}"


class Workspaces:
    """Hands out a :class:`Workspace` per item for one agent process (see the module doc)."""

    def __init__(
        self, workdir: str, workflow_id: str, *, mode: str, scratch: Path, agent: int = 0
    ) -> None:
        self.workdir = workdir
        self.wf = workflow_id
        self.mode = mode
        self.scratch = scratch
        self.agent = agent
        self.kind: str | None = None
        """What ``mode`` became here: ``shared``, ``copy``, ``agent-worktree`` or
        ``item-worktree``; None until :meth:`prepare`."""
        self.top: str | None = None
        self.git_dir: str | None = None
        self.branch: str | None = None
        self.subdir = "."
        self._free: list[Workspace] = []
        self._made: list[Workspace] = []
        self._slots = 0
        self._preparing = asyncio.Lock()

    @property
    def worktrees(self) -> bool:
        return self.kind in ("agent-worktree", "item-worktree")

    async def prepare(self) -> None:
        """Decide where items run. Raises :class:`WorkspaceError` when ``item`` worktrees are
        asked for and the workflow directory cannot give them; ``agent`` falls back to a copy
        (or to the shared directory) instead, saying why in the log."""
        async with self._preparing:  # items starting together decide (and sweep) once
            if self.kind is None:
                await self._decide()

    async def _decide(self) -> None:
        if self.mode == "shared":
            self.kind = "shared"
            return
        problem = await self._find_repository()
        if problem is None:
            self.kind = "item-worktree" if self.mode == "item" else "agent-worktree"
            if self.kind == "agent-worktree":
                await self._forget_predecessor()
            return
        if self.mode == "item":
            raise WorkspaceError(problem)
        too_big = await asyncio.to_thread(self._too_big_to_copy)
        if too_big:
            log.warning(
                "agent workspace: %s; every item of this agent runs in the workflow directory "
                "(--workspace shared says so explicitly)",
                too_big,
            )
            self.kind = "shared"
        else:
            self.kind = "copy"

    async def _find_repository(self) -> str | None:
        """Find the repository and the workflow branch; why worktrees are impossible, if so."""
        top = await _git("rev-parse", "--show-toplevel", cwd=self.workdir)
        if not top.ok:
            return (
                f"--worktrees needs the workflow directory {self.workdir} to be in a git "
                f"repository: {_why(top)}"
            )
        root = top.stdout.strip()
        branch = await _git("symbolic-ref", "--short", "-q", "HEAD", cwd=root)
        if not branch.ok or not branch.stdout.strip():
            return (
                f"--worktrees needs the workflow directory on a branch (HEAD of {root} is "
                "detached): agents' branches are merged into it"
            )
        if await head(root) is None:
            name = branch.stdout.strip()
            return f"--worktrees needs at least one commit on {name} to branch from"
        subdir = os.path.relpath(os.path.realpath(self.workdir), os.path.realpath(root))
        if self.mode == "agent" and subdir != ".":
            tracked = await _git("ls-tree", "-d", "--name-only", "HEAD", "--", subdir, cwd=root)
            if not tracked.stdout.strip():  # a worktree would hold none of its files
                return f"the workflow directory {self.workdir} is not committed in {root}"
        common = await _git("rev-parse", "--path-format=absolute", "--git-common-dir", cwd=root)
        self.top = root
        self.git_dir = common.stdout.strip() if common.ok else os.path.join(root, ".git")
        self.branch = branch.stdout.strip()
        self.subdir = subdir
        return None

    async def _forget_predecessor(self) -> None:
        """Drop the worktrees and slot branches a killed predecessor (same agent index) left:
        its scratch directory is gone (see the agent's start), so ``worktree prune`` forgets
        its worktrees, and its slot branches — whose unmerged commits belong to items that are
        redelivered — are deleted."""
        assert self.top is not None
        mine = f"refs/heads/jetreduce-{self.wf}-a{self.agent}-"
        async with self._locked():
            await _git("worktree", "prune", cwd=self.top)
            # Any worktree still on one of these branches is a predecessor's, whatever is
            # left of its directory: removed, or its branch could not be deleted.
            listing = await _git("worktree", "list", "--porcelain", cwd=self.top)
            path = ""
            for line in listing.stdout.splitlines():
                if line.startswith("worktree "):
                    path = line.removeprefix("worktree ")
                elif line.startswith(f"branch {mine}") and path:
                    await _git("worktree", "remove", "--force", "--force", path, cwd=self.top)
            await _git("worktree", "prune", cwd=self.top)
            refs = await _git("for-each-ref", "--format=%(refname:short)", f"{mine}*", cwd=self.top)
            for branch in refs.stdout.split():
                await _git("branch", "-D", branch, cwd=self.top)

    def _skipped(self, directory: str, names: list[str]) -> set[str]:
        """Entries of ``directory`` an agent's copy leaves out (copytree's ``ignore``)."""
        if os.path.realpath(directory) != os.path.realpath(self.workdir):
            return set()
        skip = {n for n in names if n in NOT_COPIED or _is_data_dir(os.path.join(directory, n))}
        scratch = os.path.relpath(os.path.realpath(self.scratch), os.path.realpath(self.workdir))
        if not scratch.startswith(".."):  # the copies live inside the workflow directory
            skip.add(scratch.split(os.sep)[0])
        return skip

    def _too_big_to_copy(self) -> str | None:
        files = size = 0
        for directory, dirs, names in os.walk(self.workdir):
            skip = self._skipped(directory, [*dirs, *names])
            dirs[:] = [d for d in dirs if d not in skip]
            for name in names:
                if name in skip:
                    continue
                files += 1
                with contextlib.suppress(OSError):
                    size += os.lstat(os.path.join(directory, name)).st_size
                if files > COPY_LIMIT_FILES or size > COPY_LIMIT_BYTES:
                    return (
                        f"the workflow directory {self.workdir} holds more than "
                        f"{COPY_LIMIT_FILES} files or {COPY_LIMIT_BYTES // 2**20} MiB, too much "
                        "to copy for each agent"
                    )
        return None

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

    async def _add_worktree(self, branch: str, root: str) -> str | None:
        """``git worktree add`` of ``branch`` at the workflow branch's tip; the tip."""
        assert self.top is not None and self.branch is not None
        async with self._locked():
            await _git("worktree", "prune", cwd=self.top)
            base = await head(self.top)
            out = await _git(
                "worktree", "add", "-f", "-B", branch, root, base or self.branch, cwd=self.top
            )
        if not out.ok:
            raise WorkspaceError(f"git worktree add {root} failed: {_why(out)}")
        Path(root, self.subdir).mkdir(parents=True, exist_ok=True)
        return base

    async def acquire(self, index: int) -> Workspace:
        """A workspace for item ``index`` (see the module doc for each kind)."""
        await self.prepare()
        if self.kind == "shared":
            return Workspace(path=self.workdir)
        if self.kind == "item-worktree":
            branch = f"jetreduce-{self.wf}-item_{index}"
            root = str(self.scratch / f"worktree-{index}")
            base = await self._add_worktree(branch, root)
            return Workspace(path=str(Path(root, self.subdir)), root=root, branch=branch, base=base)
        if self._free:
            ws = self._free.pop()
        else:
            slot = self._slots  # taken before any await: concurrent items need distinct ones
            self._slots += 1
            ws = await self._make_own(slot)
            self._made.append(ws)
        if ws.root is not None:
            ws.base = await _head_of(ws.root)
        return ws

    async def _make_own(self, slot: int) -> Workspace:
        """A new agent-owned workspace: a worktree on the slot's branch, or a copy."""
        root = str(self.scratch / f"agent-{slot}")
        if self.kind == "agent-worktree":
            branch = f"jetreduce-{self.wf}-a{self.agent}-{slot}"
            await self._add_worktree(branch, root)
            path = str(Path(root, self.subdir))
            return Workspace(path=path, root=root, branch=branch, reused=True)
        try:
            await asyncio.to_thread(
                shutil.copytree, self.workdir, root, symlinks=True, ignore=self._skipped
            )
        except (OSError, shutil.Error) as exc:
            raise WorkspaceError(f"could not copy the workflow directory: {exc}") from exc
        return Workspace(path=root, reused=True)

    async def merge(self, ws: Workspace) -> None:
        """Merge the item's branch into the workflow branch (serially). A branch without new
        commits is not merged. Raises :class:`WorkspaceError` (``MergeConflict``)."""
        if ws.root is None or ws.branch is None:
            return
        assert self.top is not None
        tip = await _head_of(ws.root)
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
                tip,
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

    async def release(self, ws: Workspace, *, merged: bool, index: int) -> None:
        """After an item (``merged``: it succeeded, its commits merged): an item worktree is
        removed (its branch too, unless it holds unmerged commits); an agent's own worktree
        is reset if the item failed, its commits kept on the item's branch. Never raises:
        cleanup trouble must not change an item's verdict (a workspace that cannot be reset
        is dropped, not reused)."""
        if not ws.reused:
            await self._remove_item_worktree(ws, merged=merged)
            return
        try:
            if ws.root is not None and not merged:
                tip = await _head_of(ws.root)
                if tip != ws.base or not await self._clean(ws):
                    await self._reset(ws, tip, index)
        except Exception as exc:  # cleanup only: report, never fail the item
            log.warning("could not reset workspace %s, dropping it: %s", ws.root, exc)
            self._made.remove(ws)
            await self._discard(ws)
            return
        self._free.append(ws)

    async def _clean(self, ws: Workspace) -> bool:
        """Whether a failed item left the worktree as it found it (a failure is rare: one git
        call to find out is cheap)."""
        assert ws.root is not None
        out = await _git("status", "--porcelain", cwd=ws.root)
        return out.ok and not out.stdout.strip()

    async def _reset(self, ws: Workspace, tip: str | None, index: int) -> None:
        """Keep a failed item's commits on its own branch, and put the worktree back."""
        assert ws.root is not None and ws.base is not None
        if tip is not None and tip != ws.base:
            keep = f"jetreduce-{self.wf}-item_{index}"
            await _git("branch", "-f", keep, tip, cwd=ws.root)
            log.warning("item %d failed after committing: its commits are on %s", index, keep)
        assert ws.branch is not None  # back on the slot's branch, even if the item left it
        for args in (("checkout", "-q", "-f", "-B", ws.branch, ws.base), ("clean", "-q", "-fd")):
            out = await _git(*args, cwd=ws.root)
            if not out.ok:
                raise WorkspaceError(f"git {args[0]} failed: {_why(out)}")

    async def _remove_item_worktree(self, ws: Workspace, *, merged: bool) -> None:
        if ws.root is None or ws.branch is None or self.top is None:
            return
        try:
            tip = await _head_of(ws.root)
            async with self._locked():
                out = await _git("worktree", "remove", "--force", ws.root, cwd=self.top)
                if not out.ok:
                    log.warning("could not remove worktree %s: %s", ws.root, _why(out))
                if merged or tip is None or tip == ws.base:
                    await _git("branch", "-D", ws.branch, cwd=self.top)
        except Exception as exc:  # cleanup only: report, never fail the item
            log.warning("worktree cleanup of %s failed: %s", ws.root, exc)

    async def _discard(self, ws: Workspace) -> None:
        """Remove an agent-owned workspace (and its branch: every success was merged, every
        failure's commits were kept on the item's branch)."""
        try:
            if ws.branch is not None and self.top is not None:
                async with self._locked():
                    out = await _git("worktree", "remove", "--force", str(ws.root), cwd=self.top)
                    if not out.ok:  # remove what git would not, then make it forget it
                        log.warning("git worktree remove %s: %s", ws.root, _why(out))
                        await asyncio.to_thread(shutil.rmtree, str(ws.root), True)
                        await _git("worktree", "prune", cwd=self.top)
                    out = await _git("branch", "-D", ws.branch, cwd=self.top)
                    if not out.ok:
                        log.warning("git branch -D %s: %s", ws.branch, _why(out))
            else:  # a copy
                await asyncio.to_thread(shutil.rmtree, ws.path, True)
        except Exception as exc:  # cleanup only
            log.warning("could not remove workspace %s: %s", ws.root or ws.path, exc)

    async def close(self) -> None:
        """Remove the agent's own workspaces (at the agent's end). Never raises."""
        made, self._made, self._free = self._made, [], []
        for ws in made:
            await self._discard(ws)
