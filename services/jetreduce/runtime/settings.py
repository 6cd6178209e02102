"""Connection settings shared by every service, agent and the CLI.

Precedence (resolved once, in the CLI or the agent entry point): flag > ``JETREDUCE_*``
environment variable > default. Credentials are paths or values held here only; they are
never copied into events, KV or logs (``__repr__`` masks them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

__all__ = ["NatsSettings"]

ENV_PREFIX = "JETREDUCE_"
SECRET_FIELDS = {"password", "token"}


@dataclass(frozen=True)
class NatsSettings:
    url: str = "nats://127.0.0.1:4222"
    """Comma-separated server URLs."""
    prefix: str = ""
    """Subject prefix for a shared account (see ``contract.subjects``)."""
    creds: str | None = None
    """Path of a ``.creds`` file (JWT + NKEY seed)."""
    nkey_seed: str | None = None
    """Path of an NKEY seed file."""
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    name: str = "jetreduce"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> NatsSettings:
        """Settings from ``JETREDUCE_NATS_URL``, ``JETREDUCE_NATS_CREDS``… then ``overrides``
        (flags) for every value that is not None."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            key = _env_key(f.name)
            if key in env and env[key] != "":
                values[f.name] = env[key]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(cls(), **values)  # type: ignore[arg-type]

    def to_env(self) -> dict[str, str]:
        """Environment for a child agent process: the inverse of :meth:`from_env`."""
        env: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.name == "name":
                continue
            env[_env_key(f.name)] = str(value)
        return env


def _env_key(name: str) -> str:
    return f"{ENV_PREFIX}PREFIX" if name == "prefix" else f"{ENV_PREFIX}NATS_{name.upper()}"
