"""One map-input resolver (`lang/map_input.py`) for the setup agent, the upload and the dry
run, with the same variables (issue 16: the upload and the dry run rendered ``map.input`` with
the workflow's ``env`` and ``--args`` only, so a path built from ``env_files`` or a profile was
found by the run but not by them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jetreduce.cli.upload import input_file as upload_input_file
from jetreduce.lang import parse_workflow
from jetreduce.lang.map_input import input_command, input_file
from jetreduce.worker.secrets import resolve_environment

pytestmark = pytest.mark.unit

WORKFLOW = """
name: t
env_files: [paths.env]
env:
  NAME: items
profiles:
  big: {SIZE: large}
secrets:
  TOKEN: "${env:NOT_ON_THE_CLIENT}"
map:
  input: "${DATA}/${NAME}-${SIZE:-small}-$1.json"
  agent_template:
    - shell: echo
"""


def test_the_upload_finds_the_file_the_agent_finds(tmp_path: Path) -> None:
    (tmp_path / "paths.env").write_text("DATA=data\n")
    (tmp_path / "data").mkdir()
    wanted = tmp_path / "data" / "items-large-x.json"
    wanted.write_text("[1]")
    wf = parse_workflow(WORKFLOW).workflow
    agent_scope = resolve_environment(
        wf, args=["x"], profile="big", environ={"NOT_ON_THE_CLIENT": "s"}, base_dir=tmp_path
    ).variables
    assert input_file(wf.map.input, agent_scope, tmp_path) == wanted
    # The client has no secret: it still resolves the same path (the file came from
    # env_files, the profile and --args, as in the agent).
    assert upload_input_file(wf, tmp_path, ["x"], profile="big") == wanted
    assert upload_input_file(wf, tmp_path, ["y"], profile="big") is None


def test_not_a_file_is_a_command_whose_values_stay_out_of_the_script() -> None:
    scope = {"PATTERN": "$(touch pwned)"}
    assert input_file("grep -l ${PATTERN} *.md", scope, "/") is None
    cmd = input_command("grep -l ${PATTERN} *.md", scope)
    assert "touch" not in cmd.script
    assert "$(touch pwned)" in cmd.env.values()


def test_a_name_no_path_can_hold_is_not_a_file() -> None:
    assert input_file("x" * 5000, {}, "/") is None
    assert input_file("a\0b", {}, "/") is None


def test_run_and_submit_upload_the_file_of_their_profile(tmp_path: Path) -> None:
    """``--backend kubernetes`` uploads the input the pods' setup agent will look for: the
    one the submission's ``--profile`` names (the shared options builder passes it on)."""
    from jetreduce.cli.workflow_options import SubmitArgs, submit_options

    (tmp_path / "paths.env").write_text("DATA=data\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "items-large-x.json").write_text("[1]")
    (tmp_path / "data" / "items-small-x.json").write_text("[2]")
    wf = parse_workflow(WORKFLOW).workflow

    def uploaded(profile: str | None) -> Path | None:
        how = SubmitArgs(workdir=tmp_path, args=["x"], profile=profile, backend="kubernetes")
        _, upload = submit_options(wf, {}, how)
        return upload

    assert uploaded("big") == tmp_path / "data" / "items-large-x.json"
    assert uploaded(None) == tmp_path / "data" / "items-small-x.json"
