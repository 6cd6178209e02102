"""Connection options shared by every command (flag > JETREDUCE_* environment > default)."""

from __future__ import annotations

from typing import Annotated

import typer

from jetreduce.runtime.counts import item_index
from jetreduce.runtime.settings import NatsSettings

Nats = Annotated[
    str | None,
    typer.Option(
        "--nats", envvar="JETREDUCE_NATS_URL", help="NATS server URL(s), comma-separated."
    ),
]
Creds = Annotated[
    str | None,
    typer.Option("--creds", envvar="JETREDUCE_NATS_CREDS", help="NATS .creds file (JWT + NKEY)."),
]
NkeySeed = Annotated[
    str | None,
    typer.Option("--nkey", envvar="JETREDUCE_NATS_NKEY_SEED", help="NKEY seed file."),
]
User = Annotated[str | None, typer.Option("--user", envvar="JETREDUCE_NATS_USER")]
Password = Annotated[
    str | None,
    typer.Option("--password", envvar="JETREDUCE_NATS_PASSWORD", help="Prefer the env var."),
]
Token = Annotated[
    str | None,
    typer.Option("--token", envvar="JETREDUCE_NATS_TOKEN", help="Prefer the env var."),
]
TlsCa = Annotated[str | None, typer.Option("--tls-ca", envvar="JETREDUCE_NATS_TLS_CA")]
TlsCert = Annotated[str | None, typer.Option("--tls-cert", envvar="JETREDUCE_NATS_TLS_CERT")]
TlsKey = Annotated[str | None, typer.Option("--tls-key", envvar="JETREDUCE_NATS_TLS_KEY")]
Prefix = Annotated[
    str | None,
    typer.Option("--prefix", envvar="JETREDUCE_PREFIX", help="Subject prefix (shared accounts)."),
]


def settings(
    nats: str | None,
    creds: str | None = None,
    nkey: str | None = None,
    user: str | None = None,
    password: str | None = None,
    token: str | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    prefix: str | None = None,
) -> NatsSettings:
    return NatsSettings.from_env(
        url=nats,
        creds=creds,
        nkey_seed=nkey,
        user=user,
        password=password,
        token=token,
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
        prefix=prefix,
    )


def item_argument(item: str) -> int:
    """An item named on the command line, ``item_7`` or ``7``, as its index: ASCII digits
    only, as subjects carry it (``"²"`` passes ``str.isdigit`` and then fails ``int``)."""
    index = item_index(item.removeprefix("item_"))
    if index is None:
        raise typer.BadParameter(f"{item!r} is not an item id (item_N or N)")
    return index
