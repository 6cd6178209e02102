"""The ``map.filter`` expression language (Prodigy's grammar), compiled to a predicate.

Grammar (OR binds loosest)::

    expr     := and (('||' | OR) and)*
    and      := unary (('&&' | AND) unary)*
    unary    := '!' unary | '(' expr ')' | call | test
    call     := FUNC '(' path [',' literal] ')'
    test     := path ('==' | '=' | '!=' | '>' | '<' | '>=' | '<=') literal
              | path 'in' '[' literal (',' literal)* ']'
    literal  := 'str' | "str" | true | false | null | number | bareword (a string)

Semantics follow Prodigy's live code (``data_pipeline/filter.rs``), not its docs:

* Paths are relative to the item, with **no** ``item.`` prefix: Prodigy's docs often write
  ``item.score > 5``, which looks for a field called ``item`` and so never matches.
* A missing field ``== null`` is true; ``!=`` is the negation of ``==``.
* ``<``, ``>``, ``<=``, ``>=`` compare number with number or string with string only;
  anything else is false.
* ``in`` list values are always strings, so ``priority in [1, 2]`` never matches a number.
* ``is_null(f)`` is true only for a present null (a missing field is neither null nor
  not-null), unlike ``f == null``.
* ``contains``/``starts_with``/``ends_with``/``matches`` apply to string fields only;
  ``matches`` searches (it is not anchored); ``length(f, N)`` is true when a string (in
  characters), array or object has exactly N elements.

Deliberate differences, each one where Prodigy silently misbehaves: numbers compare by value
(Prodigy's ``n == 5`` misses integer 5 because it parses 5 as a float), unknown functions,
bad regexes and trailing garbage are errors at compile time instead of "never matches", and
string literals may contain the operators that Prodigy's split-based parser trips on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from jetreduce.lang.pipeline.jsonpath import MISSING, PipelineError, lookup, parse_field_path

__all__ = ["FUNCTIONS", "compile_filter", "json_equal", "validate_filter"]

Predicate = Callable[[Any], bool]

_TYPE_TESTS: Final[dict[str, Callable[[Any], bool]]] = {
    "is_null": lambda v: v is None,
    "is_not_null": lambda v: v is not None,
    "is_number": lambda v: _is_number(v),
    "is_string": lambda v: isinstance(v, str),
    "is_bool": lambda v: isinstance(v, bool),
    "is_array": lambda v: isinstance(v, list),
    "is_object": lambda v: isinstance(v, Mapping),
}
_STRING_TESTS: Final[dict[str, Callable[[str, str], bool]]] = {
    "contains": lambda s, x: x in s,
    "starts_with": lambda s, x: s.startswith(x),
    "ends_with": lambda s, x: s.endswith(x),
}
FUNCTIONS: Final = frozenset({*_TYPE_TESTS, *_STRING_TESTS, "matches", "length"})
"""Every function name the filter language knows."""

_INTEGER = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_WORD_STOP = frozenset(" \t\r\n()[],'\"=!<>&|")
_INDEX = re.compile(r"\[\d+\]")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values without Python's ``True == 1`` and ``1 == 1.0``-vs-bool traps."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) or _is_number(b):
        return _is_number(a) and _is_number(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and bool(a == b)


# --- lexer -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # "(" ")" "[" "]" "," OP NOT AND OR IN STR WORD EOF
    text: str  # operator text, string content, or the word
    pos: int


_OPERATORS = ("==", "!=", ">=", "<=", "&&", "||", "=", ">", "<", "!")


def _lex(expr: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c.isspace():
            i += 1
        elif c in "()[],":
            toks.append(_Tok(c, c, i))
            i += 1
        elif c in "'\"":
            end = expr.find(c, i + 1)
            if end < 0:
                raise PipelineError("unterminated string", expression=expr, position=i)
            toks.append(_Tok("STR", expr[i + 1 : end], i))
            i = end + 1
        elif c in "=!<>&|":
            op = next((o for o in _OPERATORS if expr.startswith(o, i)), None)
            if op is None:
                raise PipelineError(f"unexpected {c!r}", expression=expr, position=i)
            kind = {"&&": "AND", "||": "OR", "!": "NOT"}.get(op, "OP")
            toks.append(_Tok(kind, op, i))
            i += len(op)
        else:
            start = i
            while i < n and expr[i] not in _WORD_STOP:
                i += 1
                m = _INDEX.match(expr, i)  # a path like tags[0].name stays one word
                while m is not None:
                    i = m.end()
                    m = _INDEX.match(expr, i)
            word = expr[start:i]
            upper = word.upper()
            kind = upper if upper in ("AND", "OR") else "IN" if word in ("in", "IN") else "WORD"
            toks.append(_Tok(kind, word, start))
    toks.append(_Tok("EOF", "", n))
    return toks


# --- parser ----------------------------------------------------------------------------------


def _literal(tok: _Tok) -> Any:
    """Value of a comparison operand: quoted → string; true/false/null/number; else string."""
    if tok.kind == "STR":
        return tok.text
    if tok.text == "true":
        return True
    if tok.text == "false":
        return False
    if tok.text == "null":
        return None
    if _INTEGER.fullmatch(tok.text):
        return int(tok.text)
    if _NUMBER.fullmatch(tok.text):
        return float(tok.text)
    return tok.text


def _compare(op: str, expected: Any) -> Callable[[Any], bool]:
    """A test on the looked-up value (possibly MISSING) for one comparison operator."""
    if op in ("==", "="):
        if expected is None:
            return lambda v: v is None or v is MISSING
        return lambda v: v is not MISSING and json_equal(v, expected)
    if op == "!=":
        eq = _compare("==", expected)
        return lambda v: not eq(v)
    ordering: dict[str, Callable[[Any, Any], bool]] = {
        ">": lambda a, b: a > b,
        "<": lambda a, b: a < b,
        ">=": lambda a, b: a >= b,
        "<=": lambda a, b: a <= b,
    }
    cmp = ordering[op]
    if _is_number(expected):
        return lambda v: _is_number(v) and cmp(v, expected)
    if isinstance(expected, str):
        return lambda v: isinstance(v, str) and cmp(v, expected)
    return lambda v: False


class _Parser:
    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.toks = _lex(expr)
        self.i = 0

    def error(self, msg: str, tok: _Tok | None = None) -> PipelineError:
        tok = tok or self.peek()
        return PipelineError(msg, expression=self.expr, position=tok.pos)

    def peek(self, ahead: int = 0) -> _Tok:
        return self.toks[min(self.i + ahead, len(self.toks) - 1)]

    def take(self, kind: str, what: str) -> _Tok:
        tok = self.peek()
        if tok.kind != kind:
            found = "end of expression" if tok.kind == "EOF" else repr(tok.text)
            raise self.error(f"expected {what}, found {found}")
        self.i += 1
        return tok

    def parse(self) -> Predicate:
        if self.peek().kind == "EOF":
            raise self.error("empty filter expression")
        pred = self.or_expr()
        if self.peek().kind != "EOF":
            raise self.error(f"unexpected {self.peek().text!r}")
        return pred

    def or_expr(self) -> Predicate:
        parts = [self.and_expr()]
        while self.peek().kind == "OR":
            self.i += 1
            parts.append(self.and_expr())
        if len(parts) == 1:
            return parts[0]
        return lambda item: any(p(item) for p in parts)

    def and_expr(self) -> Predicate:
        parts = [self.unary()]
        while self.peek().kind == "AND":
            self.i += 1
            parts.append(self.unary())
        if len(parts) == 1:
            return parts[0]
        return lambda item: all(p(item) for p in parts)

    def unary(self) -> Predicate:
        tok = self.peek()
        if tok.kind == "NOT":
            self.i += 1
            inner = self.unary()
            return lambda item: not inner(item)
        if tok.kind == "(":
            self.i += 1
            inner = self.or_expr()
            self.take(")", "')'")
            return inner
        if tok.kind == "WORD" and self.peek(1).kind == "(":
            return self.call()
        return self.test()

    def path(self) -> tuple[str | int, ...]:
        tok = self.take("WORD", "a field path")
        try:
            return parse_field_path(tok.text)
        except PipelineError as e:
            msg = f"invalid field path {tok.text!r}"
            raise self.error(msg, tok) from e

    def operand(self) -> _Tok:
        tok = self.peek()
        if tok.kind not in ("STR", "WORD"):
            found = "end of expression" if tok.kind == "EOF" else repr(tok.text)
            raise self.error(f"expected a value, found {found}")
        self.i += 1
        return tok

    def test(self) -> Predicate:
        path = self.path()
        tok = self.peek()
        if tok.kind == "IN":
            self.i += 1
            self.take("[", "'['")
            values: list[str] = []
            if self.peek().kind != "]":
                values.append(self.operand().text)
                while self.peek().kind == ",":
                    self.i += 1
                    values.append(self.operand().text)
            self.take("]", "']'")
            allowed = frozenset(values)
            return lambda item: _in(lookup(item, path), allowed)
        if tok.kind != "OP":
            raise self.error("expected a comparison operator or 'in'")
        self.i += 1
        check = _compare(tok.text, _literal(self.operand()))
        return lambda item: check(lookup(item, path))

    def call(self) -> Predicate:
        name_tok = self.take("WORD", "a function name")
        name = name_tok.text
        if name not in FUNCTIONS:
            known = ", ".join(sorted(FUNCTIONS))
            raise self.error(f"unknown function {name!r} (known: {known})", name_tok)
        self.take("(", "'('")
        path = self.path()
        arg: _Tok | None = None
        if self.peek().kind == ",":
            self.i += 1
            arg = self.operand()
        close = self.take(")", "')'")
        wants_arg = name not in _TYPE_TESTS
        if wants_arg and arg is None:
            raise self.error(f"{name}() takes a field and a value", close)
        if not wants_arg and arg is not None:
            raise self.error(f"{name}() takes only a field", arg)
        if arg is None:
            type_test = _TYPE_TESTS[name]
            return lambda item: _present_and(lookup(item, path), type_test)
        if name == "length":
            expected = _literal(arg)
            if not _is_number(expected):
                raise self.error("length() needs a number", arg)
            return lambda item: _length(lookup(item, path)) == expected
        if name == "matches":
            try:
                regex = re.compile(arg.text)
            except re.error as e:
                raise self.error(f"invalid regex {arg.text!r}: {e}", arg) from e
            return lambda item: _string_and(lookup(item, path), lambda s: bool(regex.search(s)))
        str_test = _STRING_TESTS[name]
        needle = arg.text
        return lambda item: _string_and(lookup(item, path), lambda s: str_test(s, needle))


def _in(value: Any, allowed: frozenset[str]) -> bool:
    return isinstance(value, str) and value in allowed


def _present_and(value: Any, test: Callable[[Any], bool]) -> bool:
    return value is not MISSING and test(value)


def _string_and(value: Any, test: Callable[[str], bool]) -> bool:
    return isinstance(value, str) and test(value)


def _length(value: Any) -> int | None:
    if isinstance(value, str | list | Mapping):
        return len(value)
    return None


def compile_filter(expr: str) -> Callable[[Any], bool]:
    """Compile ``expr`` once into a predicate over one item.

    Raises :class:`PipelineError` (with the character position) for syntax errors, unknown
    functions, wrong arity and invalid regexes, so a bad filter fails at submit time rather
    than silently dropping every item.
    """
    return _Parser(expr).parse()


def validate_filter(expr: str) -> None:
    """Raise :class:`PipelineError` if ``expr`` is not a valid filter expression."""
    compile_filter(expr)
