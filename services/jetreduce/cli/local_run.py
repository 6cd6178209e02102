"""``jetreduce run`` and ``resume``: a server on the data directory (unless ``--nats``), the
services in this process, agents as children, and the workflow followed to its end.

Interrupting is not cancelling (Prodigy's model, docs/prodigy-compatibility.md): a signal
stops the agents and the server and keeps the workflow, printing the exact ``jetreduce
resume`` command; ``jetreduce cancel`` ends a workflow for good, and resuming an ended
workflow says why it cannot (exit 2).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from jetreduce.cli import exit_codes
from jetreduce.cli.host import ServiceHost
from jetreduce.cli.outcome import show_outcome, terminal_code
from jetreduce.cli.signals import Signals
from jetreduce.cli.submit import SubmitRejected, format_problems
from jetreduce.cli.text import printable
from jetreduce.cli.upload import submit_with_upload
from jetreduce.cli.watch import Watcher
from jetreduce.contract.errors import PermanentError
from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.records import Phase
from jetreduce.contract.subjects import Subjects
from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.runtime.connection import ConnectFailed, connect
from jetreduce.runtime.settings import NatsSettings
from jetreduce.runtime.state import StateStore

__all__ = ["DEFAULT_DATA_DIR", "INTERRUPT_GRACE_S", "busy_message", "run_here"]

DEFAULT_DATA_DIR = ".jetreduce"
_NOT_RESUMABLE = frozenset({Phase.CANCELLED, Phase.FAILED, Phase.TIMED_OUT})
INTERRUPT_GRACE_S = 2.0
"""``run``: how long an interrupted run's in-flight items may finish (``JETREDUCE_GRACE_S``)."""


class MissingCredentials(PermanentError, RuntimeError):
    """A role's credentials file is missing from the server's directory."""


async def run_here(
    text: str | None,
    source: str,
    wf: str,
    options: SubmitOptions,
    settings: NatsSettings,
    nats: str | None,
    data_dir: Path,
    quiet: bool,
    *,
    resume: bool = False,
    backend: str = "local",
    k8s: KubernetesSettings | None = None,
    upload: Path | None = None,
) -> int:
    """Host the services (and, without ``nats``, a server on ``data_dir``) and follow the
    workflow. A signal at any moment ends it: before the workflow is under way the command
    just stops; after, the agents stop and the workflow stays resumable (the Prodigy model:
    ``jetreduce cancel`` is what ends a workflow for good)."""
    with Signals() as signals:
        under_way: list[bool] = []
        try:
            code = await _run_in(
                signals,
                under_way,
                text,
                source,
                wf,
                options,
                settings,
                nats,
                data_dir,
                quiet,
                resume=resume,
                backend=backend,
                k8s=k8s,
                upload=upload,
            )
        except asyncio.CancelledError as exc:
            if not signals.interrupted_by(exc):
                raise
            code = None
        except ConnectFailed as exc:
            typer.echo(str(exc), err=True)
            return exit_codes.UNREACHABLE
        if code is not None:
            return code
        if under_way:
            _print_resumable(signals.why, wf, nats, data_dir)
        else:
            typer.echo(f"\n{signals.why}", err=True)
        return signals.exit_code


def _print_resumable(why: str, wf: str, nats: str | None, data_dir: Path) -> None:
    where = f" --nats {nats}" if nats else ""
    if not nats and data_dir != Path(DEFAULT_DATA_DIR):
        where = f" --data-dir {data_dir}"
    typer.echo(
        f"\n{why}: workflow {wf} stopped, not cancelled. Continue it with:\n"
        f"  jetreduce resume {wf}{where}",
        err=True,
    )


async def _start_server(data_dir: Path, prefix: str) -> Any:
    """The embedded server on ``data_dir`` (refused at once if another process has it), with
    a user per role (runtime/permissions.py): services, agents and clients each connect as
    their own, so an agent's steps cannot publish what only the services may."""
    from jetreduce.embedded import DataDirBusy, EmbeddedServer

    data_dir.mkdir(parents=True, exist_ok=True)
    server = EmbeddedServer(data_dir / "nats", command="jetreduce run", roles=prefix)
    try:
        return await server.start_async()
    except DataDirBusy as exc:
        typer.echo(busy_message(data_dir, exc), err=True)
        raise typer.Exit(exit_codes.FAILED) from None
    except (OSError, RuntimeError, TimeoutError) as exc:
        typer.echo(f"cannot start the embedded nats-server: {exc}", err=True)
        raise typer.Exit(exit_codes.FAILED) from None


def _as_role(server_dir: Path, role: str, settings: NatsSettings) -> NatsSettings:
    from jetreduce.embedded import role_settings

    found = role_settings(server_dir, role, settings)
    if found is None:  # the server writes them before it starts: never, unless removed
        raise MissingCredentials(f"no credentials for {role} in {server_dir}")
    return found


def busy_message(data_dir: Path, exc: Any) -> str:
    """One line: who holds the store, and how to use that server instead."""
    who = f"pid {exc.pid}" + (f" ({exc.command})" if exc.command else "")
    reuse = (
        f"use that server with --nats {exc.url}"
        if exc.url
        else "wait for it to start, then use its server with --nats URL"
    )
    return (
        f"data directory {data_dir} is in use by {who}, serving {exc.url or '(starting)'}: "
        f"{reuse}, or give another --data-dir"
    )


async def _run_in(
    signals: Signals,
    under_way: list[bool],
    text: str | None,
    source: str,
    wf: str,
    options: SubmitOptions,
    settings: NatsSettings,
    nats: str | None,
    data_dir: Path,
    quiet: bool,
    *,
    resume: bool,
    backend: str,
    k8s: KubernetesSettings | None,
    upload: Path | None,
) -> int | None:
    """The body of :func:`run_here`; None when a signal stopped the workflow's run."""
    server = None
    # Ctrl-C must be prompt: in-flight items get this long to finish before they are handed
    # back (and run again on resume), unless the user chose otherwise. Agents read it from
    # the environment they inherit.
    os.environ.setdefault("JETREDUCE_GRACE_S", str(INTERRUPT_GRACE_S))
    try:
        services = agents = client = settings
        if nats is None:
            server = await _start_server(data_dir, settings.prefix)
            services, agents, client = (
                _as_role(server.data_dir, role, replace(settings, url=server.url))
                for role in ("services", "agents", "clients")
            )
        host = ServiceHost(
            services,
            log_dir=data_dir.resolve() / "logs",
            backend=backend,
            k8s=k8s,
            agents=agents,
        )
        async with host.running():
            nc = await connect(client, name="jetreduce-cli", forever=False)
            try:
                subjects = Subjects(settings.prefix)
                watcher = Watcher(nc, subjects, wf, show_events=not quiet, quiet=quiet)
                await watcher.start()
                record = await StateStore(nc.jetstream(), subjects).get(wf) if resume else None
                # A completed workflow's outcome is shown again (a rerun of the same command
                # is harmless); one that ended otherwise cannot be continued: say why.
                if record is not None and record.phase in _NOT_RESUMABLE:
                    reason = f" ({printable(record.reason)})" if record.reason else ""
                    typer.echo(
                        f"workflow {wf} cannot be resumed: it is {record.phase.value}{reason}; "
                        "run the workflow again with jetreduce run",
                        err=True,
                    )
                    return exit_codes.USAGE
                if record is not None:
                    if not quiet:
                        typer.echo(f"workflow {wf}: resuming", err=True)
                elif text is None:
                    typer.echo(f"no workflow {wf} in {data_dir}", err=True)
                    return exit_codes.FAILED
                else:
                    try:
                        await submit_with_upload(
                            nc,
                            subjects,
                            text,
                            options,
                            workflow_id=wf,
                            source=source,
                            upload=upload,
                        )
                    except SubmitRejected as exc:
                        typer.echo(format_problems(exc), err=True)
                        return exit_codes.USAGE
                    if not quiet:
                        typer.echo(f"workflow {wf} submitted", err=True)
                under_way.append(True)
                signals.handle()
                follow = asyncio.create_task(watcher.until_done())
                stop = asyncio.create_task(signals.event.wait())
                failed = asyncio.create_task(host.stop.wait())
                await asyncio.wait({follow, stop, failed}, return_when=asyncio.FIRST_COMPLETED)
                if follow.done():
                    stop.cancel()
                    failed.cancel()
                    event = follow.result()
                    await show_outcome(nc, subjects, event, quiet)
                    return terminal_code(event)
                follow.cancel()
                if stop.done():
                    # Leaving ``host.running()`` stops the launcher, which stops the agents:
                    # in-flight items are handed back and run again on resume.
                    return None
                await host.wait()
                return exit_codes.FAILED
            finally:
                await nc.close()
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
