"""Typed reads of a composed YAML node tree, recording problems instead of raising.

The parser works on PyYAML *nodes* (``yaml.compose``), not on constructed Python values,
because only nodes keep the line and column each problem must carry. Every getter here either
returns a value or records a `Problem` at the node's position and returns None, so the parser
can keep going and report all errors in one run.

Scalars are read from their source text where the field is a string (``mode: 0644`` stays
``"0644"``, ``MAX: 5`` stays ``"5"``), which is how Prodigy's serde_yaml treats a plain scalar
given to a string field, and through PyYAML's resolver where a typed value is wanted.

The file may be hostile (it arrives over ``workflow.submit`` from anyone allowed to publish
there), so every walk here is bounded: `BoundedLoader` refuses nesting deeper than
`MAX_DEPTH` while composing (PyYAML's composer recurses once per level and would otherwise die
of `RecursionError`), `Reader.plain` stops after `MAX_PLAIN_VALUES` values (aliases let a few
lines expand exponentially: the "billion laughs"), numbers are only converted from short text
(`MAX_NUMBER_CHARS`; sexagesimal ints such as ``1:00:00:…`` cost quadratic time) and must fit in
64 bits, and problem messages are cut to `MAX_MESSAGE_CHARS` so a rejection stays small enough
to publish.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from jetreduce.contract.workflow.errors import ERROR, WARNING, Problem

_TAG = "tag:yaml.org,2002:"
NULL_TAG = _TAG + "null"
STR_TAG = _TAG + "str"
INT_TAG = _TAG + "int"
FLOAT_TAG = _TAG + "float"
BOOL_TAG = _TAG + "bool"

MAX_DEPTH = 64
"""Deepest nesting of collections a workflow may use. Real files need fewer than ten levels;
the bound keeps PyYAML's recursive composer (and every walk over the tree) far from Python's
recursion limit."""

MAX_PLAIN_VALUES = 100_000
"""Most values one verbatim copy (`Reader.plain`) may produce once aliases are expanded."""

MAX_NUMBER_CHARS = 100
"""Longest scalar text converted to a number: anything longer is not a number a workflow
means, and converting it may cost seconds (sexagesimal ints) or exceed Python's int limit."""

MAX_INT = 2**63 - 1
"""Largest integer accepted: what every JSON reader of the spec (and msgspec) can hold."""

MAX_MESSAGE_CHARS = 500
"""Longest problem message or path; user text quoted in one (a 1 MB key) is cut here."""

# Values that are JSON scalars; anything else a YAML constructor yields (dates, bytes, sets)
# is kept as its source text, so `extra` dicts stay JSON-serialisable.
_JSON_SCALARS = (str, int, float, bool, type(None))


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with a depth bound: composing a node deeper than `MAX_DEPTH`
    raises a `ComposerError` at that node, which the parser reports like any syntax error."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self._depth >= MAX_DEPTH:
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise ComposerError(
                None, None, f"nesting deeper than {MAX_DEPTH} levels is not supported", mark
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def join(path: str, key: str) -> str:
    """``join("map", "input") == "map.input"``; the root path is ``""``."""
    return f"{path}.{key}" if path else key


def index(path: str, position: int) -> str:
    """``index("map.agent_template", 1) == "map.agent_template[1]"``."""
    return f"{path}[{position}]"


def is_null(node: Node | None) -> bool:
    """True for an absent node or an explicit YAML null (``key:``, ``~``, ``null``)."""
    return node is None or (isinstance(node, ScalarNode) and node.tag == NULL_TAG)


def describe(node: Node) -> str:
    """A short, user-facing account of what a node holds, for "expected X, got Y" messages."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if isinstance(node, ScalarNode):
        if node.tag == NULL_TAG:
            return "null"
        text = str(node.value)
        if len(text) > 60:
            text = text[:57] + "..."
        return repr(text)
    return "an unsupported YAML node"


@dataclass
class Entry:
    """One ``key: value`` pair of a mapping, with both nodes for positions."""

    key: str
    key_node: Node
    value: Node


@dataclass
class Fields:
    """The entries of one YAML mapping, consumed field by field.

    `take` removes an entry, so whatever `rest` returns afterwards is the set of keys the
    caller did not understand: those become `extra` values or unknown-key warnings.
    """

    node: MappingNode
    path: str
    entries: dict[str, Entry] = field(default_factory=dict)

    def take(self, key: str) -> Node | None:
        """Remove and return the value node of ``key``; None when the key is absent."""
        entry = self.entries.pop(key, None)
        return None if entry is None else entry.value

    def take_present(self, key: str) -> Node | None:
        """Like `take`, but an explicit null counts as absent (``setup:`` with no value)."""
        node = self.take(key)
        return None if is_null(node) else node

    def has(self, key: str) -> bool:
        return key in self.entries

    def key_node(self, key: str) -> Node | None:
        entry = self.entries.get(key)
        return None if entry is None else entry.key_node

    def rest(self) -> list[Entry]:
        """Entries not taken yet, in file order; taking them empties the mapping."""
        remaining = list(self.entries.values())
        self.entries.clear()
        return remaining


class Reader:
    """Reads nodes into typed values and collects the problems found on the way."""

    def __init__(self, loader: yaml.SafeLoader) -> None:
        # The loader is kept for its constructor: resolving merge keys (`<<`) and building
        # typed scalars exactly as PyYAML would.
        self._loader = loader
        self._explicit_keys: dict[int, set[int]] = {}
        self._broken: set[int] = set()
        self.problems: list[Problem] = []

    # -- reporting -------------------------------------------------------------------------

    def error(self, path: str, message: str, node: Node | None) -> None:
        self.problems.append(_problem(path, message, node, ERROR))

    def warn(self, path: str, message: str, node: Node | None) -> None:
        self.problems.append(_problem(path, message, node, WARNING))

    def expected(self, path: str, what: str, node: Node) -> None:
        """Record the standard type error: ``expected <what>, got <describe(node)>``."""
        self.error(path, f"expected {what}, got {describe(node)}", node)

    # -- containers ------------------------------------------------------------------------

    def mapping(self, node: Node, path: str, what: str = "a mapping") -> Fields | None:
        """Entries of a mapping node, or None (with a problem) if it is not a usable mapping.

        Merge keys are resolved first. Duplicate keys are an error, as in serde_yaml, because
        PyYAML's silent last-one-wins would hide a real mistake in a hand-edited file.
        """
        if not isinstance(node, MappingNode):
            self.expected(path, what, node)
            return None
        explicit = self._explicit_keys.get(id(node))
        if explicit is None:
            # Remember which keys were written here before merging mutates `node.value`; a
            # node may be read twice (shape check, then verbatim copy).
            explicit = {id(key) for key, _value in node.value}
            self._explicit_keys[id(node)] = explicit
            try:
                self._loader.flatten_mapping(node)
            except yaml.MarkedYAMLError as exc:
                self.error(path, f"invalid merge key: {exc.problem}", node)
                self._broken.add(id(node))
        if id(node) in self._broken:
            return None
        fields = Fields(node=node, path=path)
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == NULL_TAG:
                self.error(path, f"keys must be strings, got {describe(key_node)}", key_node)
                continue
            key = str(key_node.value)
            previous = fields.entries.get(key)
            # Merged entries come first; a later one (explicit, or an earlier-listed merge
            # source) overrides them, as YAML's merge key specifies.
            if previous is not None and id(previous.key_node) in explicit:
                first = fields.entries[key].key_node.start_mark.line + 1
                self.error(
                    join(path, key), f"duplicate key (first defined on line {first})", key_node
                )
                continue
            fields.entries[key] = Entry(key, key_node, value_node)
        return fields

    def sequence(self, node: Node, path: str, what: str = "a list") -> list[Node] | None:
        if not isinstance(node, SequenceNode):
            self.expected(path, what, node)
            return None
        return list(node.value)

    # -- scalars ---------------------------------------------------------------------------

    def string(self, node: Node, path: str, *, non_empty: bool = False) -> str | None:
        """A scalar's source text. Numbers and booleans are accepted as written."""
        if not isinstance(node, ScalarNode) or node.tag == NULL_TAG:
            self.expected(path, "a string", node)
            return None
        text = str(node.value)
        if non_empty and not text.strip():
            self.error(path, "must not be empty", node)
            return None
        return text

    def boolean(self, node: Node, path: str) -> bool | None:
        value = self.scalar(node)
        if isinstance(node, ScalarNode) and node.tag == BOOL_TAG and isinstance(value, bool):
            return value
        self.expected(path, "true or false", node)
        return None

    def integer(self, node: Node, path: str, *, minimum: int | None = None) -> int | None:
        value = self.scalar(node)
        if not isinstance(node, ScalarNode) or node.tag != INT_TAG or not isinstance(value, int):
            self.expected(path, "an integer", node)
            return None
        return self.check_minimum(value, path, node, minimum)

    def number(self, node: Node, path: str) -> float | None:
        """A finite number: ``.nan`` and ``.inf`` are refused because every comparison with
        them is false, so a bound check (``multiplier >= 1``) would let them through."""
        value = self.scalar(node)
        if (
            not isinstance(node, ScalarNode)
            or node.tag not in (INT_TAG, FLOAT_TAG)
            or isinstance(value, bool)
            or not isinstance(value, int | float)
        ):
            self.expected(path, "a number", node)
            return None
        if isinstance(value, int) and abs(value) > MAX_INT:
            self.error(path, f"must be at most {MAX_INT}", node)
            return None
        if not math.isfinite(value):
            self.expected(path, "a finite number", node)
            return None
        return float(value)

    def check_minimum(self, value: int, path: str, node: Node, minimum: int | None) -> int | None:
        if minimum is not None and value < minimum:
            self.error(path, f"must be at least {minimum}, got {value}", node)
            return None
        if value > MAX_INT:
            self.error(path, f"must be at most {MAX_INT}", node)
            return None
        return value

    def scalar(self, node: Node) -> Any:
        """The resolved Python value of a scalar node (None for non-scalars or bad text).

        Numbers written with more than `MAX_NUMBER_CHARS` characters are not converted."""
        if not isinstance(node, ScalarNode):
            return None
        if node.tag in (INT_TAG, FLOAT_TAG) and len(str(node.value)) > MAX_NUMBER_CHARS:
            return None
        try:
            return self._loader.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError):
            return None

    # -- free-form values ------------------------------------------------------------------

    def plain(self, node: Node, path: str) -> Any:
        """A JSON-friendly Python value for a subtree kept verbatim (``extra`` dicts).

        Mapping keys become strings; scalars that are not JSON types (timestamps, binary) or
        that no JSON reader could hold (integers beyond 64 bits) keep their source text. A
        self-referencing alias is reported instead of recursing; a subtree that expands to
        more than `MAX_PLAIN_VALUES` values (an alias bomb) is reported and dropped.
        """
        budget = [MAX_PLAIN_VALUES]
        try:
            return self._plain(node, path, set(), budget)
        except _TooLarge:
            self.error(
                path,
                f"too large: more than {MAX_PLAIN_VALUES} values once YAML aliases are expanded",
                node,
            )
            return None

    def _plain(self, node: Node, path: str, active: set[int], budget: list[int]) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise _TooLarge
        if isinstance(node, ScalarNode):
            value = self.scalar(node)
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
                return str(node.value)
            return value if isinstance(value, _JSON_SCALARS) else str(node.value)
        if id(node) in active:
            self.error(path, "recursive YAML alias", node)
            return None
        active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                return [
                    self._plain(child, index(path, i), active, budget)
                    for i, child in enumerate(node.value)
                ]
            fields = self.mapping(node, path)
            if fields is None:
                return None
            return {
                entry.key: self._plain(entry.value, join(path, entry.key), active, budget)
                for entry in fields.rest()
            }
        finally:
            active.discard(id(node))


class _TooLarge(Exception):
    """`Reader.plain` ran out of its value budget (unwinds the walk in one step)."""


def _clip(text: str) -> str:
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    suffix = f"... ({len(text)} chars)"
    return text[: MAX_MESSAGE_CHARS - len(suffix)] + suffix


def _problem(path: str, message: str, node: Node | None, severity: str) -> Problem:
    path, message = _clip(path), _clip(message)
    if node is None:
        return Problem(path=path, message=message, severity=severity)
    mark = node.start_mark
    return Problem(
        path=path,
        message=message,
        line=mark.line + 1,
        column=mark.column + 1,
        severity=severity,
    )
