"""The layer rules of the package, checked on the source (what an import linter would do):
contract < lang (the pure workflow language), runtime, queues < the five services (independent)
< cli; backend client libraries only in their adapters."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "services" / "jetreduce"
SERVICES = {"planner", "launcher", "worker", "aggregator", "janitor"}
ALLOWED = {
    "contract": {"contract"},
    "lang": {"contract", "lang"},
    "runtime": {"contract", "runtime"},
    "queues": {"contract", "runtime", "queues"},
    **{s: {"contract", "lang", "runtime", "queues", s} for s in SERVICES},
    "embedded": {"contract", "runtime"},
}
CLIENT_LIBS = {
    "redis": {"queues/redis.py"},
    "boto3": {"queues/sqs.py"},
    "botocore": {"queues/sqs.py"},
    "kubernetes": {"launcher/k8s_api.py"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_layers_hold() -> None:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        layer = rel.parts[0].removesuffix(".py")
        for module in _imports(path):
            parts = module.split(".")
            if parts[0] == "jetreduce" and len(parts) > 1 and layer in ALLOWED:
                target = parts[1]
                if target not in ALLOWED[layer]:
                    problems.append(f"{rel} imports {module}")
            if parts[0] in CLIENT_LIBS and str(rel) not in CLIENT_LIBS[parts[0]]:
                problems.append(f"{rel} imports {parts[0]} (only {CLIENT_LIBS[parts[0]]} may)")
    assert not problems, "\n".join(problems)


def test_the_language_layer_is_pure() -> None:
    """lang/ parses and evaluates the workflow language: no NATS, no queue, no process."""
    forbidden = {"nats", "asyncio", "subprocess", "redis", "boto3", "kubernetes"}
    problems = []
    for path in sorted((PACKAGE / "lang").rglob("*.py")):
        for module in _imports(path):
            if module.split(".")[0] in forbidden:
                problems.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not problems, "\n".join(problems)
