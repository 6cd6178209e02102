"""Options shared by several commands are declared once (a dataclass of typer options,
``cli/option_group.py``): every command that takes the set shows all of it, and the command
receives the parsed values as one object."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any

import pytest
import typer
import typer.main
from typer.core import TyperCommand
from typer.testing import CliRunner

from jetreduce.cli import workflow_options as opts
from jetreduce.cli.app import app
from jetreduce.cli.option_group import expand_groups
from jetreduce.cli.serve import ServeArgs


def _command(*path: str) -> TyperCommand:
    command: Any = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    assert isinstance(command, TyperCommand)
    return command


def _options(command: TyperCommand) -> dict[str, tuple[Any, ...]]:
    return {
        p.name or "": (tuple(p.opts), p.default, getattr(p, "help", None), p.envvar)
        for p in command.params
    }


def test_run_and_submit_take_every_submit_option() -> None:
    fields = {f.name for f in dataclasses.fields(opts.SubmitArgs)}
    run, submit = _options(_command("run")), _options(_command("submit"))
    assert fields <= run.keys() and fields <= submit.keys()
    # The same declaration but for --backend, which means something else to each.
    assert {f: run[f] for f in fields - {"backend"}} == {f: submit[f] for f in fields - {"backend"}}


def test_service_and_services_up_declare_their_options_alike() -> None:
    fields = {f.name for f in dataclasses.fields(ServeArgs)}
    one, up = _options(_command("service")), _options(_command("services", "up"))
    assert set(one) - {"name"} == set(up) == fields
    assert {f: one[f] for f in fields} == up


Colour = Annotated[str, typer.Option("--colour", help="Paint.")]
Coats = Annotated[int, typer.Option("--coats", min=1)]


@dataclass(frozen=True)
class _Paint:
    colour: Colour = "white"
    coats: Coats = 1


def test_the_command_receives_the_parsed_options_as_one_object() -> None:
    got: list[tuple[str, _Paint, bool]] = []

    @expand_groups
    def paint(
        wall: Annotated[str, typer.Argument()],
        *,
        how: _Paint,
        dry: Annotated[bool, typer.Option("--dry")] = False,
    ) -> None:
        got.append((wall, how, dry))

    cli = typer.Typer()
    cli.command()(paint)
    cli.command("noop")(lambda: None)  # two commands: "paint" is named on the command line
    runner = CliRunner()
    done = runner.invoke(cli, ["paint", "north", "--coats", "2", "--dry"])
    assert done.exit_code == 0, done.output
    assert runner.invoke(cli, ["paint", "south"]).exit_code == 0
    assert got == [("north", _Paint("white", 2), True), ("south", _Paint(), False)]
    refused = runner.invoke(cli, ["paint", "east", "--coats", "0"])
    assert refused.exit_code == 2 and "--coats" in refused.output
    shown = runner.invoke(cli, ["paint", "--help"], env={"COLUMNS": "100", "TERM": "dumb"})
    assert "--colour" in shown.output and "Paint." in shown.output


def test_an_option_declared_twice_is_refused_at_import() -> None:
    def paint(*, how: _Paint, coats: Coats = 1) -> None:
        pass

    with pytest.raises(TypeError, match="declared twice: coats"):
        expand_groups(paint)
