"""Connecting to NATS with the settings' credentials and TLS.

The first connection is bounded: after ``JETREDUCE_CONNECT_TIMEOUT_S`` seconds (default
``DEFAULT_CONNECT_TIMEOUT_S``) of trying, :class:`ConnectFailed` names the URL, and the CLI
exits 4 with that one line. A wrong URL is reported, never hung on, whoever connects (a
command, the services, an agent). Once connected, long-running services and agents reconnect
after a loss without ever giving up (nats-py's default gives up after two minutes): an
outage of the server is waited out, a typo is not."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from typing import Any

from nats.aio.client import Client

from jetreduce.contract.errors import TemporaryError
from jetreduce.runtime.settings import NatsSettings

__all__ = [
    "CONNECT_TIMEOUT_ENV",
    "DEFAULT_CONNECT_TIMEOUT_S",
    "ConnectFailed",
    "close_quietly",
    "connect",
    "connect_timeout_s",
]

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT_S = 10.0
"""How long the first connection is tried before the URL is reported unreachable."""
CONNECT_TIMEOUT_ENV = "JETREDUCE_CONNECT_TIMEOUT_S"


class ConnectFailed(TemporaryError, ConnectionError):
    """No server could be reached (or it refused our credentials) within the attempts."""


def _tls_context(settings: NatsSettings) -> ssl.SSLContext | None:
    if not (settings.tls_ca or settings.tls_cert or settings.url.startswith("tls://")):
        return None
    ctx = ssl.create_default_context(cafile=settings.tls_ca)
    if settings.tls_cert:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    return ctx


def connect_timeout_s(env: dict[str, str] | None = None) -> float:
    """The first connection's budget: ``JETREDUCE_CONNECT_TIMEOUT_S`` if it is a positive
    number, else the default (a malformed value must not turn into "forever")."""
    raw = (os.environ if env is None else env).get(CONNECT_TIMEOUT_ENV, "")
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_CONNECT_TIMEOUT_S
    return value if value > 0 else DEFAULT_CONNECT_TIMEOUT_S


async def connect(
    settings: NatsSettings,
    *,
    name: str | None = None,
    forever: bool = True,
    timeout_s: float | None = None,
) -> Client:
    """Connect within ``timeout_s`` (default :func:`connect_timeout_s`) or raise
    :class:`ConnectFailed` naming the URL. ``forever`` makes reconnects after a loss of the
    established connection unlimited (services, agents); without it a command gives up on a
    lost server after a few attempts."""
    budget = connect_timeout_s() if timeout_s is None else timeout_s
    servers = [u.strip() for u in settings.url.split(",") if u.strip()]
    websockets = [u for u in servers if u.lower().startswith(("ws://", "wss://"))]
    if websockets:  # nats-py's WebSocket transport is not loaded (jetreduce/__init__.py)
        raise ConnectFailed(
            f"cannot connect to NATS at {websockets[0]}: WebSocket URLs are not supported; "
            "use nats:// or tls:// (the server's client port)"
        )
    established = False
    last: list[Exception] = []

    async def _error(exc: Exception) -> None:
        # While the first connection is tried, one line at the end says it all.
        if established:
            log.warning("nats: %s", exc)
        else:
            last[:] = [exc]
            log.debug("nats: %s", exc)

    async def _reconnected() -> None:
        log.warning("nats: reconnected to %s", nc.connected_url.netloc if nc.connected_url else "?")

    opts: dict[str, Any] = {
        "servers": servers,
        "name": name or settings.name,
        # Bounded for the first connection (the budget below ends it anyway); lifted to
        # unlimited once connected when ``forever``.
        "max_reconnect_attempts": 1_000_000,
        "reconnect_time_wait": 0.5,
        "connect_timeout": min(3.0, budget),
        "allow_reconnect": True,
        "error_cb": _error,
        "reconnected_cb": _reconnected,
        "pending_size": 64 * 1024 * 1024,
    }
    if settings.creds:
        opts["user_credentials"] = settings.creds
    if settings.nkey_seed:
        opts["nkeys_seed"] = settings.nkey_seed
    if settings.user:
        opts["user"] = settings.user
        opts["password"] = settings.password or ""
    if settings.token:
        opts["token"] = settings.token
    tls = _tls_context(settings)
    if tls is not None:
        opts["tls"] = tls
    nc = Client()
    try:
        await asyncio.wait_for(nc.connect(**opts), budget)
    except Exception as exc:  # nats raises a zoo of types here: translate at the edge
        with contextlib.suppress(Exception):  # the connect error is what is raised
            await nc.close()
        cause = last[0] if last else exc
        why = str(cause) or type(cause).__name__
        if isinstance(exc, TimeoutError) and not last:
            why = "no answer"
        raise ConnectFailed(
            f"cannot connect to NATS at {settings.url} within {budget:g}s: {why} "
            f"(is a server running there? set {CONNECT_TIMEOUT_ENV} to wait longer)"
        ) from None
    established = True
    nc.options["max_reconnect_attempts"] = -1 if forever else 5
    nc.options["reconnect_time_wait"] = 1
    return nc


async def close_quietly(nc: Client) -> None:
    """Drain ``nc`` if it is connected, else close it; never raises, and leaves no task behind.

    ``drain`` refuses while the client is reconnecting (the server is down), and nats-py's
    ``close`` gives up half-way when flushing pending data on a dead transport fails, before
    it stops its subscriptions' readers: those would wait for messages for the rest of the
    process. A service host that stops during an outage must still end cleanly."""
    with contextlib.suppress(Exception):  # an outage: close below all the same
        await nc.drain()
    if nc.is_closed:
        return
    with contextlib.suppress(Exception):  # closing what is already broken
        await nc.close()
    for sub in list(getattr(nc, "_subs", {}).values()):  # what close() did not reach
        task = getattr(sub, "_wait_for_msgs_task", None)
        if task is not None and not task.done():
            task.cancel()
