"""What every command shares: the connection settings the root callback resolved (``--nats``
and the other connection options before the command, or their ``JETREDUCE_*`` variables),
where a command connects, and how it fails with an exit code. Kept apart from ``app.py`` so
the command modules depend on it and not on the assembled application."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from jetreduce.cli.local_run import DEFAULT_DATA_DIR
from jetreduce.cli.session import Target
from jetreduce.runtime.settings import NatsSettings

__all__ = ["Global", "fail", "query_target", "settings", "target"]


class Global:
    """Set once per invocation by the root callback (``app._root``)."""

    settings = NatsSettings()
    url_given = False
    """``--nats`` before the command, or ``JETREDUCE_NATS_URL``."""


def settings(nats: str | None) -> NatsSettings:
    """The global settings, with a command's own ``--nats`` taking precedence."""
    return replace(Global.settings, url=nats) if nats else Global.settings


def target(nats: str | None, *, serve: bool = False) -> Target:
    """:func:`settings`, or, when no server was named and ``.jetreduce`` here holds a store,
    that store's server (``cli/session.py``)."""
    store = Path(DEFAULT_DATA_DIR)
    named = nats is not None or Global.url_given
    if named or not (store / "nats" / "jetstream").is_dir():
        return Target(settings(nats))
    return Target(settings(nats), store=store, serve=serve)


def query_target(nats: str | None) -> Target:
    """Where a query (status, list, dlq, logs) connects: as :func:`target`, serving a local
    store's server for the query's duration when none runs."""
    return target(nats, serve=True)


def fail(message: str, code: int) -> typer.Exit:
    """Print ``message`` to stderr and return the exit to raise (``raise fail(...)``)."""
    typer.echo(message, err=True)
    return typer.Exit(code)
