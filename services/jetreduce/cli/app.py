"""jetreduce: run Prodigy-format MapReduce workflows on NATS JetStream.

Exit codes: 0 success · 1 workflow failed / cancelled / timed out · 2 invalid arguments or
workflow file · 3 completed but some items failed permanently (see ``jetreduce dlq``) ·
4 NATS unreachable · 130 interrupted (SIGINT) · 143 terminated (SIGTERM).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import msgspec
import typer
from typer.core import TyperOption

from jetreduce import __version__
from jetreduce.cli import context, exit_codes, workflow_file
from jetreduce.cli.context import fail
from jetreduce.cli.dlq import build as build_dlq
from jetreduce.cli.host import SERVICE_NAMES, ServiceHost
from jetreduce.cli.item_logs import register as register_logs
from jetreduce.cli.k8s_settings import kubernetes_settings
from jetreduce.cli.local_run import DEFAULT_DATA_DIR, busy_message, run_here
from jetreduce.cli.logs import configure
from jetreduce.cli.options import (
    Creds,
    Nats,
    NkeySeed,
    Password,
    Prefix,
    TlsCa,
    TlsCert,
    TlsKey,
    Token,
    User,
)
from jetreduce.cli.options import (
    settings as make_settings,
)
from jetreduce.cli.outcome import show_outcome, terminal_code
from jetreduce.cli.roles import agent_settings
from jetreduce.cli.roles import register as register_roles
from jetreduce.cli.session import run_connected
from jetreduce.cli.signals import Signals, block_until_signalled
from jetreduce.cli.submit import (
    SubmitRejected,
    format_problems,
)
from jetreduce.cli.text import printable
from jetreduce.cli.upload import input_file, submit_with_upload
from jetreduce.cli.watch import Watcher, describe
from jetreduce.contract import events as ev
from jetreduce.contract.events import WORKSPACES, SubmitOptions
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.runtime import telemetry
from jetreduce.runtime.connection import ConnectFailed
from jetreduce.runtime.state import StateStore

app = typer.Typer(
    name="jetreduce",
    help=__doc__,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
services_app = typer.Typer(
    help="Run the orchestrator's services.", no_args_is_help=True, rich_markup_mode="markdown"
)


def _no_placeholder_for_flags() -> None:
    """Typer shows a ``<bool>`` type after every flag, as if it took a value: a flag takes
    none, so it shows none (the one place this is decided for every command)."""
    shown = TyperOption.display_type_rich

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_no_placeholder_for_flags()
app.add_typer(services_app, name="services")


def _version(shown: bool) -> None:
    if shown:
        typer.echo(f"jetreduce {__version__}")
        raise typer.Exit(exit_codes.OK)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    nats: Nats = None,
    creds: Creds = None,
    nkey: NkeySeed = None,
    user: User = None,
    password: Password = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    prefix: Prefix = None,
    log_level: Annotated[
        str | None, typer.Option("--log-level", envvar="JETREDUCE_LOG_LEVEL")
    ] = None,
    log_format: Annotated[
        str | None,
        typer.Option(
            "--log-format",
            envvar="JETREDUCE_LOG_FORMAT",
            help="text, or json: one object per line with workflow and item ids.",
        ),
    ] = None,
) -> None:
    """Connection options given here apply to every command; `--nats` on a command wins."""
    try:
        configure(log_level, log_format)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--log-format") from None
    # Tracing/metrics as the OTEL_* variables say (nothing without them); `service` and
    # `worker` configure again under their own service name. Spans are flushed at exit.
    telemetry.configure("jetreduce-cli")
    atexit.register(telemetry.shutdown)
    context.Global.settings = make_settings(
        nats, creds, nkey, user, password, token, tls_ca, tls_cert, tls_key, prefix
    )
    context.Global.url_given = nats is not None


# -- run ----------------------------------------------------------------------------------------
DRY_RUN_INPUT_TIMEOUT_S = 60.0
DRY_RUN_SHOWN_ITEMS = 5

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


_WORKSPACE_WORDS = {
    "agent": "a directory of each agent's own (a git worktree in a repository, else a copy)",
    "item": "a git worktree per item",
    "shared": "the workflow directory itself",
}


def _workspace(workspace: str | None, worktrees: bool) -> str:
    """``--workspace``, with ``--worktrees`` as its older spelling of ``item``."""
    if workspace is not None and workspace not in WORKSPACES:
        raise fail(
            f"unknown --workspace {workspace!r}: one of {', '.join(WORKSPACES)}", exit_codes.USAGE
        )
    if worktrees and workspace not in (None, "item"):
        raise fail(f"--worktrees contradicts --workspace {workspace}", exit_codes.USAGE)
    return "item" if worktrees else workspace or "agent"


def _check_backend(backend: str, namespace: str | None, image: str | None) -> None:
    """``--namespace``/``--image`` say where and how pods run: without ``--backend
    kubernetes`` they would be silently ignored, so they are refused."""
    if backend not in ("local", "kubernetes"):
        raise fail(f"unknown --backend {backend!r}: local or kubernetes", exit_codes.USAGE)
    if backend != "kubernetes" and (namespace or image):
        raise fail("--namespace and --image need --backend kubernetes", exit_codes.USAGE)


def _check_queue(url: str | None) -> None:
    from jetreduce.queues.factory import validate_queue_url

    problem = validate_queue_url(url)
    if problem is not None:
        raise fail(problem, exit_codes.USAGE)


def _check_profile(workflow: Any, profile: str | None) -> None:
    """Refuse an unknown ``--profile`` before anything is submitted (agents would fail)."""
    if profile is None:
        return
    profiles = workflow.profiles
    if profile not in profiles:
        names = ", ".join(sorted(profiles)) or "none"
        raise fail(f"profile {profile!r} is not defined (defined: {names})", exit_codes.USAGE)


def _dry_run(
    workflow: Any,
    path: Path,
    workdir: Path,
    max_parallel: int | None,
    args: list[str],
    workspace: str,
    profile: str | None,
) -> int:
    """Print what a run would do. Runs no step; only the map input is resolved (the file
    read, or the input command run in the workflow directory) to count the items."""
    from jetreduce.lang.pipeline import PipelineError, parse_input_document, run_pipeline
    from jetreduce.worker.secrets import EnvironmentProblem

    m = workflow.map
    setup_steps = len(workflow.setup.steps) if workflow.setup else 0
    reduce_steps = len(workflow.reduce.steps) if workflow.reduce else 0
    typer.echo(f"[DRY RUN] MapReduce workflow {workflow.name!r} ({path})")
    typer.echo(f"  workflow directory: {workdir}")
    typer.echo(f"  map items run in: {_WORKSPACE_WORDS[workspace]}")
    typer.echo(f"  setup:  {setup_steps} step(s)" if setup_steps else "  setup:  none")
    typer.echo(f"  map:    {len(m.agent_template)} step(s) per item, input {m.input!r}")
    typer.echo(f"  reduce: {reduce_steps} step(s)" if reduce_steps else "  reduce: none")
    wanted = max_parallel or m.max_parallel
    items: list[Any] | None = None
    try:
        data, is_command = _dry_run_input(workflow, workdir, args, profile)
        if data is not None:
            doc = parse_input_document(data, lenient_lines=is_command)
            items = run_pipeline(
                doc,
                json_path=m.json_path,
                filter=m.filter,
                sort_by=m.sort_by,
                distinct=m.distinct,
                offset=m.offset,
                max_items=m.max_items,
            )
    except (
        PipelineError,
        EnvironmentProblem,
        OSError,
        subprocess.SubprocessError,
        ValueError,
    ) as exc:
        typer.echo(f"  items:  unknown ({exc})")
    if items is None:
        typer.echo(f"  parallelism: up to {wanted}")
    else:
        typer.echo(f"  items:  {len(items)} items")
        for n, item in enumerate(items[:DRY_RUN_SHOWN_ITEMS]):
            shown = json.dumps(item, separators=(",", ":"))
            typer.echo(f"    item_{n}: {shown[:200]}")
        if len(items) > DRY_RUN_SHOWN_ITEMS:
            typer.echo(f"    … and {len(items) - DRY_RUN_SHOWN_ITEMS} more")
        typer.echo(f"  parallelism: {min(wanted, len(items))} (max_parallel {wanted})")
    typer.echo("[DRY RUN] nothing was executed")
    return exit_codes.OK


def _dry_run_input(
    workflow: Any, workdir: Path, args: list[str], profile: str | None
) -> tuple[bytes | None, bool]:
    """The map input's bytes: the file, or the input command's stdout. None (with a note
    printed) when setup has to create it first. Resolved as the setup agent resolves it
    (`lang.map_input`, with the agent's variables short of the secrets), so the dry run
    counts what the run will see."""
    from jetreduce.lang.map_input import INPUT_COMMAND_TIMEOUT_S, input_command, input_file
    from jetreduce.worker.secrets import resolve_environment

    resolved = resolve_environment(
        workflow, args=args, profile=profile, base_dir=workdir, with_secrets=False
    )
    source = workflow.map.input
    path = input_file(source, resolved.variables, workdir)
    if path is not None:
        return path.read_bytes(), False
    if workflow.setup and workflow.setup.steps:
        typer.echo("  items:  counted after setup runs (setup may create the input)")
        return None, False
    cmd = input_command(source, resolved.variables)
    out = subprocess.run(
        cmd.argv,
        cwd=workdir,
        env={**os.environ, **resolved.env, **cmd.env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=min(DRY_RUN_INPUT_TIMEOUT_S, INPUT_COMMAND_TIMEOUT_S),
        check=False,
    )
    if out.returncode != 0:
        raise ValueError(
            f"map.input {source!r} is neither a file nor a command that succeeded (as a "
            f"command it exited with code {out.returncode}: "
            f"{out.stderr.decode(errors='replace').strip()[-300:]})"
        )
    return out.stdout, True


@app.command()
def run(
    workflow: Annotated[Path, typer.Argument(help="Workflow YAML file (Prodigy MapReduce).")],
    max_parallel: Annotated[
        int | None, typer.Option("--max-parallel", "-j", min=1, help="Override map.max_parallel.")
    ] = None,
    nats: Nats = None,
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="Embedded server's store and agent logs.")
    ] = Path(DEFAULT_DATA_DIR),
    workdir: Annotated[
        Path | None, typer.Option("--workdir", help="Where commands run (default: here).")
    ] = None,
    max_attempts: Annotated[
        int | None, typer.Option("--max-attempts", min=1, help="Attempts per item.")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Give up after this many seconds.")
    ] = None,
    workflow_id: Annotated[str | None, typer.Option("--id", help="Workflow id.")] = None,
    lease: Annotated[
        float | None,
        typer.Option(
            "--lease",
            min=1,
            help="Seconds an item's lease lasts unless its agent renews it (default 30): "
            "how soon items a killed run had in flight run again on resume.",
        ),
    ] = None,
    quiet: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="Print only the reduce output and errors."),
    ] = False,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="With --id: continue that workflow if it exists."),
    ] = False,
    args: ArgsOption = None,
    profile: ProfileOption = None,
    worktrees: WorktreesOption = False,
    workspace: WorkspaceOption = None,
    queue: QueueOption = None,
    priority: Annotated[str, typer.Option(help="high, normal or low.")] = "normal",
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the plan (phases, items, parallelism); run no step."),
    ] = False,
    backend: Backend = "local",
    namespace: Namespace = None,
    image: Image = None,
) -> None:
    """Run a workflow here: embedded nats-server, the services in this process, agents as
    child processes (or, with --backend kubernetes, as Jobs in --namespace with --image; the
    map input file is uploaded, since pods do not see this disk). Prints the reduce output
    and a summary. Ctrl-C stops it and keeps the workflow resumable (it prints the resume
    command); `jetreduce cancel` ends a workflow for good."""
    _check_backend(backend, namespace, image)
    if resume and workflow_id is None:
        raise fail("--resume needs --id ID (the workflow to continue)", exit_codes.USAGE)
    text, result, used = workflow_file.load(workflow)
    _check_profile(result.workflow, profile)
    if dry_run:
        where = (workdir or Path.cwd()).resolve()
        plan = _dry_run(
            result.workflow,
            workflow,
            where,
            max_parallel,
            args or [],
            _workspace(workspace, worktrees),
            profile,
        )
        raise typer.Exit(plan)
    _check_queue(queue)
    wf = workflow_file.workflow_id(result, workflow_id)
    where = (workdir or Path.cwd()).resolve()
    pods = backend == "kubernetes"
    # Pods share nothing with this disk: their working directory is their own, and the
    # input file travels through the object store.
    upload = input_file(result.workflow, where, args or []) if pods else None
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
        workspace=_workspace(workspace, worktrees),
        queue=queue,
        backend=backend,
        namespace=namespace,
        image=image,
        input_upload=upload is not None,
    )
    k8s = None
    if pods:
        k8s = kubernetes_settings(namespace, image, [])
        if nats is None:
            typer.echo(
                "note: agent pods reach the embedded nats-server on this host's loopback "
                "address; on a real cluster use --nats with an address pods can reach",
                err=True,
            )
    code = asyncio.run(
        run_here(
            text,
            str(workflow),
            wf,
            options,
            context.settings(nats),
            nats,
            data_dir,
            quiet,
            resume=resume,
            backend=backend,
            k8s=k8s,
            upload=upload,
        )
    )
    raise typer.Exit(code)


@app.command("resume")
def resume_cmd(
    workflow_id: Annotated[str, typer.Argument(help="Workflow id.")],
    nats: Nats = None,
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="The data dir of the interrupted run.")
    ] = Path(DEFAULT_DATA_DIR),
    quiet: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="Print only the reduce output and errors."),
    ] = False,
) -> None:
    """Continue a workflow whose `jetreduce run` was interrupted or killed: from JetStream
    state, running only items that are not terminal yet. A cancelled, failed or timed-out
    workflow cannot be resumed (exit 2, with the reason); a completed one's outcome is shown."""
    code = asyncio.run(
        run_here(
            None,
            "",
            workflow_id,
            SubmitOptions(),
            context.settings(nats),
            nats,
            data_dir,
            quiet,
            resume=True,
        )
    )
    raise typer.Exit(code)


async def _cancel(nc: Any, subjects: Subjects, wf: str, reason: str) -> None:
    js = nc.jetstream()
    await js.publish(
        subjects.workflow("cancel", wf),
        ev.encode(ev.WorkflowCancelRequested(workflow_id=wf, reason=reason)),
    )


# -- submit / watch / status / list / cancel ----------------------------------------------------
@app.command("submit")
def submit_cmd(
    workflow: Annotated[Path, typer.Argument(help="Workflow YAML file.")],
    nats: Nats = None,
    max_parallel: Annotated[int | None, typer.Option("--max-parallel", "-j", min=1)] = None,
    priority: Annotated[str, typer.Option(help="high, normal or low.")] = "normal",
    workdir: Annotated[Path | None, typer.Option(help="Where commands run.")] = None,
    max_attempts: Annotated[int | None, typer.Option("--max-attempts", min=1)] = None,
    workflow_id: Annotated[str | None, typer.Option("--id", help="Workflow id.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow it until it ends.")] = False,
    args: ArgsOption = None,
    profile: ProfileOption = None,
    worktrees: WorktreesOption = False,
    workspace: WorkspaceOption = None,
    queue: QueueOption = None,
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            envvar="JETREDUCE_BACKEND",
            help="The backend the workflow needs: local or kubernetes. The installation's "
            "launcher fails a workflow that asks for a backend it does not run.",
        ),
    ] = "local",
    namespace: Namespace = None,
    image: Image = None,
) -> None:
    """Submit a workflow to running services; prints its id (stdout). The map input file,
    if it is one here, is uploaded too: agents elsewhere (pods) read it from there."""
    _check_backend(backend, namespace, image)
    text, result, used = workflow_file.load(workflow)
    _check_profile(result.workflow, profile)
    _check_queue(queue)
    wf = workflow_file.workflow_id(result, workflow_id)
    where = (workdir or Path.cwd()).resolve()
    pods = backend == "kubernetes"
    # Only pods lack the submitter's disk; a local installation reads the file in place.
    upload = input_file(result.workflow, where, args or []) if pods else None
    options = SubmitOptions(
        # A pod's working directory is its own: this one means nothing there.
        workdir=None if pods else str(where),
        backend=backend,
        namespace=namespace,
        image=image,
        input_upload=upload is not None,
        max_parallel=max_parallel,
        priority=priority,
        vars=used,
        max_attempts=max_attempts,
        args=args or [],
        profile=profile,
        workspace=_workspace(workspace, worktrees),
        queue=queue,
    )

    async def go(nc: Any, subjects: Subjects) -> int:
        watcher = Watcher(nc, subjects, wf)
        if wait:
            await watcher.start()
        try:
            await submit_with_upload(
                nc, subjects, text, options, workflow_id=wf, source=str(workflow), upload=upload
            )
        except SubmitRejected as exc:
            typer.echo(format_problems(exc), err=True)
            return exit_codes.USAGE
        except TimeoutError as exc:
            typer.echo(str(exc), err=True)
            return exit_codes.FAILED
        typer.echo(wf)
        if not wait:
            return exit_codes.OK
        event = await watcher.until_done()
        await show_outcome(nc, subjects, event)
        return terminal_code(event)

    run_connected(context.target(nats), go)


@app.command()
def watch(
    workflow_id: Annotated[str, typer.Argument(help="Workflow id.")],
    nats: Nats = None,
    items: Annotated[bool, typer.Option("--items", help="Show every finished item too.")] = False,
) -> None:
    """Follow a workflow's events, from its first, and its progress until it ends."""

    async def go(nc: Any, subjects: Subjects) -> int:
        watcher = Watcher(nc, subjects, workflow_id, show_items=items, from_start=True)
        event = await watcher.until_done()
        await show_outcome(nc, subjects, event)
        return terminal_code(event)

    run_connected(context.target(nats), go)


@app.command()
def status(
    workflow_id: Annotated[str | None, typer.Argument(help="Workflow id (all if omitted).")] = None,
    nats: Nats = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show a workflow's phase and counts (or every workflow's)."""

    async def go(nc: Any, subjects: Subjects) -> int:
        js = nc.jetstream()
        await declare(js, subjects)
        state = StateStore(js, subjects)
        if workflow_id is None:
            records = await state.list()
        else:
            record = await state.get(workflow_id)
            if record is None:
                typer.echo(f"no workflow {workflow_id}", err=True)
                return exit_codes.FAILED
            records = [record]
        for rec in records:
            progress = await _last_progress(js, subjects, rec.workflow_id)
            if as_json:
                body = msgspec.to_builtins(rec)
                body.pop("reduce_output", None)
                if progress is not None:
                    body["progress"] = msgspec.to_builtins(progress)
                    if rec.phase.terminal:
                        body["progress"]["eta_s"] = None
                typer.echo(json.dumps(body))
            else:
                line = (
                    f"{rec.workflow_id}  {rec.phase.value:<10} {printable(rec.name)}  "
                    f"total={rec.total if rec.total is not None else '?'}"
                )
                if progress is not None and rec.phase.terminal:
                    # Its last progress is history: counts, but no rate or ETA.
                    line += f"  done={progress.done} failed={progress.dead}"
                elif progress is not None:
                    line += f"  {describe(progress)}"
                elif rec.total is not None:
                    line += f"  done={rec.done} failed={rec.dead}"
                if rec.reason:
                    line += f"  reason: {printable(rec.reason)}"
                typer.echo(line)
        return exit_codes.OK

    run_connected(context.query_target(nats), go)


async def _last_progress(js: Any, subjects: Subjects, wf: str) -> ev.Progress | None:
    with contextlib.suppress(Exception):
        msg = await js.get_last_msg(subjects.progress_stream, subjects.progress(wf))
        event = ev.decode(msg.data)
        if isinstance(event, ev.Progress):
            return event
    return None


@app.command("list")
def list_cmd(nats: Nats = None) -> None:
    """List workflows (id, phase, name, counts), oldest first."""
    status(None, nats, False)


@app.command()
def cancel(
    workflow_id: Annotated[str, typer.Argument(help="Workflow id.")],
    nats: Nats = None,
    reason: Annotated[
        str, typer.Option(help="Recorded in workflow.cancelled.")
    ] = "cancelled by user",
) -> None:
    """Cancel a workflow: dispatch stops, agents stop, queued items are purged."""

    async def go(nc: Any, subjects: Subjects) -> int:
        watcher = Watcher(nc, subjects, workflow_id, show_events=False)
        await watcher.start()
        await _cancel(nc, subjects, workflow_id, reason)
        try:
            event = await watcher.until_done(timeout_s=10)
        except TimeoutError:
            typer.echo(f"no confirmation within 10s for {workflow_id}", err=True)
            return exit_codes.FAILED
        await show_outcome(nc, subjects, event)
        return exit_codes.OK

    run_connected(context.target(nats), go)


# -- services, agents, server -------------------------------------------------------------------
StreamReplicas = Annotated[
    int,
    typer.Option(
        "--stream-replicas",
        envvar="JETREDUCE_STREAM_REPLICAS",
        min=1,
        help="Replicas of streams and buckets (3 on a production cluster).",
    ),
]
DefaultQueue = Annotated[
    str | None,
    typer.Option(
        "--queue",
        envvar="JETREDUCE_QUEUE",
        help="The installation's item queue for workflows that name none (planner): "
        "jetstream, redis://host:port/db or sqs://QUEUE?region=R&endpoint=URL.",
    ),
]
MaxSlots = Annotated[
    int | None,
    typer.Option(
        "--max-slots",
        envvar="JETREDUCE_MAX_SLOTS",
        min=1,
        help="Map agent slots of all workflows together (launcher). Workflows beyond it wait "
        "and start by --priority (high, normal, low; FIFO within one; a long wait lifts a "
        "workflow a lane). Default: no limit.",
    ),
]
WorkflowNamespaces = Annotated[
    list[str] | None,
    typer.Option(
        "--workflow-namespace",
        envvar="JETREDUCE_K8S_WORKFLOW_NAMESPACES",
        help="Another namespace workflows may ask for with --namespace (kubernetes; repeat "
        "it, or list them space-separated in the variable). The launcher's and janitor's "
        "Role must exist there too.",
    ),
]
AgentEnv = Annotated[
    Path | None,
    typer.Option(
        "--agent-env",
        envvar="JETREDUCE_AGENT_ENV",
        help="A file of JETREDUCE_NATS_* lines (as `jetreduce server --roles` writes "
        "agents.env) giving local agents a NATS identity of their own instead of the "
        "services' (launcher, local backend; on Kubernetes: the agents' "
        "nats.credentialsSecret setting).",
    ),
]
MetricsPort = Annotated[
    int | None,
    typer.Option(
        "--metrics-port",
        envvar="JETREDUCE_METRICS_PORT",
        min=0,
        max=65535,
        help="Serve Prometheus /metrics on this port (all interfaces; 9464 by convention). "
        "Default: off.",
    ),
]


def _serve(
    names: tuple[str, ...],
    nats: str | None,
    log_dir: Path | None,
    backend: str,
    k8s: KubernetesSettings,
    replicas: int = 1,
    *,
    max_slots: int | None = None,
    default_queue: str | None = None,
    metrics_port: int | None = None,
    agent_env: Path | None = None,
) -> int:
    from jetreduce.contract.topology import TopologySettings

    service_name = f"jetreduce-{names[0]}" if len(names) == 1 else "jetreduce-services"
    config = telemetry.configure(service_name, prometheus=metrics_port is not None)
    if metrics_port is None:
        metrics_port = config.prometheus_port  # OTEL_METRICS_EXPORTER=prometheus

    async def go() -> int:
        settings = context.settings(nats)
        try:
            agents = agent_settings(settings, agent_env)
        except OSError as exc:
            typer.echo(f"cannot read --agent-env {agent_env}: {exc.strerror or exc}", err=True)
            return exit_codes.USAGE
        try:
            host = ServiceHost(
                settings,
                names,
                agents=agents,
                log_dir=log_dir,
                backend=backend,
                k8s=k8s,
                topology=TopologySettings(replicas=replicas),
                max_slots=max_slots,
                default_queue=default_queue,
                metrics_port=metrics_port,
            )
        except ValueError as exc:
            typer.echo(str(exc), err=True)
            return exit_codes.USAGE
        # Until the services run, a signal cancels whatever is being waited for (the
        # first connection); from then on it stops the services cleanly.
        with Signals() as signals:
            try:
                async with host.running():
                    signals.handle()
                    stop = asyncio.create_task(signals.event.wait())
                    stop.add_done_callback(lambda _: host.stop.set())
                    typer.echo(
                        f"jetreduce services running: {', '.join(names)} on {settings.url}",
                        err=True,
                    )
                    await host.wait()
            except asyncio.CancelledError as exc:
                if not signals.interrupted_by(exc):
                    raise
                typer.echo(signals.why, err=True)
                return signals.exit_code
            except ConnectFailed as exc:
                typer.echo(str(exc), err=True)
                return exit_codes.UNREACHABLE
        return exit_codes.OK

    return asyncio.run(go())


@app.command()
def service(
    name: Annotated[str, typer.Argument(help="planner, launcher, aggregator or janitor.")],
    nats: Nats = None,
    log_dir: Annotated[Path | None, typer.Option(help="Local agents' logs.")] = None,
    backend: Backend = "local",
    namespace: Namespace = None,
    image: Image = None,
    stream_replicas: StreamReplicas = 1,
    max_slots: MaxSlots = None,
    queue: DefaultQueue = None,
    metrics_port: MetricsPort = None,
    workflow_namespace: WorkflowNamespaces = None,
    agent_env: AgentEnv = None,
) -> None:
    """Run one service (what a Kubernetes Deployment runs)."""
    if name not in SERVICE_NAMES:
        raise fail(
            f"unknown service {name!r}: choose from {', '.join(SERVICE_NAMES)}", exit_codes.USAGE
        )
    options = locals()
    del options["name"]
    _serve_command((name,), **options)


@services_app.command("up")
def services_up(
    nats: Nats = None,
    log_dir: Annotated[Path | None, typer.Option(help="Local agents' logs.")] = None,
    backend: Backend = "local",
    namespace: Namespace = None,
    image: Image = None,
    stream_replicas: StreamReplicas = 1,
    max_slots: MaxSlots = None,
    queue: DefaultQueue = None,
    metrics_port: MetricsPort = None,
    workflow_namespace: WorkflowNamespaces = None,
    agent_env: AgentEnv = None,
) -> None:
    """Run planner, launcher, aggregator and janitor in one process."""
    _serve_command(SERVICE_NAMES, **locals())


def _serve_command(
    names: tuple[str, ...],
    *,
    nats: str | None,
    log_dir: Path | None,
    backend: str,
    namespace: str | None,
    image: str | None,
    stream_replicas: int,
    max_slots: int | None,
    queue: str | None,
    metrics_port: int | None,
    workflow_namespace: list[str] | None,
    agent_env: Path | None,
) -> NoReturn:
    """What ``service`` and ``services up`` share once their options are parsed."""
    _check_queue(queue)
    k8s = kubernetes_settings(namespace, image, workflow_namespace or [])
    raise typer.Exit(
        _serve(
            names,
            nats,
            log_dir,
            backend,
            k8s,
            stream_replicas,
            max_slots=max_slots,
            default_queue=queue,
            metrics_port=metrics_port,
            agent_env=agent_env,
        )
    )


@app.command()
def worker() -> None:
    """Agent entry point, configured by environment variables as a pod is:
    JETREDUCE_NATS_URL, JETREDUCE_WORKFLOW_ID, JETREDUCE_PHASE (setup|map|reduce),
    JETREDUCE_SLOTS, JOB_COMPLETION_INDEX."""
    from jetreduce.cli.agent_main import main as agent_main

    raise typer.Exit(agent_main())


@app.command()
def server(
    data_dir: Annotated[Path, typer.Option("--data-dir")] = Path(DEFAULT_DATA_DIR),
    port: Annotated[int, typer.Option(help="-1 picks a free port.")] = 4222,
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on. Beyond loopback, credentials are generated and "
            "written to DATA_DIR/nats/client.env (mode 0600); clients need them."
        ),
    ] = "127.0.0.1",
    cluster: Annotated[
        int, typer.Option(help="Run N routed nodes on loopback (ports PORT..PORT+N-1).")
    ] = 0,
    roles: Annotated[
        bool,
        typer.Option(
            "--roles",
            help="A user per role (services, agents, clients) with the permissions of "
            "docs/operations.md; their credentials go to DATA_DIR/nats/ROLE.env (mode 0600). "
            "Start the services with the services' file and --agent-env with the agents'.",
        ),
    ] = False,
) -> None:
    """Run the embedded nats-server in the foreground until Ctrl-C (loopback by default)."""
    from jetreduce.embedded import DataDirBusy, EmbeddedServer

    if cluster:  # client ports PORT and up (free ones for -1), one line of URLs for --nats
        from jetreduce.cluster import LocalCluster

        nodes = LocalCluster(data_dir / "cluster", size=cluster, base_port=port).start()
        try:
            typer.echo(nodes.url)
            block_until_signalled(lambda: all(n.running for n in nodes.nodes))
        finally:
            nodes.stop()
        return

    try:
        srv = EmbeddedServer(
            data_dir / "nats",
            port=port,
            host=host,
            command="jetreduce server",
            roles=context.Global.settings.prefix if roles else None,
        ).start()
    except DataDirBusy as exc:
        raise fail(busy_message(data_dir, exc), exit_codes.FAILED) from None
    typer.echo(srv.url)
    if roles:
        typer.echo(
            f"users per role: credentials in {srv.data_dir}/{{services,agents,clients}}.env "
            f"(services: set -a; . services.env; set +a, and --agent-env agents.env)",
            err=True,
        )
    if srv.credentials_file is not None:
        typer.echo(
            f"listening on {host}: clients need the credentials in {srv.credentials_file} "
            "(for the services and CLI: set -a; . that file; set +a)",
            err=True,
        )
    try:
        block_until_signalled(lambda: srv.proc is not None and srv.proc.poll() is None)
    finally:
        srv.stop()


app.command()(workflow_file.validate)
app.add_typer(build_dlq(context.query_target), name="dlq")
register_roles(app, lambda: context.Global.settings.prefix)
register_logs(app, context.query_target)


def spread_args(argv: list[str]) -> list[str]:
    """``--args a b c`` as the README (and Prodigy) write it: Click options take one value
    each, so every word after ``--args`` up to the next option (or ``--``) becomes its own
    ``--args``. Put ``--args`` after the workflow file: ``run wf.yml --args a b``."""
    out: list[str] = []
    taking = False
    for word in argv:
        if word == "--args":
            taking = True
            continue
        if taking and (word.startswith("-") or not word):
            taking = False
        if taking:
            out += ["--args", word]
        else:
            out.append(word)
    return out


def main() -> None:
    app(args=spread_args(sys.argv[1:]), prog_name="jetreduce")


if __name__ == "__main__":
    main()
