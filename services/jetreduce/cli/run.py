"""``jetreduce run`` and ``jetreduce resume``: a workflow run here, with the embedded server
and the services in this process (``cli/local_run.py``), or only planned (``--dry-run``)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from jetreduce.cli import context, exit_codes, workflow_file
from jetreduce.cli import workflow_options as opts
from jetreduce.cli.context import fail
from jetreduce.cli.dry_run import show_plan
from jetreduce.cli.k8s_settings import kubernetes_settings
from jetreduce.cli.local_run import DEFAULT_DATA_DIR, run_here
from jetreduce.cli.option_group import expand_groups
from jetreduce.cli.options import Nats
from jetreduce.contract.events import SubmitOptions

__all__ = ["resume_cmd", "run"]


@expand_groups
def run(
    workflow: Annotated[Path, typer.Argument(help="Workflow YAML file (Prodigy MapReduce).")],
    *,
    how: opts.SubmitArgs,
    nats: Nats = None,
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="Embedded server's store and agent logs.")
    ] = Path(DEFAULT_DATA_DIR),
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
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the plan (phases, items, parallelism); run no step."),
    ] = False,
) -> None:
    """Run a workflow here: embedded nats-server, the services in this process, agents as
    child processes (or, with --backend kubernetes, as Jobs in --namespace with --image; the
    map input file is uploaded, since pods do not see this disk). Prints the reduce output
    and a summary. Ctrl-C stops it and keeps the workflow resumable (it prints the resume
    command); `jetreduce cancel` ends a workflow for good."""
    how.check_backend()
    if resume and workflow_id is None:
        raise fail("--resume needs --id ID (the workflow to continue)", exit_codes.USAGE)
    text, result, used = workflow_file.load(workflow)
    opts.check_profile(result.workflow, how.profile)
    if dry_run:
        where = (how.workdir or Path.cwd()).resolve()
        plan = show_plan(
            result.workflow,
            workflow,
            where,
            how.max_parallel,
            how.args or [],
            how.workspace_kind,
            how.profile,
        )
        raise typer.Exit(plan)
    opts.check_queue(how.queue)
    wf = workflow_file.workflow_id(result, workflow_id)
    options, upload = opts.submit_options(result.workflow, used, how, lease=lease)
    k8s = None
    if how.backend == "kubernetes":
        k8s = kubernetes_settings(how.namespace, how.image, [])
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
            backend=how.backend,
            k8s=k8s,
            upload=upload,
        )
    )
    raise typer.Exit(code)


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
