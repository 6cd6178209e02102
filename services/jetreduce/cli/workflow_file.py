"""Reading a workflow file on the command line: ``jetreduce validate``, and what ``run`` and
``submit`` do first (parse, print warnings as compilers do, exit 2 on a problem, pick the
workflow id). The parse itself is ``lang``'s, through ``cli/submit.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from jetreduce.cli import exit_codes
from jetreduce.cli.context import fail
from jetreduce.cli.submit import load_workflow, new_workflow_id
from jetreduce.contract.subjects import InvalidToken, check_token
from jetreduce.contract.workflow import WorkflowInvalid

__all__ = ["load", "validate", "workflow_id"]


def load(path: Path) -> tuple[str, Any, dict[str, str]]:
    """The file's text, its parse result and the variables it used; exit 2 when it cannot
    be read or is invalid (every problem printed with its line and column)."""
    try:
        text, result, used = load_workflow(path)
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror or exc}", exit_codes.USAGE) from None
    except WorkflowInvalid as exc:
        _warn(path, exc.warnings)
        raise fail(str(exc), exit_codes.USAGE) from None
    _warn(path, result.warnings)
    return text, result, used


def _warn(path: Path, warnings: Any) -> None:
    for warning in warnings:  # rendered as compilers do: FILE:LINE:COL: warning: …
        typer.echo(warning.render(str(path)), err=True)


def workflow_id(result: Any, given: str | None) -> str:
    """The id to submit under: ``--id`` (checked here, before any server is involved) or a
    fresh one made from the workflow's name."""
    wf = given or new_workflow_id(result.workflow.name)
    try:
        check_token(wf)
    except InvalidToken as exc:
        raise fail(str(exc), exit_codes.USAGE) from None
    return wf


def validate(workflow: Annotated[Path, typer.Argument(help="Workflow YAML file.")]) -> None:
    """Check a workflow file; prints every problem with its line and column."""
    _, result, _ = load(workflow)
    typer.echo(f"{workflow}: ok ({result.workflow.name})")
