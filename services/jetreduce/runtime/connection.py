"""Connecting to NATS with the settings' credentials and TLS, with reconnects that never give
up for long-running services (nats-py's default gives up after two minutes)."""

from __future__ import annotations

import logging
import ssl
from typing import Any

import nats
from nats.aio.client import Client

from jetreduce.runtime.settings import NatsSettings

__all__ = ["ConnectFailed", "connect"]

log = logging.getLogger(__name__)


class ConnectFailed(ConnectionError):
    """No server could be reached (or it refused our credentials) within the attempts."""


def _tls_context(settings: NatsSettings) -> ssl.SSLContext | None:
    if not (settings.tls_ca or settings.tls_cert or settings.url.startswith("tls://")):
        return None
    ctx = ssl.create_default_context(cafile=settings.tls_ca)
    if settings.tls_cert:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    return ctx


async def connect(
    settings: NatsSettings, *, name: str | None = None, forever: bool = True, attempts: int = 3
) -> Client:
    """Connect. ``forever`` makes reconnects after a loss unlimited (services, agents); the
    first connection still fails after ``attempts`` so a wrong URL is reported, not hung on."""

    async def _error(exc: Exception) -> None:
        log.warning("nats: %s", exc)

    opts: dict[str, Any] = {
        "servers": [u.strip() for u in settings.url.split(",") if u.strip()],
        "name": name or settings.name,
        "max_reconnect_attempts": -1 if forever else 5,
        "reconnect_time_wait": 1,
        "connect_timeout": 3,
        "allow_reconnect": True,
        "error_cb": _error,
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
    last: Exception | None = None
    for _ in range(max(1, attempts)):
        try:
            return await nats.connect(**opts)
        except Exception as exc:  # nats raises a zoo of types here: translate at the edge
            last = exc
    raise ConnectFailed(f"cannot connect to NATS at {settings.url}: {last}") from None
