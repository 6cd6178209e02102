"""One error root (contract/errors.py, issue 16): every exception class the package defines
descends from ``JetreduceError`` and is exactly one kind, temporary or permanent, so callers
can decide on the kind; builtin ``raise RuntimeError`` is left only where it reports a bug."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import jetreduce
from jetreduce.contract.errors import JetreduceError, PermanentError, TemporaryError

pytestmark = pytest.mark.unit

PACKAGE = Path(jetreduce.__file__).parent
KINDS = (TemporaryError, PermanentError)
BUGS_ONLY = {
    ("runtime/leadership.py", "the leader's work ended on its own"),
    ("queues/batching.py", "batch function gave"),
}
"""``raise RuntimeError`` sites that report a programming error, not a condition."""
FAMILIES = {"KubernetesBackendError"}
"""Bases that group errors of both kinds and are never raised themselves."""


def _classes() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="jetreduce."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(obj, BaseException)
                and obj.__module__ == module.__name__
                and not name.startswith("_")
            ):
                found[f"{obj.__module__}.{name}"] = obj
    return list(found.values())


def test_every_error_has_the_root_and_one_kind() -> None:
    classes = _classes()
    assert len(classes) >= 20, [c.__name__ for c in classes]
    wrong = [
        c.__qualname__
        for c in classes
        if c not in (JetreduceError, *KINDS)
        and (not issubclass(c, JetreduceError) or sum(issubclass(c, k) for k in KINDS) != 1)
        and c.__name__ not in FAMILIES
    ]
    assert wrong == [], wrong


def test_no_bare_runtime_error_but_for_bugs() -> None:
    raised = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Raise)
                and isinstance(node.exc, ast.Call)
                and isinstance(node.exc.func, ast.Name)
                and node.exc.func.id == "RuntimeError"
            ):
                text = ast.unparse(node.exc)
                where = str(path.relative_to(PACKAGE))
                if not any(where == f and s in text for f, s in BUGS_ONLY):
                    raised.append(f"{where}:{node.lineno}")
    assert raised == [], raised


def test_every_swallowed_exception_says_why() -> None:
    """``suppress(Exception)`` hides every error: each one carries a comment (on its line or
    the line above) saying why nothing is lost."""
    silent = []
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines):
            if "suppress(Exception" in line or "suppress(BaseException" in line:
                above = lines[n - 1].strip() if n else ""
                if "#" not in line and not above.startswith("#"):
                    silent.append(f"{path.relative_to(PACKAGE)}:{n + 1}")
    assert silent == [], silent
