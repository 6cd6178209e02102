"""The options of ``run`` and ``submit`` that describe how a workflow runs (arguments,
profile, workspace, queue, backend), and their checks: refused with exit 2 before anything
is submitted, since the services would only fail the workflow later."""

from __future__ import annotations

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
    workflow: Workflow,
    used: dict[str, str],
    *,
    workdir: Path | None,
    max_parallel: int | None,
    priority: str,
    max_attempts: int | None,
    timeout: float | None,
    args: list[str] | None,
    profile: str | None,
    worktrees: bool,
    workspace: str | None,
    queue: str | None,
    backend: str,
    namespace: str | None,
    image: str | None,
    lease: float | None = None,
) -> tuple[SubmitOptions, Path | None]:
    """The options ``run`` and ``submit`` both submit a workflow with (one place, so an
    option one of them takes reaches the services as the other's does), and the map input
    file to upload with it, if any. ``used``: the ``$VAR`` values the file referenced."""
    where = (workdir or Path.cwd()).resolve()
    pods = backend == "kubernetes"
    # Pods share nothing with this disk: their working directory is their own, and the
    # input file travels through the object store. A local installation reads it in place.
    upload = input_file(workflow, where, args or [], profile) if pods else None
    options = SubmitOptions(
        workdir=None if pods else str(where),
        max_parallel=max_parallel,
        priority=priority,
        vars=used,
        max_attempts=max_attempts,
        timeout_s=timeout,
        lease_s=lease,
        args=args or [],
        profile=profile,
        workspace=workspace_kind(workspace, worktrees),
        queue=queue,
        backend=backend,
        namespace=namespace,
        image=image,
        input_upload=upload is not None,
    )
    return options, upload
