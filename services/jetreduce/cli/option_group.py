"""Options that several commands take, declared once as a dataclass whose fields are typer
options (``Annotated[..., typer.Option(...)]`` with a default).

Typer has no parameter groups: it builds a command's options from the function's
signature. :func:`expand_groups` gives it a signature in which each parameter typed with such
a dataclass stands as that dataclass's fields, in field order, and calls the command with
the parsed values gathered back into one instance. Commands that share a set of options
(``run`` and ``submit``; ``service`` and ``services up``) then declare it in one place, and
what they do with it (build ``SubmitOptions``, serve) takes that one object, so an option
added to the set reaches every command that has it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["expand_groups"]

R = TypeVar("R")


def expand_groups(command: Callable[..., R]) -> Callable[..., R]:
    """``command`` as typer should see it: every parameter annotated with a dataclass
    replaced by the dataclass's fields (their annotations and defaults as declared there).
    A field named like another parameter of the command is a mistake: refused here, at
    import, rather than one option silently shadowing the other."""
    hints = typing.get_type_hints(command, include_extras=True)
    shown: list[inspect.Parameter] = []
    groups: dict[str, tuple[type[Any], tuple[str, ...]]] = {}
    for param in inspect.signature(command).parameters.values():
        hint = hints.get(param.name, param.annotation)
        if not (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
            shown.append(param.replace(annotation=hint, kind=inspect.Parameter.KEYWORD_ONLY))
            continue
        fields = _fields(hint)
        groups[param.name] = (hint, tuple(f.name for f in fields))
        shown.extend(fields)
    names = [p.name for p in shown]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise TypeError(f"{command.__qualname__}: options declared twice: {', '.join(clashes)}")

    @functools.wraps(command)
    def parsed(**values: Any) -> R:
        for name, (group, fields) in groups.items():
            values[name] = group(**{f: values.pop(f) for f in fields})
        return command(**values)

    # Typer reads the signature (already evaluated: it is taken as it stands) and, for
    # parameters without typer metadata, the type hints.
    parsed.__signature__ = inspect.Signature(shown)  # type: ignore[attr-defined]
    parsed.__annotations__ = {p.name: p.annotation for p in shown}
    return parsed


def _fields(group: type[Any]) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(group, include_extras=True)
    shown = []
    for field in dataclasses.fields(group):
        if field.default is dataclasses.MISSING:
            raise TypeError(f"{group.__qualname__}.{field.name}: an option needs a default")
        shown.append(
            inspect.Parameter(
                field.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=field.default,
                annotation=hints[field.name],
            )
        )
    return shown
