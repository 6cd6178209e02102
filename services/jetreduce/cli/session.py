"""Running a command body with a NATS connection: one place for connect, translate a refused
connection into its exit code, and close.

When no server was named (no ``--nats``, no ``JETREDUCE_NATS_URL``) and the working directory
holds a ``jetreduce run`` store (``.jetreduce``), a command uses that store: the server
running on it if there is one (a ``run`` or ``server`` still going), else, for commands that
only read (``status``, ``list``, ``logs``, ``dlq``), an embedded server started on it for the
command's duration. Such a server has a user per role (runtime/permissions.py): a command
connects to it as a client (``clients.env`` beside the store), whose rights are submit,
cancel, retry and reading."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

import typer

from jetreduce.cli import exit_codes
from jetreduce.cli.signals import Signals
from jetreduce.contract.subjects import Subjects
from jetreduce.embedded import DataDirBusy, EmbeddedServer, role_settings, serving_url
from jetreduce.runtime.connection import ConnectFailed, connect
from jetreduce.runtime.settings import NatsSettings

__all__ = ["Body", "Target", "run_connected"]

Body = Callable[[Any, Subjects], Awaitable[int]]


@dataclass(frozen=True)
class Target:
    """Where a command connects: ``settings``, or the server of a local store."""

    settings: NatsSettings
    store: Path | None = None
    """A ``run`` data directory to use, as no server was named."""
    serve: bool = False
    """Start a server on ``store`` if none runs there (commands that only read)."""


def run_connected(target: NatsSettings | Target, body: Body) -> NoReturn:
    """Connect, run ``body(nc, subjects)``, close; exit with what it returns."""
    if isinstance(target, NatsSettings):
        target = Target(target)

    async def go() -> int:
        with Signals() as signals:
            try:
                return await connected()
            except asyncio.CancelledError as exc:
                if not signals.interrupted_by(exc):
                    raise
            except ConnectFailed as exc:
                if not signals.received:  # else it failed because we were interrupted
                    typer.echo(str(exc), err=True)
                    return exit_codes.UNREACHABLE
            typer.echo(signals.why, err=True)
            return signals.exit_code

    async def connected() -> int:
        settings = target.settings
        server = None
        if target.store is not None:
            url = serving_url(target.store / "nats")
            if url is None and target.serve:
                server = EmbeddedServer(
                    target.store / "nats", command="jetreduce (a query)", roles=settings.prefix
                )
                try:
                    url = (await server.start_async()).url
                except DataDirBusy as exc:  # a run started meanwhile: use its server
                    server, url = None, exc.url or None
                except (OSError, RuntimeError, TimeoutError) as exc:
                    typer.echo(f"cannot serve the store in {target.store}: {exc}", err=True)
                    return exit_codes.FAILED
            if url is not None:
                settings = replace(settings, url=url)
                settings = role_settings(target.store / "nats", "clients", settings) or settings
        try:
            nc = await connect(settings, name="jetreduce-cli", forever=False)
            try:
                return await body(nc, Subjects(settings.prefix))
            finally:
                await nc.close()
        finally:
            if server is not None:
                await asyncio.to_thread(server.stop)

    raise typer.Exit(asyncio.run(go()))
