"""A workflow's environment keys → typed values: ``secrets``, ``env_files``, ``profiles``.

Only where a value comes from is parsed here; reading the environment, the files and the
secrets is the agent's job (`worker/secrets.py`), since only the agent sees its pod's mounts.
"""

from __future__ import annotations

import re

from yaml.nodes import MappingNode, Node

from jetreduce.contract.workflow.model import Secret
from jetreduce.lang._fields import FieldParser
from jetreduce.lang._yaml_nodes import index, join

__all__ = ["SECRET_PROVIDERS", "EnvironmentParser"]

SECRET_PROVIDERS = ("env", "file")
"""Providers an agent can read. Prodigy also names ``vault``, ``aws`` and ``custom``: refused
here with that reason, instead of failing every agent at start."""
_UNSUPPORTED_PROVIDERS = ("vault", "aws", "custom")

_ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class EnvironmentParser(FieldParser):
    def secrets(self, node: Node, path: str) -> dict[str, Secret]:
        """A string is ``"${env:NAME}"`` (or ``"${NAME}"``, ``$NAME``, Prodigy's plain
        ``NAME``): the agent's environment variable; a mapping is ``{provider, key}``."""
        fields = self.r.mapping(node, path, "a mapping of secret names")
        if fields is None:
            return {}
        result: dict[str, Secret] = {}
        for entry in fields.rest():
            entry_path = join(path, entry.key)
            secret = (
                self.secret_mapping(entry.value, entry_path)
                if isinstance(entry.value, MappingNode)
                else self.secret_reference(entry.value, entry_path)
            )
            if secret is not None:
                result[entry.key] = secret
        return result

    def secret_reference(self, node: Node, path: str) -> Secret | None:
        text = self.r.string(node, path)
        if text is None:
            return None
        text = text.strip()
        m = _ENV_REF.fullmatch(text)
        if m is not None:
            return Secret(provider="env", key=m.group(1) or m.group(2))
        name = text[1:] if text.startswith("$") else text
        if _IDENT.fullmatch(name):
            return Secret(provider="env", key=name)
        self.r.error(
            path,
            'expected "${env:NAME}" or {provider, key}: secret values must not be written in '
            "the workflow file",
            node,
        )
        return None

    def secret_mapping(self, node: MappingNode, path: str) -> Secret | None:
        fields = self.r.mapping(node, path)
        if fields is None:
            return None
        provider_node = self.require(fields, "provider")
        provider = None
        if provider_node is not None:
            provider_path = join(path, "provider")
            text = self.r.string(provider_node, provider_path)
            if text in _UNSUPPORTED_PROVIDERS:
                self.r.error(
                    provider_path,
                    f"provider {text!r} is not supported (supported: "
                    f"{', '.join(SECRET_PROVIDERS)}): agents read secrets from their own "
                    "environment or files",
                    provider_node,
                )
            elif text is not None:
                provider = self.choice(provider_node, provider_path, SECRET_PROVIDERS)
        key_node = self.require(fields, "key")
        key = (
            self.r.string(key_node, join(path, "key"), non_empty=True)
            if key_node is not None
            else None
        )
        self.warn_unknown(fields, ("provider", "key"))
        if provider is None or key is None:
            return None
        return Secret(provider=provider, key=key)

    def env_files(self, node: Node, path: str) -> list[str]:
        items = self.r.sequence(node, path, "a list of file paths")
        files = []
        for i, item in enumerate(items or ()):
            name = self.r.string(item, index(path, i), non_empty=True)
            if name is not None:
                files.append(name)
        return files

    def profiles(self, node: Node, path: str) -> dict[str, dict[str, str]]:
        """Profile name → its variables; a profile's ``description`` is not a variable."""
        fields = self.r.mapping(node, path, "a mapping of profile names")
        if fields is None:
            return {}
        result: dict[str, dict[str, str]] = {}
        for entry in fields.rest():
            values = self.env(entry.value, join(path, entry.key))
            values.pop("description", None)
            result[entry.key] = values
        return result
