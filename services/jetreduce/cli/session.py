"""Running a command body with a NATS connection: one place for connect, translate a refused
connection into its exit code, and close."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import typer

from jetreduce.cli import exit_codes
from jetreduce.contract.subjects import Subjects
from jetreduce.runtime.connection import ConnectFailed, connect
from jetreduce.runtime.settings import NatsSettings

__all__ = ["Body", "run_connected"]

Body = Callable[[Any, Subjects], Awaitable[int]]


def run_connected(settings: NatsSettings, body: Body) -> NoReturn:
    """Connect, run ``body(nc, subjects)``, close; exit with what it returns."""

    async def go() -> int:
        try:
            nc = await connect(settings, name="jetreduce-cli", forever=False)
        except ConnectFailed as exc:
            typer.echo(str(exc), err=True)
            return exit_codes.UNREACHABLE
        try:
            return await body(nc, Subjects(settings.prefix))
        finally:
            await nc.close()

    raise typer.Exit(asyncio.run(go()))
