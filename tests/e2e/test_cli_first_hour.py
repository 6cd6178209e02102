"""What a new user hits in the first hour (issue 15), through the real CLI: processes,
exit codes, signals, a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import nats
from test_cli import JETREDUCE, alive, cli

from backends import free_port
from jetreduce.contract.subjects import Subjects
from jetreduce.embedded import EmbeddedServer
from support import env_without_jetreduce, git, init_repo

REPO = Path(__file__).resolve().parents[2]
NOWHERE = "nats://127.0.0.1:1"
"""Nothing listens on port 1: every connection is refused at once."""


class Cli:
    """A CLI process whose stderr is read as it comes, so a test can wait for a line."""

    def __init__(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [*JETREDUCE, *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env_without_jetreduce() | (env or {}),
        )
        self.err: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)
            self._lines.put(line)

    def wait_line(self, needle: str, timeout_s: float = 30) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no line with {needle!r} within {timeout_s}s:\n{self.stderr}"
            try:
                line = self._lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                assert self._reader.is_alive(), f"exited without {needle!r}:\n{self.stderr}"
                continue
            if needle in line:
                return line

    def finish(self, timeout_s: float) -> tuple[int, str]:
        """Exit code and stdout; fails the test if the process outlives ``timeout_s``."""
        try:
            out, _ = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"still running after {timeout_s}s:\n{self.stderr}") from None
        self._reader.join(5)
        return self.proc.returncode, out

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def __enter__(self) -> Cli:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _workflow(tmp_path: Path, steps: str = '"true"', items: int = 3) -> Path:
    wf = tmp_path / "wf.yml"
    wf.write_text(
        f'name: day-one\nmap:\n  input: "seq 1 {items}"\n  max_parallel: 2\n'
        f"  agent_template:\n    - shell: {steps}\n"
    )
    return wf


# -- 1: an unreachable server -----------------------------------------------------------------
def test_an_unreachable_server_is_one_line_naming_it_and_exit_4(tmp_path: Path) -> None:
    wf = _workflow(tmp_path)
    env = env_without_jetreduce() | {"JETREDUCE_CONNECT_TIMEOUT_S": "1"}
    for args in (
        ["run", str(wf), "--nats", NOWHERE],
        ["services", "up", "--nats", NOWHERE],
        ["status", "--nats", NOWHERE],
    ):
        started = time.monotonic()
        done = cli(*args, cwd=tmp_path, timeout=30, env=env)
        took = time.monotonic() - started
        assert done.returncode == 4, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, (args, done.stderr)
        assert NOWHERE in lines[0] and "within 1s" in lines[0], lines
        assert took < 10, (args, took)


def test_signals_end_a_command_that_waits_for_its_first_connection(tmp_path: Path) -> None:
    """However long the connect budget, Ctrl-C and SIGTERM end the command at once."""
    wf = _workflow(tmp_path)
    slow = {"JETREDUCE_CONNECT_TIMEOUT_S": "600"}
    debug = ["--log-level", "debug"]  # each refused attempt is a debug line: proof it waits
    for args, sig, code in (
        ([*debug, "run", str(wf), "--nats", NOWHERE], signal.SIGINT, 130),
        ([*debug, "services", "up", "--nats", NOWHERE], signal.SIGTERM, 143),
        ([*debug, "status", "--nats", NOWHERE], signal.SIGINT, 130),
    ):
        with Cli(*args, cwd=tmp_path, env=slow) as proc:
            proc.wait_line("Connect call failed")
            proc.proc.send_signal(sig)
            rc, _ = proc.finish(timeout_s=10)
            assert rc == code, (args, proc.stderr)


def test_services_keep_reconnecting_after_losing_an_established_connection(
    tmp_path: Path, prefix: str
) -> None:
    """The bounded first connect does not bound reconnects: a server that goes away for longer
    than the connect budget and comes back is reconnected to."""
    port = free_port()
    env = {"JETREDUCE_CONNECT_TIMEOUT_S": "1", "JETREDUCE_PREFIX": prefix}
    server = EmbeddedServer(tmp_path / "nats", port=port).start()
    url = server.url
    try:
        with Cli("services", "up", "--nats", url, cwd=tmp_path, env=env) as services:
            services.wait_line("services running")
            server.stop()
            # Refused reconnects for longer than the first connect's budget (one a second),
            # then the server is back.
            services.wait_line("Connect call failed")
            services.wait_line("Connect call failed")
            assert services.proc.poll() is None, services.stderr
            server = EmbeddedServer(tmp_path / "nats", port=port).start()
            services.wait_line("reconnected to")
            assert services.proc.poll() is None, services.stderr
    finally:
        server.stop()


# -- 2: one store, one server -----------------------------------------------------------------
def test_a_second_server_on_a_data_dir_is_refused_naming_the_holder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    wf = _workflow(tmp_path)
    with Cli("server", "--port", "-1", "--data-dir", str(data), cwd=tmp_path) as holder:
        assert holder.proc.stdout is not None
        url = holder.proc.stdout.readline().strip()
        assert url.startswith("nats://"), holder.stderr
        started = time.monotonic()
        second = cli("run", str(wf), "--data-dir", str(data), cwd=tmp_path, timeout=30)
        assert time.monotonic() - started < 10
        assert second.returncode == 1, second.stderr
        assert f"pid {holder.proc.pid}" in second.stderr
        assert f"--nats {url}" in second.stderr
        again = cli("server", "--port", "-1", "--data-dir", str(data), cwd=tmp_path, timeout=30)
        assert again.returncode == 1 and f"pid {holder.proc.pid}" in again.stderr
        # The advice works: the holder's server runs the workflow.
        used = cli("run", str(wf), "--nats", url, "-q", cwd=tmp_path, timeout=60)
        assert used.returncode == 0, used.stderr

        # A killed holder leaves no lock behind that blocks.
        holder.proc.kill()
        holder.proc.wait(10)
    after = cli("run", str(wf), "--data-dir", str(data), "-q", cwd=tmp_path, timeout=60)
    assert after.returncode == 0, after.stderr


# -- 5: nothing outlives a SIGKILLed run ------------------------------------------------------
def _session_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[3])


def test_agents_and_steps_die_with_a_sigkilled_run_and_resume_commits_once(
    tmp_path: Path,
) -> None:
    """Steps that would commit after the kill must not: the resume commits each item once."""
    work = tmp_path / "work"
    work.mkdir()
    init_repo(work)
    pids = tmp_path / "pids"
    pids.mkdir()
    (tmp_path / "commit.sh").write_text(
        f"echo $$ > {pids}/$1\nsleep 3\necho $1 > f$1\ngit add f$1\ngit commit -qm item-$1\n"
    )
    wf = tmp_path / "commits.yml"
    wf.write_text(f"""
name: commits
map:
  input: "seq 1 6"
  max_parallel: 3
  agent_template:
    - shell: "sh {tmp_path}/commit.sh ${{item}}"
""")
    data = tmp_path / "data"
    run = subprocess.Popen(
        [
            *JETREDUCE,
            "run",
            str(wf),
            "--id",
            "commits-1",
            "--data-dir",
            str(data),
            "-q",
            "--lease",
            "2",
        ],
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env_without_jetreduce(),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(pids.iterdir())) < 3:
            assert run.poll() is None, run.communicate()[1]
            assert time.monotonic() < deadline, "no step started"
            time.sleep(0.05)
        steps = [int(p.read_text()) for p in pids.iterdir()]
        agents = {_session_of(p) for p in steps}  # an agent leads its steps' session
        run.kill()
        run.wait(10)
        deadline = time.monotonic() + 10
        while [p for p in [*steps, *agents] if alive(p)]:
            assert time.monotonic() < deadline, "steps or agents outlived the run"
            time.sleep(0.05)
    finally:
        run.kill()
        for pid in [*steps, *agents] if "agents" in locals() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    resumed = cli("resume", "commits-1", "--data-dir", str(data), cwd=work, timeout=90)
    assert resumed.returncode == 0, resumed.stderr
    subjects = git(work, "log", "--format=%s").split()
    assert sorted(s for s in subjects if s.startswith("item-")) == [
        f"item-{i}" for i in range(1, 7)
    ]


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
    wf = _workflow(tmp_path, steps='"sleep 1"', items=2)
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


# -- 6: after a run, its store answers without --nats -----------------------------------------
def test_queries_after_a_run_use_its_store_and_cancel_reaches_a_running_one(
    tmp_path: Path,
) -> None:
    wf = _workflow(tmp_path, steps='"echo hello-${item}"', items=2)
    done = cli("run", str(wf), "--id", "here-1", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    status = cli("status", "here-1", cwd=tmp_path, timeout=30)
    assert status.returncode == 0, status.stderr
    assert "here-1  completed" in status.stdout and status.stderr == ""
    listing = cli("list", cwd=tmp_path, timeout=30)
    assert "here-1" in listing.stdout, listing.stderr
    logs = cli("logs", "here-1", "item_1", cwd=tmp_path, timeout=30)
    assert logs.returncode == 0 and "hello-2" in logs.stdout, logs.stderr
    dead = cli("dlq", "list", "here-1", cwd=tmp_path, timeout=30)
    assert dead.returncode == 0, dead.stderr

    # While a run is going, `cancel` (no --nats) finds its server; the workflow then stays
    # cancelled: resume says why not.
    slow = _workflow(tmp_path, steps='"sleep 60"', items=2)
    with Cli("run", str(slow), "--id", "here-2", cwd=tmp_path) as running:
        running.wait_line("submitted")
        cancelled = cli("cancel", "here-2", cwd=tmp_path, timeout=30)
        assert cancelled.returncode == 0, cancelled.stderr
        rc, _ = running.finish(timeout_s=30)
        assert rc == 1, running.stderr
    resumed = cli("resume", "here-2", cwd=tmp_path, timeout=60)
    assert resumed.returncode == 2, resumed.stderr
    assert "cannot be resumed: it is cancelled (cancelled by user)" in resumed.stderr


# -- 11: an idle installation does not pile up consumers --------------------------------------
def _kv_consumers(url: str, prefix: str) -> int:
    async def count() -> int:
        nc = await nats.connect(url)
        try:
            stream = f"KV_{Subjects(prefix).workflows_bucket}"
            return len(await nc.jetstream().consumers_info(stream))
        finally:
            await nc.close()

    return asyncio.run(count())


def test_an_idle_janitor_keeps_the_consumer_count_flat(
    tmp_path: Path, nats_url: str, prefix: str
) -> None:
    """The janitor checks deadlines every second; over six idle seconds the workflow
    records' bucket gains no consumer (a listing per second left one behind each time)."""
    env = {"JETREDUCE_PREFIX": prefix}
    full_env = env_without_jetreduce() | env
    wf = _workflow(tmp_path)
    with Cli("services", "up", "--nats", nats_url, cwd=tmp_path, env=env) as services:
        services.wait_line("services running")
        done = cli("submit", str(wf), "--nats", nats_url, "--wait", cwd=tmp_path, env=full_env)
        assert done.returncode == 0, done.stderr
    with Cli("service", "janitor", "--nats", nats_url, cwd=tmp_path, env=env) as janitor:
        janitor.wait_line("services running")
        time.sleep(1.5)  # its watch is set up
        before = _kv_consumers(nats_url, prefix)
        time.sleep(6)  # idle: six deadline checks
        after = _kv_consumers(nats_url, prefix)
        assert janitor.proc.poll() is None, janitor.stderr
    assert after <= before, (before, after)


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

    assert asyncio.run(follow()) == shown
