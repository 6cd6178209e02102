"""Secrets, env files, profiles, positional args, and masking."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from jetreduce.contract.workflow import WorkflowInvalid
from jetreduce.contract.workflow.model import Secret, Workflow
from jetreduce.lang import parse_workflow
from jetreduce.worker.secrets import (
    EnvironmentProblem,
    Masker,
    MaskingFilter,
    parse_env_file,
    positional_args,
    profile_values,
    resolve_environment,
    resolve_secrets,
)


def workflow(top: str) -> Workflow:
    text = (
        "name: t\nmode: mapreduce\n"
        + top
        + "\nmap:\n  input: x.json\n  agent_template:\n    - shell: 'true'\n"
    )
    return parse_workflow(text).workflow


def test_env_file_syntax() -> None:
    text = """
# a comment
PLAIN=value
export EXPORTED=yes
SPACED = padded   # trailing comment
DQ="a \\"quoted\\" line\\nnext"
SQ='literal $HOME \\n'
HASH=a#b
EMPTY=
MULTI="one
two"
"""
    assert parse_env_file(text) == {
        "PLAIN": "value",
        "EXPORTED": "yes",
        "SPACED": "padded",
        "DQ": 'a "quoted" line\nnext',
        "SQ": "literal $HOME \\n",
        "HASH": "a#b",
        "EMPTY": "",
        "MULTI": "one\ntwo",
    }


@pytest.mark.parametrize("bad", ["JUST_A_WORD", "1BAD=x", 'OPEN="never closed'])
def test_env_file_errors_name_the_line(bad: str) -> None:
    with pytest.raises(EnvironmentProblem, match=r"\.env:2:"):
        parse_env_file("OK=1\n" + bad)


def secrets_of(yaml_secrets: str) -> dict[str, Secret]:
    return workflow(f"secrets: {yaml_secrets}\n").secrets


def test_secret_forms(tmp_path: Path) -> None:
    (tmp_path / "token.txt").write_text("from-a-file\n")
    environ = {"GH_TOKEN": "gh-secret", "OTHER": "other-secret"}
    spec = secrets_of(
        '{A: "${env:GH_TOKEN}", B: {provider: env, key: OTHER}, '
        "C: {provider: file, key: token.txt}, D: GH_TOKEN, E: $OTHER}"
    )
    assert spec["A"] == Secret(provider="env", key="GH_TOKEN")
    values = resolve_secrets(spec, environ=environ, base_dir=tmp_path)
    assert values == {
        "A": "gh-secret",
        "B": "other-secret",
        "C": "from-a-file",
        "D": "gh-secret",
        "E": "other-secret",
    }


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ('{A: "${env:NOPE}"}', "NOPE is not set"),
        ("{A: {provider: file, key: missing.txt}}", "cannot read file missing.txt"),
    ],
)
def test_secret_errors_at_run_time(tmp_path: Path, spec: str, message: str) -> None:
    """What only the agent can know: its environment and files."""
    with pytest.raises(EnvironmentProblem, match=message):
        resolve_secrets(secrets_of(spec), environ={}, base_dir=tmp_path)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{A: {provider: vault, key: x}}", "provider 'vault' is not supported"),
        ("{A: {provider: aws, key: x}}", "provider 'aws' is not supported"),
        ("{A: {provider: env}}", "required key is missing"),
        ('{A: "literal value!"}', "must not be written"),
    ],
)
def test_secret_errors_at_parse_time(spec: str, message: str) -> None:
    """What the file gets wrong is refused at validate and submit, not by every agent."""
    with pytest.raises(WorkflowInvalid, match=message):
        secrets_of(spec)


def test_profiles() -> None:
    profiles = workflow(
        "profiles:\n  dev: {description: d, URL: 'http://dev'}\n  prod: {URL: 'http://p'}\n"
    ).profiles
    assert profiles == {"dev": {"URL": "http://dev"}, "prod": {"URL": "http://p"}}
    assert profile_values(profiles, "dev") == {"URL": "http://dev"}
    assert profile_values(profiles, None) == {}
    with pytest.raises(EnvironmentProblem, match=r"'qa' is not defined \(defined: dev, prod\)"):
        profile_values(profiles, "qa")


def test_positional_args() -> None:
    env, variables = positional_args(["a", "b c"])
    assert env == {"ARG_1": "a", "ARG_2": "b c"}
    assert variables["1"] == "a" and variables["ARG_2"] == "b c"


def test_layering(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("FROM_FILE=file\nSHARED=file\n")
    wf = workflow(
        """env:
  SHARED: env
  TARGET: "$1-${ARG_2}"
  USES_FILE: "${FROM_FILE}!"
env_files: [.env, missing.env]
profiles:
  prod:
    description: production
    SHARED: profile
secrets:
  TOKEN: "${env:MY_TOKEN}"
"""
    )
    resolved = resolve_environment(
        wf, args=["x", "y"], profile="prod", environ={"MY_TOKEN": "tok-123456"}, base_dir=tmp_path
    )
    assert resolved.env["SHARED"] == "profile"
    assert resolved.env["FROM_FILE"] == "file"
    assert resolved.env["TARGET"] == "x-y"
    assert resolved.env["USES_FILE"] == "file!"
    assert resolved.env["ARG_1"] == "x" and resolved.env["TOKEN"] == "tok-123456"
    assert resolved.variables["1"] == "x" and resolved.variables["TOKEN"] == "tok-123456"
    assert resolved.warnings == ["env file missing.env not found; skipped"]
    assert resolved.masker.mask("token tok-123456 here") == "token *** here"


def test_masker() -> None:
    masker = Masker(["abc", "secret-long", "secret"])
    assert masker.mask("x secret-long y secret abc") == "x *** y *** abc"
    assert not Masker(["ab"]) and Masker(["abcd"])
    assert masker.mask_value({"k": ["secret"]}) == {"k": ["***"]}


def test_masking_filter_masks_log_records(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.masking")
    masking = MaskingFilter(Masker(["hunter22"]))
    caplog.handler.addFilter(masking)
    try:
        with caplog.at_level(logging.INFO, logger="test.masking"):
            logger.info("password is %s", "hunter22")
    finally:
        caplog.handler.removeFilter(masking)
    assert "hunter22" not in caplog.text and "password is ***" in caplog.text
