"""The command line as a user runs it: real processes, real exit codes, Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import env_without_jetreduce

JETREDUCE = [sys.executable, "-m", "jetreduce"]


def cli(
    *args: str,
    cwd: Path,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    **kw: object,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*JETREDUCE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env_without_jetreduce() if env is None else env,
        **kw,  # type: ignore[arg-type]
    )


def test_validate_reports_every_problem_with_position(tmp_path: Path) -> None:
    wf = tmp_path / "bad.yml"
    wf.write_text(
        "name: x\nmode: mapreduce\nmap:\n  max_parallel: lots\n  agent_template:\n"
        "    - shell: echo\n      colour: red\n"
    )
    out = cli("validate", str(wf), cwd=tmp_path)
    assert out.returncode == 2
    assert "map.input: required key is missing" in out.stderr
    assert "bad.yml:4:17: map.max_parallel" in out.stderr
    assert "colour" in out.stderr  # the unknown key is warned about, with its line


def test_validate_refuses_bad_handlers_and_expressions_at_their_position(tmp_path: Path) -> None:
    """Issue 16: these validated ``ok`` and then failed every item at run time."""
    wf = tmp_path / "bad.yml"
    wf.write_text(
        "name: x\nmap:\n  input: items.json\n  filter: 'score >'\n  agent_template:\n"
        "    - shell: make\n      when: '${a} =='\n"
        "      on_failure:\n        - shell: 'echo handler'\n"
        "      on_exit_code: {one: {shell: x}}\n"
    )
    out = cli("validate", str(wf), cwd=tmp_path)
    assert out.returncode == 2, out.stdout
    assert "invalid workflow (4 problems)" in out.stderr
    assert "bad.yml:4:11: map.filter: invalid filter expression" in out.stderr
    assert "bad.yml:7:13: map.agent_template[0].when: invalid when expression" in out.stderr
    assert (
        "bad.yml:9:11: map.agent_template[0].on_failure[0]: on_failure list entries must be "
        "command strings, got a mapping"
    ) in out.stderr
    assert "bad.yml:10:22: map.agent_template[0].on_exit_code.one:" in out.stderr


def test_validate_warns_that_merge_is_not_run(tmp_path: Path, prodigy_examples: Path) -> None:
    out = cli("validate", str(prodigy_examples / "workflow-syntax-drift.yml"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout
    assert "warning: merge: `merge:` is checked but not run" in out.stderr


def test_validate_accepts_the_prodigy_examples(tmp_path: Path, prodigy_examples: Path) -> None:
    out = cli("validate", str(prodigy_examples / "test-mapreduce.yml"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_run_prints_reduce_output_and_exits_zero(tmp_path: Path, prodigy_examples: Path) -> None:
    out = cli(
        "run",
        str(prodigy_examples / "test-mapreduce.yml"),
        "--data-dir",
        str(tmp_path / "data"),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Processed 3 items"
    assert "progress: 3/3" in out.stderr  # plain progress lines when not a TTY
    assert "completed, 3/3 items succeeded" in out.stderr
    # How well the map used its slots, from the map agents' own reports.
    assert re.search(r"map slots busy \d+% of the time held", out.stderr), out.stderr


def test_run_exit_codes_for_failures(tmp_path: Path) -> None:
    failing_reduce = tmp_path / "reduce-fails.yml"
    failing_reduce.write_text("""
name: reduce-fails
map:
  input: "echo '[1]'"
  agent_template:
    - shell: "true"
reduce:
  - shell: "echo nope >&2; exit 7"
""")
    out = cli("run", str(failing_reduce), "--data-dir", str(tmp_path / "d1"), cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert "exited with code 7" in out.stderr and "nope" in out.stderr

    dead_items = tmp_path / "dead.yml"
    dead_items.write_text("""
name: dead-items
map:
  input: "echo '[1, 2]'"
  agent_template:
    - shell: "test ${item} -eq 1"
""")
    out = cli(
        "run",
        str(dead_items),
        "--max-attempts",
        "1",
        "--data-dir",
        str(tmp_path / "d2"),
        cwd=tmp_path,
    )
    assert out.returncode == 3, out.stderr
    assert "1/2 items succeeded, 1 failed" in out.stderr

    out = cli("run", str(tmp_path / "missing.yml"), cwd=tmp_path)
    assert out.returncode == 2 and "cannot read" in out.stderr


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not running: read its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_ctrl_c_stops_leaves_nothing_running_and_the_workflow_resumes(tmp_path: Path) -> None:
    """Prodigy's model: Ctrl-C stops the run, keeps the workflow and prints the exact
    ``jetreduce resume`` command, which then finishes it."""
    pids = tmp_path / "pids"
    pids.mkdir()
    go = tmp_path / "go"
    wf = tmp_path / "slow.yml"
    wf.write_text(f"""
name: slow
map:
  input: "seq 1 6"
  max_parallel: 3
  agent_template:
    - shell: "echo $$ > {pids}/${{item}}; test -e {go} || sleep 60"
""")
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [*JETREDUCE, "run", str(wf), "--id", "slow-1", "--data-dir", str(data), "--lease", "2"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_without_jetreduce(),
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(pids.iterdir())) < 3:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "agents never started"
            time.sleep(0.1)
        step_pids = [int(p.read_text()) for p in pids.iterdir()]
        server_pids = nats_servers_under(tmp_path)
        assert server_pids
        interrupted_at = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - interrupted_at
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert took < 10, (took, err)
    assert f"jetreduce resume slow-1 --data-dir {data}" in err, err
    assert "cancel" not in err.replace("not cancelled", ""), err
    deadline = time.monotonic() + 10
    while any(alive(p) for p in step_pids + server_pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in step_pids + server_pids if alive(p)]

    go.touch()
    resumed = cli("resume", "slow-1", "--data-dir", str(data), cwd=tmp_path, timeout=90)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert "completed, 6/6 items succeeded" in resumed.stderr


def test_cancel_is_for_good_and_resume_says_why_not(
    tmp_path: Path, nats_url: str, prefix: str
) -> None:
    wf = tmp_path / "slow.yml"
    wf.write_text(
        'name: slow\nmap:\n  input: "seq 1 2"\n  agent_template:\n    - shell: "sleep 60"\n'
    )
    env = env_without_jetreduce() | {"JETREDUCE_PREFIX": prefix}
    proc = subprocess.Popen(
        [*JETREDUCE, "run", str(wf), "--id", "doomed-1", "--nats", nats_url],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        for line in proc.stderr:  # the run's own lines: wait until it has submitted
            if "submitted" in line:
                break
            assert time.monotonic() < deadline
        cancelled = cli("cancel", "doomed-1", "--nats", nats_url, cwd=tmp_path, env=env)
        assert cancelled.returncode == 0, cancelled.stderr
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    resumed = cli("resume", "doomed-1", "--nats", nats_url, cwd=tmp_path, env=env, timeout=60)
    assert resumed.returncode == 2, resumed.stderr
    assert "cannot be resumed: it is cancelled (cancelled by user)" in resumed.stderr


def nats_servers_under(path: Path) -> list[int]:
    found = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            cmd = (proc_dir / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"nats-server") and any(str(path).encode() in c for c in cmd):
            found.append(int(proc_dir.name))
    return found


def test_services_submit_status_watch_as_separate_processes(
    tmp_path: Path, nats_url: str, prefix: str, prodigy_examples: Path
) -> None:
    env = env_without_jetreduce() | {"JETREDUCE_PREFIX": prefix}
    services = subprocess.Popen(
        [*JETREDUCE, "services", "up", "--nats", nats_url, "--log-dir", str(tmp_path / "logs")],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        run = lambda *a: subprocess.run(  # noqa: E731
            [*JETREDUCE, *a], cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env
        )
        sub = run(
            "submit",
            str(prodigy_examples / "test-mapreduce.yml"),
            "--nats",
            nats_url,
            "--id",
            "cli-wf-1",
        )
        assert sub.returncode == 0, sub.stderr
        assert sub.stdout.strip() == "cli-wf-1"
        watch = run("watch", "cli-wf-1", "--nats", nats_url)
        assert watch.returncode == 0, watch.stderr
        assert "Processed 3 items" in watch.stdout
        status = run("status", "cli-wf-1", "--nats", nats_url)
        assert status.returncode == 0 and "completed" in status.stdout
        listing = run("list", "--nats", nats_url)
        assert "cli-wf-1" in listing.stdout
        again = run(
            "submit",
            str(prodigy_examples / "test-mapreduce.yml"),
            "--nats",
            nats_url,
            "--id",
            "cli-wf-1",
        )
        assert again.returncode == 0 and again.stdout.strip() == "cli-wf-1"
    finally:
        services.send_signal(signal.SIGTERM)
        try:
            services.wait(timeout=30)
        except subprocess.TimeoutExpired:
            services.kill()
            pytest.fail("services did not stop on SIGTERM")
    assert services.returncode == 0, services.stderr.read() if services.stderr else ""


def test_run_against_an_existing_server(
    tmp_path: Path, nats_url: str, prefix: str, prodigy_examples: Path
) -> None:
    """``--nats URL`` uses that server: no embedded one is started."""
    out = subprocess.run(
        [
            *JETREDUCE,
            "run",
            str(prodigy_examples / "test-mapreduce.yml"),
            "--nats",
            nats_url,
            "--data-dir",
            str(tmp_path / "data"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env_without_jetreduce() | {"JETREDUCE_PREFIX": prefix},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Processed 3 items"
    assert not (tmp_path / "data" / "nats").exists()


def test_bad_queue_urls_are_usage_errors_before_anything_runs(tmp_path: Path) -> None:
    """A queue URL is checked where it is typed: a password in it (it would travel in the
    stored workflow) or an unknown scheme is exit 2 with the reason, and nothing connects
    (no server is running here)."""
    wf = tmp_path / "wf.yml"
    wf.write_text(
        "name: q\nmap:\n  input: \"echo '[1]'\"\n  agent_template:\n    - shell: 'true'\n"
    )
    nowhere = "nats://127.0.0.1:9"
    cases = [
        (
            ["submit", str(wf), "--nats", nowhere, "--queue", "redis://:pw@127.0.0.1:6379/0"],
            "password",
        ),
        (["run", str(wf), "--nats", nowhere, "--queue", "kafka://broker"], "unsupported queue"),
        (["services", "up", "--nats", nowhere, "--queue", "redis://h/x"], "database number"),
    ]
    for args, reason in cases:
        done = cli(*args, cwd=tmp_path, timeout=60)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert reason in done.stderr, (args, done.stderr)
