"""The ``when`` language: a step's condition, parsed at submit, evaluated at run time.

Grammar (recursive descent): ``or := and (|| and)*``, ``and := not (&& not)*``,
``not := ! not | cmp``, ``cmp := atom (op atom)?``, ``atom := ( or ) | literal | ref``, with
``and``/``or``/``not`` as keyword spellings, comparisons ``== = != > < >= <=``, literals quoted
strings, numbers, ``true``, ``false``, ``null`` and bare words (strings), and references
``${path}``, ``${path:-default}``, ``$NAME``, ``$1``.

`parse_when` turns the text into a tree once; the parser (`lang.parse`) calls it so a syntax
error is refused at ``jetreduce validate`` and submit with its line and column.
`evaluate_when` resolves references to *values* (never pasted into the text), so an item's data
cannot change the expression's structure; an undefined reference is null (false).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from jetreduce.contract.errors import PermanentError
from jetreduce.lang.interpolate import Variables, render_value

__all__ = ["MAX_WHEN_DEPTH", "When", "WhenError", "evaluate_when", "parse_when"]


class WhenError(PermanentError, ValueError):
    """A ``when`` expression that does not parse."""


_TOKEN: Final = re.compile(
    r"""\s*(?:
        (?P<ref>\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*|\$[0-9])
      | (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
      | (?P<op>&&|\|\||==|!=|>=|<=|=|>|<|!|\(|\))
      | (?P<word>[^\s()!=<>&|'"$]+)
    )""",
    re.VERBOSE,
)
NUMBER_TEXT: Final = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
"""A number as a capture or a ``when`` literal writes it."""
_KEYWORDS: Final = {"and": "&&", "or": "||", "not": "!"}
_COMPARISONS: Final = ("==", "!=", ">", "<", ">=", "<=")


@dataclass(frozen=True)
class _Ref:
    path: str
    default: str | None
    """``${path:-default}``: the text used when ``path`` is undefined (None: null)."""


@dataclass(frozen=True)
class _Lit:
    value: Any


@dataclass(frozen=True)
class _Not:
    operand: _Node


@dataclass(frozen=True)
class _Bool:
    op: str
    """``&&`` or ``||``."""
    left: _Node
    right: _Node


@dataclass(frozen=True)
class _Cmp:
    op: str
    left: _Node
    right: _Node


_Node = _Ref | _Lit | _Not | _Bool | _Cmp


@dataclass(frozen=True)
class When:
    """A parsed ``when`` expression; evaluate it with `evaluate_when`."""

    text: str
    root: _Node


MAX_WHEN_DEPTH: Final = 200
"""Deepest expression tree accepted: evaluation recurses once per level, and a condition
nested deeper than this is no condition a person wrote."""


@functools.lru_cache(maxsize=1024)
def parse_when(text: str) -> When:
    """Parse ``text``; raises `WhenError` naming what is wrong. Cached: the same step's
    condition is evaluated once per item, and it is parsed once per process."""
    try:
        root = _Parser(text).parse()
    except RecursionError:
        raise WhenError(f"nested more than {MAX_WHEN_DEPTH} levels deep") from None
    if _depth(root) > MAX_WHEN_DEPTH:
        raise WhenError(f"nested more than {MAX_WHEN_DEPTH} levels deep")
    return When(text, root)


def _depth(root: _Node) -> int:
    """Levels of the tree (counted without recursion: it may be a long chain of ``&&``)."""
    deepest = 0
    stack: list[tuple[_Node, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(node, _Not):
            stack.append((node.operand, depth + 1))
        elif isinstance(node, _Bool | _Cmp):
            stack.extend(((node.left, depth + 1), (node.right, depth + 1)))
    return deepest


def evaluate_when(expression: str | When, variables: Mapping[str, Any] | Variables) -> bool:
    """Whether a step with this ``when`` runs. Raises `WhenError` for text that does not parse
    (never for a parsed `When`)."""
    when = parse_when(expression) if isinstance(expression, str) else expression
    scope = variables if isinstance(variables, Variables) else Variables(variables)
    return truthy(_value(when.root, scope))


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[tuple[str, Any]] = []
        pos = 0
        while pos < len(text):
            if not text[pos:].strip():
                break
            m = _TOKEN.match(text, pos)
            if m is None or m.end() == pos:
                raise WhenError(f"unexpected {text[pos:].strip()[:20]!r} in when: {text!r}")
            pos = m.end()
            kind = m.lastgroup
            raw = m.group(kind or "word")
            if kind == "ref":
                self.tokens.append(("val", _reference(raw)))
            elif kind == "str":
                self.tokens.append(("val", _Lit(_unquote(raw))))
            elif kind == "op":
                self.tokens.append(("op", "==" if raw == "=" else raw))
            else:
                self.tokens.append(_word(raw))
        self.pos = 0

    def peek(self) -> tuple[str, Any] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take_op(self, *ops: str) -> str | None:
        token = self.peek()
        if token is not None and token[0] == "op" and token[1] in ops:
            self.pos += 1
            return str(token[1])
        return None

    def parse(self) -> _Node:
        if not self.tokens:
            raise WhenError("empty when expression")
        node = self.or_()
        if self.peek() is not None:
            raise WhenError(f"unexpected {_shown(self.peek())} in when: {self.text!r}")
        return node

    def or_(self) -> _Node:
        node = self.and_()
        while self.take_op("||"):
            node = _Bool("||", node, self.and_())
        return node

    def and_(self) -> _Node:
        node = self.not_()
        while self.take_op("&&"):
            node = _Bool("&&", node, self.not_())
        return node

    def not_(self) -> _Node:
        if self.take_op("!"):
            return _Not(self.not_())
        return self.cmp()

    def cmp(self) -> _Node:
        left = self.atom()
        op = self.take_op(*_COMPARISONS)
        if op is None:
            return left
        return _Cmp(op, left, self.atom())

    def atom(self) -> _Node:
        if self.take_op("("):
            node = self.or_()
            if not self.take_op(")"):
                raise WhenError(f"missing ')' in when: {self.text!r}")
            return node
        token = self.peek()
        if token is None or token[0] != "val":
            found = "end of expression" if token is None else _shown(token)
            raise WhenError(f"expected a value, found {found} in when: {self.text!r}")
        self.pos += 1
        value: _Node = token[1]
        return value


def _shown(token: tuple[str, Any] | None) -> str:
    if token is None:
        return "end of expression"
    value = token[1]
    if isinstance(value, _Lit):
        return repr(value.value)
    if isinstance(value, _Ref):
        return repr("${" + value.path + "}")
    return repr(value)


def _reference(raw: str) -> _Ref:
    if raw.startswith("${"):
        path, sep, default = raw[2:-1].partition(":-")
        return _Ref(path.strip(), default if sep else None)
    return _Ref(raw[1:], None)


def _word(raw: str) -> tuple[str, Any]:
    lower = raw.lower()
    if lower in _KEYWORDS:
        return ("op", _KEYWORDS[lower])
    if lower in ("true", "false"):
        return ("val", _Lit(lower == "true"))
    if lower == "null":
        return ("val", _Lit(None))
    if NUMBER_TEXT.fullmatch(raw):
        return ("val", _Lit(float(raw) if any(c in raw for c in ".eE") else int(raw)))
    return ("val", _Lit(raw))  # a bare word is a string, as in Prodigy's filter grammar


def _unquote(raw: str) -> str:
    return re.sub(r"\\(.)", r"\1", raw[1:-1])


def _value(node: _Node, scope: Variables) -> Any:
    if isinstance(node, _Lit):
        return node.value
    if isinstance(node, _Ref):
        try:
            return scope.resolve(node.path)
        except KeyError:
            return node.default  # an undefined variable is null (false) unless defaulted
    if isinstance(node, _Not):
        return not truthy(_value(node.operand, scope))
    if isinstance(node, _Bool):
        left = truthy(_value(node.left, scope))
        right = truthy(_value(node.right, scope))  # no short cut: resolving has no effects
        return (left and right) if node.op == "&&" else (left or right)
    return _compare(_value(node.left, scope), node.op, _value(node.right, scope))


def as_number(value: Any) -> float | None:
    """A number, or text that reads as one; None for anything else (booleans included)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and NUMBER_TEXT.fullmatch(value.strip()):
        return float(value)
    return None


def truthy(value: Any) -> bool:
    """Truthiness of a variable as a shell user expects it: ``false``, ``0``, ``no``, ``off``,
    empty and null are false; numbers are true unless zero; other strings are true."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0 and not (isinstance(value, float) and math.isnan(value))
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "false", "no", "off", "null"):
            return False
        number = as_number(text)
        return number != 0 if number is not None else True
    return bool(value)


def _compare(left: Any, op: str, right: Any) -> bool:
    """Numbers compare as numbers (a captured ``"80"`` equals ``80``), anything else as its
    rendered text (``true`` equals ``"true"``); null equals only null, and orders nothing."""
    ln, rn = as_number(left), as_number(right)
    if op in ("==", "!="):
        if left is None or right is None:
            equal = left is None and right is None
        elif ln is not None and rn is not None:
            equal = ln == rn
        else:
            equal = render_value(left) == render_value(right)
        return equal if op == "==" else not equal
    if left is None or right is None:
        return False
    a: Any
    b: Any
    if ln is not None and rn is not None:
        a, b = ln, rn
    else:
        a, b = render_value(left), render_value(right)
    if op == ">":
        return bool(a > b)
    if op == "<":
        return bool(a < b)
    if op == ">=":
        return bool(a >= b)
    return bool(a <= b)
