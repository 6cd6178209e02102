"""jetreduce: run Prodigy-format MapReduce workflows on NATS JetStream.

Exit codes: 0 success · 1 workflow failed / cancelled / timed out · 2 invalid arguments or
workflow file · 3 completed but some items failed permanently (see ``jetreduce dlq``) ·
4 NATS unreachable · 130 interrupted (SIGINT) · 143 terminated (SIGTERM).
"""

from __future__ import annotations

import atexit
import sys
from typing import Annotated, Any

import typer
from typer.core import TyperOption

from jetreduce import __version__
from jetreduce.cli import context, exit_codes, queries, run, serve, workflow_file
from jetreduce.cli.dlq import build as build_dlq
from jetreduce.cli.item_logs import register as register_logs
from jetreduce.cli.logs import configure
from jetreduce.cli.options import (
    Creds,
    Nats,
    NkeySeed,
    Password,
    Prefix,
    TlsCa,
    TlsCert,
    TlsKey,
    Token,
    User,
)
from jetreduce.cli.options import settings as make_settings
from jetreduce.cli.roles import register as register_roles
from jetreduce.runtime import telemetry

app = typer.Typer(
    name="jetreduce",
    help=__doc__,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
services_app = typer.Typer(
    help="Run the orchestrator's services.", no_args_is_help=True, rich_markup_mode="markdown"
)


def _no_placeholder_for_flags() -> None:
    """Typer shows a ``<bool>`` type after every flag, as if it took a value: a flag takes
    none, so it shows none (the one place this is decided for every command)."""
    shown = TyperOption.display_type_rich

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_no_placeholder_for_flags()
app.add_typer(services_app, name="services")


def _version(shown: bool) -> None:
    if shown:
        typer.echo(f"jetreduce {__version__}")
        raise typer.Exit(exit_codes.OK)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    nats: Nats = None,
    creds: Creds = None,
    nkey: NkeySeed = None,
    user: User = None,
    password: Password = None,
    token: Token = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    prefix: Prefix = None,
    log_level: Annotated[
        str | None, typer.Option("--log-level", envvar="JETREDUCE_LOG_LEVEL")
    ] = None,
    log_format: Annotated[
        str | None,
        typer.Option(
            "--log-format",
            envvar="JETREDUCE_LOG_FORMAT",
            help="text, or json: one object per line with workflow and item ids.",
        ),
    ] = None,
) -> None:
    """Connection options given here apply to every command; `--nats` on a command wins."""
    try:
        configure(log_level, log_format)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--log-format") from None
    # Tracing/metrics as the OTEL_* variables say (nothing without them); `service` and
    # `worker` configure again under their own service name. Spans are flushed at exit.
    telemetry.configure("jetreduce-cli")
    atexit.register(telemetry.shutdown)
    context.Global.settings = make_settings(
        nats, creds, nkey, user, password, token, tls_ca, tls_cert, tls_key, prefix
    )
    context.Global.url_given = nats is not None


# The commands, in the order `jetreduce --help` lists them.
app.command()(run.run)
app.command("resume")(run.resume_cmd)
app.command("submit")(queries.submit_cmd)
app.command()(queries.watch)
app.command()(queries.status)
app.command("list")(queries.list_cmd)
app.command()(queries.cancel)
app.command()(workflow_file.validate)
app.command()(serve.service)
services_app.command("up")(serve.services_up)
app.command()(serve.worker)
app.command()(serve.server)
app.add_typer(build_dlq(context.query_target), name="dlq")
register_roles(app, lambda: context.Global.settings.prefix)
register_logs(app, context.query_target)


def spread_args(argv: list[str]) -> list[str]:
    """``--args a b c`` as the README (and Prodigy) write it: Click options take one value
    each, so every word after ``--args`` up to the next option (or ``--``) becomes its own
    ``--args``. Put ``--args`` after the workflow file: ``run wf.yml --args a b``."""
    out: list[str] = []
    taking = False
    for word in argv:
        if word == "--args":
            taking = True
            continue
        if taking and (word.startswith("-") or not word):
            taking = False
        if taking:
            out += ["--args", word]
        else:
            out.append(word)
    return out


def main() -> None:
    app(args=spread_args(sys.argv[1:]), prog_name="jetreduce")


if __name__ == "__main__":
    main()
