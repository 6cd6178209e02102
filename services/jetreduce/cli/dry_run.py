"""``jetreduce run --dry-run``: what a run would do (phases, items, parallelism), with the map
input resolved as the setup agent resolves it (``lang.map_input``) so the count is the run's.
No step runs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import typer

from jetreduce.cli import exit_codes

__all__ = ["show_plan"]

INPUT_TIMEOUT_S = 60.0
SHOWN_ITEMS = 5


_WORKSPACE_WORDS = {
    "agent": "a directory of each agent's own (a git worktree in a repository, else a copy)",
    "item": "a git worktree per item",
    "shared": "the workflow directory itself",
}


def show_plan(
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
        data, is_command = _input(workflow, workdir, args, profile)
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
        for n, item in enumerate(items[:SHOWN_ITEMS]):
            shown = json.dumps(item, separators=(",", ":"))
            typer.echo(f"    item_{n}: {shown[:200]}")
        if len(items) > SHOWN_ITEMS:
            typer.echo(f"    … and {len(items) - SHOWN_ITEMS} more")
        typer.echo(f"  parallelism: {min(wanted, len(items))} (max_parallel {wanted})")
    typer.echo("[DRY RUN] nothing was executed")
    return exit_codes.OK


def _input(
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
        timeout=min(INPUT_TIMEOUT_S, INPUT_COMMAND_TIMEOUT_S),
        check=False,
    )
    if out.returncode != 0:
        raise ValueError(
            f"map.input {source!r} is neither a file nor a command that succeeded (as a "
            f"command it exited with code {out.returncode}: "
            f"{out.stderr.decode(errors='replace').strip()[-300:]})"
        )
    return out.stdout, True
