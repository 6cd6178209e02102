"""The options of ``run`` and ``submit`` that describe how a workflow runs (parallelism,
attempts, arguments, profile, workspace, queue, backend), declared once (:class:`SubmitArgs`)
and turned into the ``SubmitOptions`` both submit in one place (:func:`submit_options`), and
their checks: refused with exit 2 before anything is submitted, since the services would only
fail the workflow later."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from jetreduce.cli import exit_codes
from jetreduce.cli.context import fail
from jetreduce.cli.upload import input_file
from jetreduce.contract.events import WORKSPACES, SubmitOptions
from jetreduce.contract.workflow import Workflow

__all__ = [
    "ArgsOption",
    "Backend",
    "Image",
    "Namespace",
    "ProfileOption",
    "QueueOption",
    "SubmitArgs",
    "TimeoutOption",
    "WorkspaceOption",
    "WorktreesOption",
    "check_backend",
    "check_profile",
    "check_queue",
    "submit_options",
    "workspace_kind",
]

TimeoutOption = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        help="Give up after this many seconds: the workflow ends as timed out.",
    ),
]
ArgsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--args",
        metavar="<word>...",
        help="Positional arguments for the workflow ($1, ${ARG_1}, env ARG_1): --args a b, "
        "after the workflow file.",
    ),
]
ProfileOption = Annotated[
    str | None, typer.Option("--profile", help="Activate the workflow's profiles.NAME.")
]
WorktreesOption = Annotated[
    bool,
    typer.Option(
        "--worktrees",
        help="Same as --workspace item: a git worktree per item, successful items merged.",
    ),
]
WorkspaceOption = Annotated[
    str | None,
    typer.Option(
        "--workspace",
        help="Where map items run. agent (default): each agent has a directory of its own, "
        "a git worktree (commits merged into the workflow branch) in a repository, else a "
        "copy of the workflow directory. item: a git worktree per item. shared: the "
        "workflow directory itself. Setup and reduce always run in the workflow directory.",
    ),
]
QueueOption = Annotated[
    str | None,
    typer.Option(
        "--queue",
        help="Where the items travel: jetstream, redis://host:port/db or "
        "sqs://QUEUE?region=R&endpoint=URL (default: the installation's, else jetstream). "
        "No password in the URL: give it through JETREDUCE_REDIS_PASSWORD or the AWS chain.",
    ),
]
Backend = Annotated[
    str,
    typer.Option(
        "--backend", envvar="JETREDUCE_BACKEND", help="Where agents run: local or kubernetes."
    ),
]
Namespace = Annotated[
    str | None,
    typer.Option("--namespace", envvar="JETREDUCE_K8S_NAMESPACE", help="Namespace of agent Jobs."),
]
Image = Annotated[
    str | None,
    typer.Option("--image", envvar="JETREDUCE_K8S_IMAGE", help="Agent image (kubernetes)."),
]
MaxParallel = Annotated[
    int | None, typer.Option("--max-parallel", "-j", min=1, help="Override map.max_parallel.")
]
Workdir = Annotated[
    Path | None, typer.Option("--workdir", help="Where commands run (default: here).")
]
MaxAttempts = Annotated[
    int | None, typer.Option("--max-attempts", min=1, help="Attempts per item.")
]
Priority = Annotated[str, typer.Option("--priority", help="high, normal or low.")]


@dataclass(frozen=True)
class SubmitArgs:
    """The options ``run`` and ``submit`` both take to say how the workflow runs (typer
    fills them: see ``cli/option_group.py``); :func:`submit_options` makes them the
    workflow's ``SubmitOptions``."""

    max_parallel: MaxParallel = None
    priority: Priority = "normal"
    workdir: Workdir = None
    max_attempts: MaxAttempts = None
    timeout: TimeoutOption = None
    args: ArgsOption = None
    profile: ProfileOption = None
    worktrees: WorktreesOption = False
    workspace: WorkspaceOption = None
    queue: QueueOption = None
    backend: Backend = "local"
    namespace: Namespace = None
    image: Image = None

    @property
    def workspace_kind(self) -> str:
        return workspace_kind(self.workspace, self.worktrees)

    def check_backend(self) -> None:
        check_backend(self.backend, self.namespace, self.image)


def workspace_kind(workspace: str | None, worktrees: bool) -> str:
    """``--workspace``, with ``--worktrees`` as its older spelling of ``item``."""
    if workspace is not None and workspace not in WORKSPACES:
        raise fail(
            f"unknown --workspace {workspace!r}: one of {', '.join(WORKSPACES)}", exit_codes.USAGE
        )
    if worktrees and workspace not in (None, "item"):
        raise fail(f"--worktrees contradicts --workspace {workspace}", exit_codes.USAGE)
    return "item" if worktrees else workspace or "agent"


def check_backend(backend: str, namespace: str | None, image: str | None) -> None:
    """``--namespace``/``--image`` say where and how pods run: without ``--backend
    kubernetes`` they would be silently ignored, so they are refused."""
    if backend not in ("local", "kubernetes"):
        raise fail(f"unknown --backend {backend!r}: local or kubernetes", exit_codes.USAGE)
    if backend != "kubernetes" and (namespace or image):
        raise fail("--namespace and --image need --backend kubernetes", exit_codes.USAGE)


def check_queue(url: str | None) -> None:
    from jetreduce.queues.factory import validate_queue_url

    problem = validate_queue_url(url)
    if problem is not None:
        raise fail(problem, exit_codes.USAGE)


def check_profile(workflow: Any, profile: str | None) -> None:
    """Refuse an unknown ``--profile`` before anything is submitted (agents would fail)."""
    if profile is None:
        return
    profiles = workflow.profiles
    if profile not in profiles:
        names = ", ".join(sorted(profiles)) or "none"
        raise fail(f"profile {profile!r} is not defined (defined: {names})", exit_codes.USAGE)


def submit_options(
    workflow: Workflow, used: dict[str, str], how: SubmitArgs, *, lease: float | None = None
) -> tuple[SubmitOptions, Path | None]:
    """The options ``run`` and ``submit`` both submit a workflow with (one place, so an
    option one of them takes reaches the services as the other's does), and the map input
    file to upload with it, if any. ``used``: the ``$VAR`` values the file referenced."""
    where = (how.workdir or Path.cwd()).resolve()
    pods = how.backend == "kubernetes"
    # Pods share nothing with this disk: their working directory is their own, and the
    # input file travels through the object store. A local installation reads it in place.
    upload = input_file(workflow, where, how.args or [], how.profile) if pods else None
    options = SubmitOptions(
        workdir=None if pods else str(where),
        max_parallel=how.max_parallel,
        priority=how.priority,
        vars=used,
        max_attempts=how.max_attempts,
        timeout_s=how.timeout,
        lease_s=lease,
        args=how.args or [],
        profile=how.profile,
        workspace=how.workspace_kind,
        queue=how.queue,
        backend=how.backend,
        namespace=how.namespace,
        image=how.image,
        input_upload=upload is not None,
    )
    return options, upload
