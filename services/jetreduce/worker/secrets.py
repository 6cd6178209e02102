"""An agent's workflow environment: ``env_files``, ``env``, the active profile, positional
``--args`` and ``secrets``, plus the :class:`Masker` that keeps secret values out of output.

Secrets are resolved *here, in the agent*, from the agent's own environment and files (a
pod's mounted Secret, a developer's shell). Only their names and providers travel in the
workflow spec; their values never enter an event, a KV entry or a log line: every piece of
step output is passed through :meth:`Masker.mask` before the agent publishes, stores or logs it.

Layering, lowest first (a later layer overrides an earlier one): ``env_files`` (in list
order), the workflow ``env``, the active profile, ``ARG_N``, secrets. ``env`` and profile
values may reference positional arguments (``$1``, ``${ARG_1}``) and ``env_files`` values.

Errors: :class:`EnvironmentProblem` (a ``ValueError``) names the secret, file or profile.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from jetreduce.contract.errors import PermanentError
from jetreduce.contract.workflow.model import Secret, Workflow
from jetreduce.lang.interpolate import Variables, render_text

__all__ = [
    "MASK",
    "MIN_SECRET_LENGTH",
    "EnvironmentProblem",
    "Masker",
    "MaskingFilter",
    "WorkflowEnvironment",
    "parse_env_file",
    "positional_args",
    "profile_values",
    "resolve_environment",
    "resolve_secrets",
]

MASK: Final = "***"
MIN_SECRET_LENGTH: Final = 4
"""Shorter values are not masked: replacing every ``a`` or ``12`` in all output would make it
unreadable while protecting nothing."""

_IDENT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class EnvironmentProblem(PermanentError, ValueError):
    """A secret, env file or profile that cannot be resolved."""


class Masker:
    """Replaces every known secret value (at least :data:`MIN_SECRET_LENGTH` characters) with
    ``***`` in any text. Longer values go first, so a secret containing another is masked
    whole."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        unique = {v for v in values if len(v) >= MIN_SECRET_LENGTH}
        self._values = sorted(unique, key=len, reverse=True)
        self._pattern = (
            re.compile("|".join(re.escape(v) for v in self._values)) if self._values else None
        )

    def __bool__(self) -> bool:
        return self._pattern is not None

    def mask(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(MASK, text)

    def mask_value(self, value: Any) -> Any:
        """Mask strings inside a JSON value (captures may be parsed JSON)."""
        if isinstance(value, str):
            return self.mask(value)
        if isinstance(value, list):
            return [self.mask_value(v) for v in value]
        if isinstance(value, dict):
            return {k: self.mask_value(v) for k, v in value.items()}
        return value


class MaskingFilter(logging.Filter):
    """A logging filter that masks secrets in a record's final message (attach it to the
    handlers, so records of every logger pass through it)."""

    def __init__(self, masker: Masker) -> None:
        super().__init__()
        self.masker = masker

    def filter(self, record: logging.LogRecord) -> bool:
        if self.masker:
            message = record.getMessage()
            masked = self.masker.mask(message)
            if masked != message:
                record.msg, record.args = masked, None
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = self.masker.mask(
                    logging.Formatter().formatException(record.exc_info)
                )
                record.exc_info = None
        return True


# --- .env files ------------------------------------------------------------------------------


def _unescape_double(body: str) -> str:
    escapes = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$"}
    return re.sub(r"\\(.)", lambda m: escapes.get(m.group(1), "\\" + m.group(1)), body)


def parse_env_file(text: str, *, source: str = ".env") -> dict[str, str]:
    """Parse ``.env`` text: ``KEY=VALUE`` lines, blank lines and ``#`` comments, an optional
    ``export`` prefix, values in double quotes (escapes, may span lines), single quotes
    (literal) or bare (a `` #`` starts a comment; surrounding spaces dropped)."""
    values: dict[str, str] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        number = i + 1
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        if line.startswith("export ") or line.startswith("export\t"):
            line = line[7:].lstrip()
        key, sep, rest = line.partition("=")
        key = key.strip()
        if not sep or not _IDENT.fullmatch(key):
            raise EnvironmentProblem(f"{source}:{number}: expected KEY=VALUE, got {line[:40]!r}")
        rest = rest.lstrip()
        if rest[:1] in ('"', "'"):
            quote = rest[0]
            body = rest[1:]
            # a quoted value may continue over following lines until its closing quote
            while not _closes(body, quote) and i < len(lines):
                body += "\n" + lines[i]
                i += 1
            end = _closing_index(body, quote)
            if end < 0:
                raise EnvironmentProblem(f"{source}:{number}: unterminated {quote} quote")
            raw = body[:end]
            values[key] = _unescape_double(raw) if quote == '"' else raw
        else:
            value = re.split(r"\s+#", rest, maxsplit=1)[0]
            values[key] = value.strip()
    return values


def _closing_index(body: str, quote: str) -> int:
    i = 0
    while i < len(body):
        if quote == '"' and body[i] == "\\":
            i += 2
            continue
        if body[i] == quote:
            return i
        i += 1
    return -1


def _closes(body: str, quote: str) -> bool:
    return _closing_index(body, quote) >= 0


# --- secrets, profiles, args -----------------------------------------------------------------


def _env_lookup(name: str, secret: str, environ: Mapping[str, str]) -> str:
    if name not in environ:
        raise EnvironmentProblem(
            f"secret {secret}: environment variable {name} is not set in the agent's environment"
        )
    return environ[name]


def resolve_secrets(
    spec: Mapping[str, Secret], *, environ: Mapping[str, str], base_dir: str | Path
) -> dict[str, str]:
    """Values of the workflow's ``secrets:`` (the parser checked their forms): ``env``, the
    agent's environment variable ``key``; ``file``, the content of file ``key`` (relative to
    the workflow directory) without its final newline."""
    values: dict[str, str] = {}
    for name, secret in spec.items():
        if secret.provider == "env":
            values[name] = _env_lookup(secret.key, name, environ)
            continue
        path = Path(base_dir, os.path.expanduser(secret.key))
        try:
            values[name] = path.read_text().removesuffix("\n")
        except OSError as exc:
            raise EnvironmentProblem(
                f"secret {name}: cannot read file {secret.key}: {exc.strerror or exc}"
            ) from None
    return values


def profile_values(profiles: Mapping[str, Mapping[str, str]], name: str | None) -> dict[str, str]:
    """The variables of profile ``name`` (the parser left its ``description`` out)."""
    if name is None:
        return {}
    chosen = profiles.get(name)
    if chosen is None:
        names = ", ".join(sorted(profiles)) or "none"
        raise EnvironmentProblem(f"profile {name!r} is not defined (defined: {names})")
    return dict(chosen)


def positional_args(args: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """``--args a b`` → (process env ``ARG_1=a``, ``ARG_2=b``; variables ``1``, ``2``,
    ``ARG_1``, ``ARG_2``), as Prodigy's ``$1`` / ``${ARG_1}``."""
    env = {f"ARG_{i}": value for i, value in enumerate(args, 1)}
    variables = {**env, **{str(i): value for i, value in enumerate(args, 1)}}
    return env, variables


@dataclass
class WorkflowEnvironment:
    env: dict[str, str] = field(default_factory=dict)
    """Process environment added to every step (secrets included)."""
    variables: dict[str, Any] = field(default_factory=dict)
    """Interpolation variables (env, profile, positional args, secrets)."""
    secrets: dict[str, str] = field(default_factory=dict)
    masker: Masker = field(default_factory=Masker)
    warnings: list[str] = field(default_factory=list)


def resolve_environment(
    workflow: Workflow,
    *,
    args: Sequence[str] = (),
    profile: str | None = None,
    environ: Mapping[str, str] | None = None,
    base_dir: str | Path = ".",
    with_secrets: bool = True,
) -> WorkflowEnvironment:
    """Everything a step's environment and variables get from the workflow file and the
    submission (see the module docstring for the layering). Raises
    :class:`EnvironmentProblem`; a missing env file is a warning, as in Prodigy.

    ``with_secrets=False`` leaves the secrets out: what a client (a dry run, an upload) can
    know of the agent's variables without the agent's own environment and mounts."""
    environ = os.environ if environ is None else environ
    arg_env, arg_vars = positional_args(args)
    file_values: dict[str, str] = {}
    warnings: list[str] = []
    for entry in workflow.env_files:
        path = Path(base_dir, os.path.expanduser(str(entry)))
        try:
            text = path.read_text()
        except FileNotFoundError:
            warnings.append(f"env file {entry} not found; skipped")
            continue
        except OSError as exc:
            raise EnvironmentProblem(f"env file {entry}: {exc.strerror or exc}") from None
        file_values.update(parse_env_file(text, source=str(entry)))
    scope = Variables({**file_values, **arg_vars})
    env = dict(file_values)
    env.update({k: render_text(v, scope) for k, v in workflow.env.items()})
    env.update(
        {k: render_text(v, scope) for k, v in profile_values(workflow.profiles, profile).items()}
    )
    env.update(arg_env)
    secrets = (
        resolve_secrets(workflow.secrets, environ=environ, base_dir=base_dir)
        if with_secrets
        else {}
    )
    variables: dict[str, Any] = {**env, **arg_vars, **secrets}
    return WorkflowEnvironment(
        env={**env, **secrets},
        variables=variables,
        secrets=secrets,
        masker=Masker(secrets.values()),
        warnings=warnings,
    )
