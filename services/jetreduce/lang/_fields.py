"""Typed field readers shared by the workflow parser's sections (`lang.parse`, `_steps`,
`_policy`): strings, integers and durations (also from ``$VAR``), choices, and the
unknown-key warnings. One duration rule for the whole language lives here (`duration`)."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping

from yaml.nodes import MappingNode, Node, ScalarNode

from jetreduce.contract.workflow.durations import parse_duration
from jetreduce.lang._yaml_nodes import (
    FLOAT_TAG,
    INT_TAG,
    NULL_TAG,
    STR_TAG,
    Fields,
    Reader,
    describe,
    join,
)

__all__ = ["MAX_DURATION_S", "FieldParser"]

# Keys people write from Prodigy's docs in the wrong place: say where they belong.
_MISPLACED_HINTS: dict[str, str] = {
    "retry_config": "it belongs under `error_policy:`",
    "circuit_breaker": "it belongs under `error_policy:`",
    "max_parallel": "it belongs under `map:`",
    "agent_template": "it belongs under `map:`",
    "agent_timeout_secs": "it belongs under `map:`",
    "timeout_config": "it belongs under `map:`",
    "input": "it belongs under `map:`",
}

_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
# ASCII digits only: `\d` also matches digits `int()` refuses ('²') or reads as another
# number ('١٢'), and the length bound keeps `int()` under Python's 4300-digit limit.
DECIMAL = re.compile(r"[0-9]{1,19}")

MAX_DURATION_S = 1e9
"""Longest duration accepted (about 31 years): below ``threading.TIMEOUT_MAX``, so any timeout
we accept can be handed to a wait without an OverflowError."""

_DURATION_EXPECTED = "a number of seconds, a duration such as '30s', or $VAR"


class FieldParser:
    """The `Reader` (problems), the variable scope for ``$VAR`` and the typed field readers."""

    def __init__(self, reader: Reader, process_env: Mapping[str, str] | None) -> None:
        self.r = reader
        self.process_env = process_env
        # Filled from the file's `env:` before anything that may reference it is read.
        self.workflow_env: dict[str, str] = {}

    def env(self, node: Node, path: str, *, top_level: bool = False) -> dict[str, str]:
        """``map<string, string>``; numbers and booleans are kept as written (``5``, ``true``)."""
        fields = self.r.mapping(node, path, "a mapping of variable names to strings")
        if fields is None:
            return {}
        result: dict[str, str] = {}
        for entry in fields.rest():
            entry_path = join(path, entry.key)
            value = entry.value
            if isinstance(value, ScalarNode) and value.tag != NULL_TAG:
                result[entry.key] = str(value.value)
            elif isinstance(value, MappingNode):
                hint = " (put secret values under top-level `secrets:`)" if top_level else ""
                self.r.error(
                    entry_path,
                    "expected a string value, got a mapping: env values must be strings in "
                    f"MapReduce workflows, and Prodigy rejects this too{hint}",
                    entry.key_node,
                )
            elif isinstance(value, ScalarNode):
                self.r.error(
                    entry_path, 'expected a string value, got null (write "" for empty)', value
                )
            else:
                self.r.expected(entry_path, "a string value", value)
        return result

    # -- typed field helpers ---------------------------------------------------------------

    def require(self, fields: Fields, key: str, path: str | None = None) -> Node | None:
        """The value node of a required key; a missing key is reported at the mapping."""
        base = fields.path if path is None else path
        if not fields.has(key):
            self.r.error(join(base, key), "required key is missing", fields.node)
            return None
        return fields.take(key)

    def required_string(self, fields: Fields, key: str) -> str | None:
        node = self.require(fields, key)
        return None if node is None else self.r.string(node, join(fields.path, key), non_empty=True)

    def optional_string(
        self, fields: Fields, key: str, path: str, *, non_empty: bool = False
    ) -> str | None:
        node = fields.take_present(key)
        return None if node is None else self.r.string(node, join(path, key), non_empty=non_empty)

    def optional_int(
        self, fields: Fields, key: str, path: str, *, minimum: int | None = None
    ) -> int | None:
        node = fields.take_present(key)
        return None if node is None else self.r.integer(node, join(path, key), minimum=minimum)

    def choice(self, node: Node, path: str, allowed: Iterable[str]) -> str | None:
        options = tuple(allowed)
        text = self.r.string(node, path)
        if text is None:
            return None
        if text not in options:
            self.r.error(path, f"expected one of {', '.join(options)}, got {text!r}", node)
            return None
        return text

    def lookup(self, name: str, path: str, node: Node) -> str | None:
        """``$name`` from the workflow env, then the caller's env (Prodigy's order)."""
        if name in self.workflow_env:
            return self.workflow_env[name]
        if self.process_env is not None and name in self.process_env:
            return self.process_env[name]
        where = "the workflow env" + (" or the environment" if self.process_env is not None else "")
        self.r.error(path, f"variable {name} not found in {where}", node)
        return None

    def variable(self, node: Node) -> str | None:
        """The variable name if ``node`` is exactly ``$NAME`` or ``${NAME}``."""
        if not isinstance(node, ScalarNode) or node.tag != STR_TAG:
            return None
        match = _VAR.fullmatch(str(node.value).strip())
        if match is None:
            return None
        return match.group(1) or match.group(2)

    def int_or_var(self, node: Node, path: str, *, minimum: int) -> int | None:
        """An integer, a quoted integer, or ``$VAR`` naming one (``max_parallel``)."""
        name = self.variable(node)
        if name is not None:
            raw = self.lookup(name, path, node)
            if raw is None:
                return None
            if not DECIMAL.fullmatch(raw.strip()):
                self.r.error(path, f"variable {name} = {raw!r} is not an integer", node)
                return None
            return self.r.check_minimum(int(raw.strip()), path, node, minimum)
        if (
            isinstance(node, ScalarNode)
            and node.tag == STR_TAG
            and DECIMAL.fullmatch(str(node.value).strip())
        ):
            return self.r.check_minimum(int(str(node.value).strip()), path, node, minimum)
        if isinstance(node, ScalarNode) and node.tag == INT_TAG:
            return self.r.integer(node, path, minimum=minimum)
        self.r.expected(path, "an integer or $VAR", node)
        return None

    def duration(self, node: Node, path: str, *, positive: bool) -> float | None:
        """Seconds from a number, a humantime string, ``{secs, nanos}``, or ``$VAR`` naming
        either of the first two. ``positive`` rejects 0, which as a timeout would kill every
        command before it starts."""
        seconds = self._duration(node, path)
        if seconds is not None and not (math.isfinite(seconds) and seconds <= MAX_DURATION_S):
            self.r.error(path, f"must be at most {MAX_DURATION_S:.0f} seconds", node)
            return None
        if seconds is not None and positive and seconds <= 0:
            self.r.error(path, f"must be greater than 0, got {seconds:g}", node)
            return None
        return seconds

    def _duration(self, node: Node, path: str) -> float | None:
        r = self.r
        name = self.variable(node)
        if name is not None:
            raw = self.lookup(name, path, node)
            if raw is None:
                return None
            try:
                return parse_duration(raw)
            except ValueError:
                r.error(
                    path,
                    f"variable {name} = {raw!r} is not a number of seconds or a duration",
                    node,
                )
                return None
        if isinstance(node, ScalarNode) and node.tag in (INT_TAG, FLOAT_TAG):
            value = r.number(node, path)
            if value is not None and value < 0:
                r.error(path, f"must not be negative, got {value:g}", node)
                return None
            return value
        if isinstance(node, ScalarNode) and node.tag == STR_TAG:
            try:
                return parse_duration(str(node.value))
            except ValueError as exc:
                message = f"expected {_DURATION_EXPECTED}, got {describe(node)}"
                detail = str(exc).split(": ", 1)[-1]
                if detail.startswith("unknown unit"):
                    message += f" ({detail})"
                r.error(path, message, node)
                return None
        if isinstance(node, MappingNode):
            return self.secs_nanos(node, path)
        r.expected(path, _DURATION_EXPECTED, node)
        return None

    def secs_nanos(self, node: MappingNode, path: str) -> float | None:
        """serde's ``Duration`` shape ``{secs, nanos}``, as Prodigy's retry_config writes it."""
        fields = self.r.mapping(node, path)
        if fields is None:
            return None
        secs_node = self.require(fields, "secs")
        secs = (
            self.r.integer(secs_node, join(path, "secs"), minimum=0)
            if secs_node is not None
            else None
        )
        nanos_node = fields.take_present("nanos")
        nanos = (
            self.r.integer(nanos_node, join(path, "nanos"), minimum=0)
            if nanos_node is not None
            else 0
        )
        self.warn_unknown(fields, ("secs", "nanos"))
        if secs is None or nanos is None:
            return None
        return secs + nanos / 1e9

    def warn_unknown(self, fields: Fields, known: Iterable[str]) -> None:
        """Warn about every key left in ``fields``: Prodigy ignores unknown keys silently, so
        they are not errors here either, but a typo should not pass unnoticed."""
        choices = list(known)
        for entry in fields.rest():
            message = f"unknown key {entry.key!r} is ignored"
            hint = _MISPLACED_HINTS.get(entry.key) if fields.path == "" else None
            close = difflib.get_close_matches(entry.key, choices, n=1)
            if hint:
                message += f"; {hint}"
            elif close:
                message += f"; did you mean {close[0]!r}?"
            self.r.warn(join(fields.path, entry.key), message, entry.key_node)
