"""Every command's ``--help`` explains it, run as a user runs it (``python -m jetreduce``):
the list of commands is read from the assembled application, so a command added to
``cli/app.py`` without a docstring, or one whose registration breaks, fails here."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import typer.main

from jetreduce.cli.app import app
from support import env_without_jetreduce

JETREDUCE = [sys.executable, "-m", "jetreduce"]


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
    """Each command and group with the help text its docstring gives."""
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))
    yield path, command.help or ""


def _words(text: str) -> str:
    """Text as shown, whatever the wrapping: box drawing, markup and spacing removed."""
    return " ".join(re.sub(r"[│╭╮╰╯─`*]", " ", text).split())


def _help(path: tuple[str, ...], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*JETREDUCE, *path, "--help"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=env_without_jetreduce() | {"COLUMNS": "100", "TERM": "dumb"},
    )


def test_every_command_explains_itself_in_its_help(tmp_path: Path) -> None:
    commands = dict(_commands(typer.main.get_command(app)))
    expected = {"run", "resume", "submit", "watch", "status", "list", "cancel", "validate"}
    expected |= {"service", "worker", "server", "nats-users", "logs", "services", "dlq"}
    assert expected <= {path[0] for path in commands if path}
    assert ("services", "up") in commands and ("dlq", "retry") in commands
    with ThreadPoolExecutor(max_workers=4) as pool:
        shown = dict(zip(commands, pool.map(lambda p: _help(p, tmp_path), commands), strict=True))
    for path, doc in commands.items():
        out = shown[path]
        name = " ".join(("jetreduce", *path))
        assert out.returncode == 0, f"{name} --help: {out.stderr}"
        assert f"Usage: {name} " in out.stdout, out.stdout
        first = _words(doc).split(". ")[0]
        assert len(first.split()) >= 3, f"{name}: no explanation in its docstring: {doc!r}"
        assert first[:40] in _words(out.stdout), f"{name}: {first[:40]!r} not in\n{out.stdout}"
