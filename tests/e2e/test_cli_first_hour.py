"""What a new user hits in the first hour (issue 15), through the real CLI against a real
nats-server: connecting, the store, processes and signals. What the CLI prints is in
``test_cli_first_hour_output.py``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import nats
from cli_process import NOWHERE, Cli, workflow_file
from test_cli import JETREDUCE, alive, cli

from backends import free_port
from jetreduce.contract.subjects import Subjects
from jetreduce.embedded import EmbeddedServer
from support import env_without_jetreduce, git, init_repo


# -- 1: an unreachable server -----------------------------------------------------------------
def test_an_unreachable_server_is_one_line_naming_it_and_exit_4(tmp_path: Path) -> None:
    wf = workflow_file(tmp_path)
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
    wf = workflow_file(tmp_path)
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
    wf = workflow_file(tmp_path)
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


# -- 6: after a run, its store answers without --nats -----------------------------------------
def test_queries_after_a_run_use_its_store_and_cancel_reaches_a_running_one(
    tmp_path: Path,
) -> None:
    wf = workflow_file(tmp_path, steps='"echo hello-${item}"', items=2)
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
    slow = workflow_file(tmp_path, steps='"sleep 60"', items=2)
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
IDLE_S = 32.0
"""Long enough for every periodic reading to run more than once: the launcher reconciles
every 15 s (twice here), the aggregator re-reads the records every 2 s, the janitor checks
deadlines every second. (The issue idled a minute; a leak shows after the first period.)"""


def _consumers(url: str, prefix: str) -> int:
    """Consumers on every stream of the installation (its KV buckets' included)."""

    ours = Subjects(prefix).workflows_bucket.removesuffix("WORKFLOWS")  # "<PREFIX>_JR_"

    async def count() -> int:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            total = 0
            for info in await js.streams_info():
                if ours in (info.config.name or ""):
                    total += info.state.consumer_count
            return total
        finally:
            await nc.close()

    return asyncio.run(count())


def test_an_idle_installation_keeps_the_consumer_count_flat(
    tmp_path: Path, nats_url: str, prefix: str
) -> None:
    """A whole installation (``services up``) with a workflow on record idles (``IDLE_S``)
    and makes no consumer: its periodic readings of the records (a listing made a consumer
    each time, which the server kept for minutes) leave nothing behind."""
    env = {"JETREDUCE_PREFIX": prefix}
    full_env = env_without_jetreduce() | env
    wf = workflow_file(tmp_path)
    with Cli("services", "up", "--nats", nats_url, cwd=tmp_path, env=env) as services:
        services.wait_line("services running")
        done = cli("submit", str(wf), "--nats", nats_url, "--wait", cwd=tmp_path, env=full_env)
        assert done.returncode == 0, done.stderr
        time.sleep(2.0)  # the services' watches and durable consumers are in place
        before = _consumers(nats_url, prefix)
        time.sleep(IDLE_S)  # idle: the measurement itself
        after = _consumers(nats_url, prefix)
        assert services.proc.poll() is None, services.stderr
    assert before > 0, "no consumer counted: the services' own are missing from the count"
    assert after <= before, (before, after)


# -- 3: a cancelled workflow is no longer tracked ---------------------------------------------
def _progress_messages(url: str, subject: str, window_s: float) -> int:
    async def listen() -> int:
        nc = await nats.connect(url)
        seen = 0

        async def on_msg(_msg: object) -> None:
            nonlocal seen
            seen += 1

        try:
            await nc.subscribe(subject, cb=on_msg)
            await asyncio.sleep(window_s)
        finally:
            await nc.close()
        return seen

    return asyncio.run(listen())


def test_a_cancelled_workflow_leaves_the_aggregator_and_shows_no_eta(
    tmp_path: Path, nats_url: str, prefix: str
) -> None:
    env = {"JETREDUCE_PREFIX": prefix}
    full_env = env_without_jetreduce() | env
    wf = workflow_file(tmp_path, steps='"sleep 60"', items=4)
    with Cli("services", "up", "--nats", nats_url, cwd=tmp_path, env=env) as services:
        services.wait_line("services running")
        sub = cli(
            "submit", str(wf), "--nats", nats_url, "--id", "gone-1", cwd=tmp_path, env=full_env
        )
        assert sub.returncode == 0, sub.stderr
        # Progress flows while it maps (about once a second)...
        assert _progress_messages(nats_url, f"{prefix}.progress.gone-1", 3) > 0
        cancelled = cli("cancel", "gone-1", "--nats", nats_url, cwd=tmp_path, env=full_env)
        assert cancelled.returncode == 0, cancelled.stderr
        # ...and stops once it is cancelled.
        assert _progress_messages(nats_url, f"{prefix}.progress.gone-1", 3) == 0
        status = cli("status", "gone-1", "--nats", nats_url, cwd=tmp_path, env=full_env)
    assert "cancelled" in status.stdout, status.stdout
    assert "ETA" not in status.stdout and "items/s" not in status.stdout, status.stdout
