"""The commands that talk to running services: ``submit`` (with ``--wait``), ``watch``,
``status``, ``list`` and ``cancel``. Each connects, does one thing, prints and exits with the
workflow's outcome code where it has one."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer

from jetreduce.cli import context, exit_codes, workflow_file
from jetreduce.cli import workflow_options as opts
from jetreduce.cli.option_group import expand_groups
from jetreduce.cli.options import Nats
from jetreduce.cli.outcome import show_outcome, terminal_code
from jetreduce.cli.session import run_connected
from jetreduce.cli.submit import (
    SubmitRejected,
    format_problems,
)
from jetreduce.cli.text import printable
from jetreduce.cli.upload import submit_with_upload
from jetreduce.cli.watch import Watcher, describe
from jetreduce.contract import events as ev
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.runtime.state import StateStore

__all__ = ["cancel", "list_cmd", "status", "submit_cmd", "watch"]

NeededBackend = Annotated[
    str,
    typer.Option(
        "--backend",
        envvar="JETREDUCE_BACKEND",
        help="The backend the workflow needs: local or kubernetes. The installation's "
        "launcher fails a workflow that asks for a backend it does not run.",
    ),
]


async def _cancel(nc: Any, subjects: Subjects, wf: str, reason: str) -> None:
    js = nc.jetstream()
    await js.publish(
        subjects.workflow("cancel", wf),
        ev.encode(ev.WorkflowCancelRequested(workflow_id=wf, reason=reason)),
    )


@dataclass(frozen=True)
class _ServicesSubmitArgs(opts.SubmitArgs):
    """``submit``'s ``--backend`` says what the workflow asks of the installation (whose
    launcher runs one backend), not where this command runs agents as ``run``'s does."""

    backend: NeededBackend = "local"


@expand_groups
def submit_cmd(
    workflow: Annotated[Path, typer.Argument(help="Workflow YAML file.")],
    nats: Nats = None,
    *,
    how: _ServicesSubmitArgs,
    workflow_id: Annotated[str | None, typer.Option("--id", help="Workflow id.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow it until it ends.")] = False,
) -> None:
    """Submit a workflow to running services; prints its id (stdout). The map input file,
    if it is one here, is uploaded too: agents elsewhere (pods) read it from there."""
    how.check_backend()
    text, result, used = workflow_file.load(workflow)
    opts.check_profile(result.workflow, how.profile)
    opts.check_queue(how.queue)
    wf = workflow_file.workflow_id(result, workflow_id)
    options, upload = opts.submit_options(result.workflow, used, how)

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
    with contextlib.suppress(Exception):  # progress is optional in a status line
        msg = await js.get_last_msg(subjects.progress_stream, subjects.progress(wf))
        event = ev.decode(msg.data)
        if isinstance(event, ev.Progress):
            return event
    return None


def list_cmd(nats: Nats = None) -> None:
    """List workflows (id, phase, name, counts), oldest first."""
    status(None, nats, False)


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
