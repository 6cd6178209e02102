"""How a workflow's end is shown: the reduce output on stdout, a summary on stderr, and the
exit code it means."""

from __future__ import annotations

import contextlib
from typing import Any

import typer

from jetreduce.cli import exit_codes
from jetreduce.cli.watch import describe, slot_use
from jetreduce.contract import events as ev
from jetreduce.contract.subjects import Subjects

__all__ = ["print_outcome", "show_outcome", "terminal_code"]


def terminal_code(event: Any) -> int:
    if isinstance(event, ev.WorkflowCompleted):
        return exit_codes.DEAD_ITEMS if event.dead else exit_codes.OK
    if isinstance(event, ev.WorkflowRejected):
        return exit_codes.USAGE
    return exit_codes.FAILED


async def show_outcome(nc: Any, subjects: Subjects, event: Any, quiet: bool = False) -> None:
    """:func:`print_outcome`, with what a failed reduce's steps printed before it failed
    (on stdout, as a completed reduce's output is): the error then reads in context."""
    if isinstance(event, ev.WorkflowFailed):
        with contextlib.suppress(Exception):  # the reason is shown without it
            msg = await nc.jetstream().get_last_msg(
                subjects.events_stream, subjects.reduce("failed", event.workflow_id)
            )
            failed = ev.decode(msg.data)
            if isinstance(failed, ev.ReduceFailed) and failed.output:
                typer.echo(failed.output)
    print_outcome(event, quiet)


def print_outcome(event: Any, quiet: bool = False) -> None:
    """The reduce output (stdout) and a summary (stderr); ``quiet`` keeps the summary only
    when something failed."""
    if isinstance(event, ev.WorkflowCompleted):
        if event.reduce_output:
            typer.echo(event.reduce_output)
        if quiet and not event.dead:
            return
        typer.echo(
            f"workflow {event.workflow_id}: completed, {event.done}/{event.total} items "
            f"succeeded, {event.dead} failed, in {event.duration_s:.1f}s{slot_use(event)}",
            err=True,
        )
    else:
        typer.echo(f"workflow {event.workflow_id}: {describe(event)}", err=True)
