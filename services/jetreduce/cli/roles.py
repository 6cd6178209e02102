"""The per-role NATS users (runtime/permissions.py) on the command line: ``jetreduce
nats-users`` prints them for a server configuration or the NATS Helm chart, and
``--agent-env`` gives the local agents of ``services up`` / ``service launcher`` an identity of
their own."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from jetreduce.runtime.settings import NatsSettings

__all__ = ["agent_settings", "register"]


def agent_settings(settings: NatsSettings, agent_env: Path | None) -> NatsSettings | None:
    """How local agents connect: as ``agent_env`` says (its identity only; where to connect
    stays the services'), else (None) as the services do."""
    if agent_env is None:
        return None
    from jetreduce.embedded import read_env_file, with_identity

    return with_identity(settings, read_env_file(agent_env))


def register(app: typer.Typer, prefix: Callable[[], str]) -> None:
    """Add ``nats-users`` to ``app``; ``prefix`` gives the installation's subject prefix."""

    @app.command("nats-users")
    def nats_users(
        helm: Annotated[
            bool,
            typer.Option(
                "--helm", help="Values for the official NATS Helm chart instead of a config file."
            ),
        ] = False,
    ) -> None:
        """Print the NATS users of the three roles (services, agents, clients) with their
        permissions, for the installation's --prefix: a nats-server config file to include,
        or Helm values. Passwords are read by the server from its environment
        (JETREDUCE_SERVICES_PASSWORD, …), never printed. deploy/kustomize ships both
        (`make nats-users`)."""
        from jetreduce.runtime.permissions import helm_values, server_conf

        given = prefix()
        typer.echo(helm_values(given) if helm else server_conf(given), nl=False)
