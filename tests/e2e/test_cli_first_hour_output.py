"""What a new user hits in the first hour (issue 15), through the real CLI against a real
nats-server: what the CLI prints (arguments, quiet, help, watch, failures, escaping, the
README's subscription)."""

from __future__ import annotations

import asyncio
import re
import shlex
import time
from pathlib import Path
from typing import Any

import nats
from cli_process import REPO, Cli, workflow_file
from test_cli import JETREDUCE, cli

from support import env_without_jetreduce


# -- 7, 8: --args a b; quiet is quiet ---------------------------------------------------------
def test_args_as_the_readme_writes_them_and_quiet_prints_only_the_reduce_output(
    tmp_path: Path,
) -> None:
    wf = tmp_path / "args.yml"
    wf.write_text(
        'name: args\nmap:\n  input: "seq 1 2"\n  agent_template:\n    - shell: "true"\n'
        'reduce:\n  - shell: "echo got $1 / ${ARG_2} / $3"\n'
    )
    data = str(tmp_path / "data")
    done = cli("run", str(wf), "--args", "a", "b c", "-q", "--data-dir", data, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "got a / b c /\n"
    assert done.stderr == ""


def test_quiet_still_prints_errors(tmp_path: Path) -> None:
    wf = tmp_path / "fails.yml"
    wf.write_text(
        'name: fails\nmap:\n  input: "seq 1 2"\n  agent_template:\n    - shell: "true"\n'
        'reduce:\n  - shell: "echo broken >&2; exit 5"\n'
    )
    done = cli("run", str(wf), "-q", "--data-dir", str(tmp_path / "data"), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stdout == ""
    assert "exited with code 5" in done.stderr and "broken" in done.stderr
    assert "progress" not in done.stderr and "submitted" not in done.stderr


# -- 9: version, help, warnings ---------------------------------------------------------------
def _commands_panel_entries(help_text: str) -> list[list[str]]:
    """The Commands panel's entries, each as its lines of text (box drawing removed)."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if "Commands" in line)
    entries: list[list[str]] = []
    for line in lines[start + 1 :]:
        if line.startswith("╰"):
            break
        text = line.strip().strip("│").rstrip()
        if text[:2].strip():  # a command's name starts a new entry
            entries.append([text])
        else:
            entries[-1].append(text)
    return entries


def test_version_help_and_warnings_read_cleanly(tmp_path: Path) -> None:
    version = cli("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("jetreduce "), version
    env = env_without_jetreduce() | {"COLUMNS": "100", "TERM": "dumb"}
    root = cli("--help", cwd=tmp_path, env=env)
    run = cli("run", "--help", cwd=tmp_path, env=env)
    for shown in (root, run):
        assert shown.returncode == 0, shown.stderr
        assert "`" not in shown.stdout, shown.stdout
        assert "<bool>" not in shown.stdout, shown.stdout
    # Paragraphs are wrapped to the width, not broken where the docstring's lines end.
    for entry in _commands_panel_entries(root.stdout):
        for line in entry[:-1]:
            assert len(line) > 60, "\n".join(entry)

    wf = tmp_path / "warn.yml"
    wf.write_text(
        'name: w\ncolour: red\nmap:\n  input: "seq 1 1"\n  agent_template:\n    - shell: "true"\n'
    )
    checked = cli("validate", str(wf), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr.strip() == f"{wf}:2:1: warning: colour: unknown key 'colour' is ignored"


# -- 12: watch shows a workflow from its first event ------------------------------------------
def test_watch_after_submit_shows_the_workflow_from_its_first_event(
    tmp_path: Path, nats_url: str, prefix: str
) -> None:
    env = {"JETREDUCE_PREFIX": prefix}
    full_env = env_without_jetreduce() | env
    wf = workflow_file(tmp_path, steps='"sleep 1"', items=2)
    with Cli("services", "up", "--nats", nats_url, cwd=tmp_path, env=env) as services:
        services.wait_line("services running")
        sub = cli(
            "submit", str(wf), "--nats", nats_url, "--id", "early-1", cwd=tmp_path, env=full_env
        )
        assert sub.returncode == 0, sub.stderr
        deadline = time.monotonic() + 30
        while True:  # the first events are history by the time watch starts
            status = cli("status", "early-1", "--nats", nats_url, cwd=tmp_path, env=full_env)
            if " mapping " in status.stdout or " completed " in status.stdout:
                break
            assert time.monotonic() < deadline, status.stdout + status.stderr
        watched = cli("watch", "early-1", "--nats", nats_url, cwd=tmp_path, env=full_env)
    assert watched.returncode == 0, watched.stderr
    lines = watched.stderr.splitlines()
    assert lines[0] == "workflow accepted", lines
    assert "planned: 2 items, 2 in parallel" in lines, lines
    assert lines[-1].startswith("workflow early-1: completed"), lines
    # Each map agent's usage, with its figures: which agent, slots, busy of held
    # slot-seconds and their share, items, whether it drained.
    usage = [USAGE.fullmatch(line) for line in lines if line.startswith("agent ")]
    assert usage and all(usage), lines
    figures = [m.groupdict() for m in usage if m]
    assert all("/map-" in f["agent"] for f in figures), figures
    assert sum(int(f["items"]) for f in figures) == 2, figures  # one attempt per item
    busy = sum(float(f["busy"]) for f in figures)
    assert busy >= 1.5, figures  # two items of "sleep 1"
    assert all(float(f["busy"]) <= float(f["held"]) for f in figures), figures


USAGE = re.compile(
    r"agent (?P<agent>\S+) usage: (?P<slots>\d+) slot\(s\), busy (?P<busy>[\d.]+) of "
    r"(?P<held>[\d.]+) slot-seconds held \((?P<share>\d+)%\), (?P<items>\d+) item\(s\), "
    r"(drained early|not drained)"
)


# -- 13: what failures say ----------------------------------------------------------------------
def test_failures_say_which_stream_and_show_the_reduce_output_so_far(tmp_path: Path) -> None:
    wf = tmp_path / "fails.yml"
    wf.write_text("""
name: fails
map:
  input: "seq 1 2"
  agent_template:
    - shell: "if [ ${item} = 2 ]; then echo only-on-stdout; exit 1; fi"
reduce:
  - shell: "echo first-step-output"
  - shell: "echo broken >&2; exit 7"
""")
    ran = cli("run", str(wf), "--id", "fails-1", "--max-attempts", "1", "-q", cwd=tmp_path)
    assert ran.returncode == 1, ran.stderr
    # The reduce's output so far, then the error.
    assert ran.stdout == "first-step-output\n", ran.stdout
    assert "exited with code 7: broken" in ran.stderr
    # The dead item's tail is its stdout (it wrote no stderr), and says so.
    shown = cli("logs", "fails-1", "item_1", cwd=tmp_path, timeout=30)
    assert shown.returncode == 0, shown.stderr
    assert "stdout (stderr was empty):\nonly-on-stdout" in shown.stdout, shown.stdout
    dead = cli("dlq", "show", "fails-1", "item_1", cwd=tmp_path, timeout=30)
    assert '"stderr_tail": "stdout (stderr was empty):\\nonly-on-stdout' in dead.stdout

    missing = tmp_path / "missing.yml"
    missing.write_text(
        'name: missing\nmap:\n  input: "items.json"\n  agent_template:\n    - shell: "true"\n'
    )
    ran = cli("run", str(missing), "-q", "--data-dir", str(tmp_path / "d2"), cwd=tmp_path)
    assert ran.returncode == 1
    assert "'items.json' is neither a file nor a command that succeeded" in ran.stderr


def test_the_wordcount_example_describes_its_input_as_it_is() -> None:
    text = (REPO / "examples" / "wordcount.yml").read_text()
    assert "JSON array" not in text and "JSON lines" in text


# -- 10: the README's subscription tells the story once ---------------------------------------
def _readme_story() -> tuple[list[str], list[str]]:
    """The README's ``nats sub`` subjects and the subjects of the output it shows."""
    readme = (REPO / "README.md").read_text()
    line = next(x for x in readme.splitlines() if x.startswith("nats sub 'workflow."))
    subjects = shlex.split(line)[2:]
    block = readme.split("<!-- story")[1].split("<!-- /story -->")[0]
    shown = [x.split()[0] for x in block.split("```text")[1].split("```")[0].strip().splitlines()]
    return subjects, shown


def test_the_readme_subscription_shows_each_event_of_a_run_once(nats_url: str, prefix: str) -> None:
    subjects, shown = _readme_story()
    wf = "story-1"

    async def follow() -> list[str]:
        nc = await nats.connect(nats_url)
        got: list[str] = []

        async def on_msg(msg: Any) -> None:
            got.append(msg.subject.removeprefix(f"{prefix}.").replace(wf, "WF"))

        try:
            for subject in subjects:
                await nc.subscribe(f"{prefix}.{subject.replace('WF', wf)}", cb=on_msg)
            await nc.flush()
            run = await asyncio.create_subprocess_exec(
                *JETREDUCE,
                *("run", "examples/wordcount.yml", "--id", wf, "--nats", nats_url, "-q"),
                cwd=REPO,
                env=env_without_jetreduce() | {"JETREDUCE_PREFIX": prefix},
                stdout=asyncio.subprocess.DEVNULL,
            )
            assert await asyncio.wait_for(run.wait(), 90) == 0
            await nc.flush()
        finally:
            await nc.close()
        return got

    got = asyncio.run(follow())
    # Map agents report their usage as they leave (at map.complete or when they drained):
    # after their launch, in no fixed place among the reduce's events.
    usage = "agent.usage.WF"
    assert [x for x in got if x != usage] == [x for x in shown if x != usage]
    assert got.count(usage) == shown.count(usage) == 2
    assert got.index(usage) > got.index("workflow.planned.WF")


# -- issue 13, 7: names and reasons are escaped -----------------------------------------------
def test_status_escapes_a_name_and_a_reason_with_control_characters(
    tmp_path: Path, nats_url: str, prefix: str
) -> None:
    wf = tmp_path / "evil.yml"
    wf.write_text(
        'name: "two\\nlines\\u001b[31m"\nmap:\n  input: "seq 1 1"\n'
        '  agent_template:\n    - shell: "true"\n'
        "reduce:\n  - shell: \"printf 'bad\\\\nthing\\\\033[2J' >&2; exit 3\"\n"
    )
    env = env_without_jetreduce() | {"JETREDUCE_PREFIX": prefix}
    ran = cli("run", str(wf), "--id", "evil-1", "--nats", nats_url, cwd=tmp_path, env=env)
    assert ran.returncode == 1, ran.stderr
    assert "\x1b" not in ran.stderr
    status = cli("status", "evil-1", "--nats", nats_url, cwd=tmp_path, env=env)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert len(lines) == 1, status.stdout
    assert "two\\nlines\\x1b[31m" in lines[0]
    assert "bad\\nthing\\x1b[2J" in lines[0]
