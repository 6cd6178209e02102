"""Prodigy-shaped workflows end to end: step modifiers, captures, secrets, args and profiles,
claude steps (through a stub that records what it was sent), git worktrees with
``commit_required`` and merges. Real nats-server, in-process services, agents as children."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import Harness, item_results, read_stream, services
from jetreduce.contract import events as ev
from jetreduce.contract.objects import log_object
from support import env_without_jetreduce, git, init_repo, wait_for

pytestmark = pytest.mark.anyio

SECRET = "s3cr3t-VALUE-9f2b7"


async def stored(h: Harness, stream: str, subject: str) -> list[ev.Event]:
    return await read_stream(h.nc.jetstream(), stream, subject)


async def test_string_items_from_setup_file_and_reduce_with_results_and_write_file(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    text = """
name: strings
mode: mapreduce
setup:
  - shell: 'printf ''["alpha", "beta", "gamma"]'' > names.json'
map:
  input: names.json
  max_parallel: 3
  agent_template:
    - shell: echo "name=${item} id=${item_id}"
reduce:
  - write_file:
      path: out/summary.json
      format: json
      create_dirs: true
      content: '{"total": ${map.total}, "ok": ${map.successful}, "results": ${map.results}}'
  - shell: cat out/summary.json | wc -l | tr -d ' '
"""
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(text, workdir)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
    assert (done.total, done.done, done.dead) == (3, 3, 0)
    summary = json.loads((workdir / "out" / "summary.json").read_text())
    assert summary["total"] == 3 and summary["ok"] == 3
    assert [r["output"] for r in summary["results"]] == [
        "name=alpha id=item_0",
        "name=beta id=item_1",
        "name=gamma id=item_2",
    ]
    assert all(r["status"] == "Success" for r in summary["results"])


async def test_command_input_producing_lines(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    text = """
name: lines
mode: mapreduce
map:
  input: "printf 'one\\ntwo words\\nthree\\n'"
  agent_template:
    - shell: echo "[${item.item}]"
reduce:
  - shell: echo "${map.successful}/${map.total}"
"""
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(text, workdir)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        results = await item_results(h, done.workflow_id)
    assert done.reduce_output == "3/3"
    assert [results[i].output for i in range(3)] == ["[one]", "[two words]", "[three]"]


async def test_step_modifiers_in_map(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    """when, capture (json + streams), on_failure with max_attempts retrying the original,
    on_exit_code, on_success, a recovering handler, and per-step env/working_dir/timeout."""
    (workdir / "sub").mkdir()
    text = """
name: modifiers
mode: mapreduce
map:
  input: "echo '[{\\"n\\": 1, \\"kind\\": \\"a\\"}, {\\"n\\": 2, \\"kind\\": \\"b\\"}]'"
  agent_template:
    - shell: >-
        echo '{"double": '$(( ${item.n} * 2 ))'}'
      capture: calc
      capture_format: json
    - shell: echo "only-a"
      when: "${item.kind} == 'a' && ${calc.success}"
    - shell: |
        n=$(cat tries-${item.n} 2>/dev/null || echo 0)
        echo $((n+1)) > tries-${item.n}
        [ $n -ge 1 ]
      on_failure:
        shell: echo "fixing ${item.n}" >&2
        max_attempts: 2
        fail_workflow: true
    - shell: "exit 7"
      on_exit_code:
        7: {shell: "echo handled-7"}
    - shell: "exit 1"
      on_failure: "echo recovered"
    - shell: "pwd; echo $GREETING"
      working_dir: sub
      env: {GREETING: "hi-${item.n}"}
      timeout: 30
      on_success: {shell: "echo after-success"}
    - shell: echo "double=${calc.double} exit=${calc.exit_code}"
"""
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(text, workdir, workspace="shared")
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        results = await item_results(h, done.workflow_id)
    assert (done.done, done.dead) == (2, 0)
    sub = str((workdir / "sub").resolve())
    # skipped steps and empty stdouts add nothing; handlers' output is not the item's
    assert results[0].output == f'{{"double": 2}}\nonly-a\n{sub}\nhi-1\ndouble=2 exit=0'
    out1 = results[1].output
    assert "only-a" not in out1 and "double=4 exit=0" in out1
    # the original step ran twice per item (max_attempts retried it after the handler)
    assert (workdir / "tries-1").read_text().strip() == "2"
    assert (workdir / "tries-2").read_text().strip() == "2"


async def test_failing_step_without_handler_fails_the_item(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    text = """
name: failing
mode: mapreduce
map:
  input: "echo '[1, 2]'"
  agent_template:
    - shell: "test ${item} -ne 2"
    - shell: "echo never-${item} >> never.txt"
      when: "${item} == 2"
"""
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(text, workdir, max_attempts=1)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        results = await item_results(h, done.workflow_id)
    assert (done.done, done.dead) == (1, 1)
    assert isinstance(results[1], ev.ItemDead) and results[1].error_type == "CommandFailed"
    assert "step 1 (shell) exited with code 1" in results[1].error
    assert not (workdir / "never.txt").exists()


async def test_fail_workflow_in_a_map_step_fails_the_workflow(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    """``on_failure: {…, fail_workflow: true}`` in map: the handler runs once, the item is
    dead without item retries, ``map.failed`` is published, the workflow fails and stops
    (later items never run, reduce never runs)."""
    text = """
name: fatal
mode: mapreduce
map:
  input: "seq 0 39"
  max_parallel: 2
  agent_template:
    - shell: "test ${item} -ne 3 && sleep 0.3"
      on_failure:
        shell: "echo handled ${item} >> handled.txt"
        fail_workflow: true
reduce:
  - shell: "touch reduced.txt"
"""
    async with services(nats_url, prefix, tmp_path) as h:
        end = await h.run(text, workdir, max_attempts=3, workspace="shared")
        assert isinstance(end, ev.WorkflowFailed), h.agent_logs()
        wf = end.workflow_id

        async def item_3_recorded() -> dict[int, Any] | None:
            # The item's dead result is written beside the workflow's failure, not before it.
            results = await item_results(h, wf)
            return results if 3 in results else None

        results = await wait_for(item_3_recorded)
        failed = await stored(h, h.subjects.events_stream, h.subjects.item_failed(wf, 3))
        events = await stored(h, h.subjects.events_stream, h.subjects.map("failed", wf))
    assert "item_3" in end.reason and "fail_workflow" in end.reason
    assert isinstance(results[3], ev.ItemDead) and results[3].attempts == 1
    assert [(e.attempt, e.retry_in_s) for e in failed if isinstance(e, ev.ItemFailed)] == [
        (1, None)
    ]
    assert [(e.index, e.item_id) for e in events if isinstance(e, ev.MapFailed)] == [(3, "item_3")]
    assert (workdir / "handled.txt").read_text() == "handled 3\n"
    assert len(results) < 40, "the workflow went on after the fatal item"
    assert not (workdir / "reduced.txt").exists()


async def test_secret_never_appears_in_events_or_logs(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JR_TEST_TOKEN", SECRET)
    (workdir / "token-file").write_text(SECRET + "-file\n")
    text = """
name: secretive
mode: mapreduce
secrets:
  API_TOKEN: "${env:JR_TEST_TOKEN}"
  FILE_TOKEN: {provider: file, key: token-file}
setup:
  - shell: echo "setup sees $API_TOKEN"
    capture: leaked
map:
  input: "echo '[1, 2]'"
  agent_template:
    - shell: echo "token=${API_TOKEN} file=$FILE_TOKEN leaked=${leaked}"
    - shell: echo "to stderr $API_TOKEN" >&2; test ${item} -eq 1
reduce:
  - shell: 'echo "reduce $API_TOKEN ${map.results}"; test -n "$API_TOKEN"'
"""
    payloads: list[bytes] = []

    async def record(msg: Any) -> None:
        payloads.append(msg.subject.encode() + b" " + msg.data)

    async with services(nats_url, prefix, tmp_path) as h:
        sub = await h.nc.subscribe(">", cb=record)
        try:
            done = await h.run(text, workdir, max_attempts=1)
            await h.nc.flush()
        finally:
            await sub.unsubscribe()
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        logs = h.agent_logs()
        objects = await h.nc.jetstream().object_store(h.subjects.objects_bucket)
        stored_log = (await objects.get(log_object(done.workflow_id, 1))).data or b""
    assert (done.done, done.dead) == (1, 1)
    assert "token=*** file=*** leaked=setup sees ***" in done.reduce_output
    assert payloads and any(b"item.dead" in p for p in payloads)
    assert not [p for p in payloads if SECRET.encode() in p]
    assert SECRET not in logs
    assert SECRET.encode() not in stored_log and b"to stderr ***" in stored_log


async def test_args_profile_and_env_files(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    (workdir / "vars.env").write_text('export FROM_FILE="file value"\n# comment\n')
    text = """
name: params
mode: mapreduce
env:
  TARGET: "$1"
  LEVEL: normal
env_files: [vars.env]
profiles:
  loud:
    description: shout
    LEVEL: loud
map:
  input: "echo '[1]'"
  agent_template:
    - shell: echo "$TARGET ${ARG_2} $ARG_2 $LEVEL ${FROM_FILE}"
reduce:
  - shell: echo "reduce $1 $LEVEL"
"""
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(text, workdir, args=["first", "second"], profile="loud")
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        results = await item_results(h, done.workflow_id)
    assert results[0].output == "first second second loud file value"
    assert done.reduce_output == "reduce first loud"


async def test_claude_steps_send_the_rendered_prompt(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "claude-calls.jsonl"
    stub = bin_dir / "claude"
    stub.write_text(
        "#!/usr/bin/env python3\n"
        "import json, os, sys\n"
        f"with open({str(record)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'argv': sys.argv[1:],"
        " 'automation': os.environ.get('PRODIGY_AUTOMATION'), 'cwd': os.getcwd()}) + '\\n')\n"
        "print('claude says ' + sys.argv[-1])\n"
    )
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    text = """
name: claude-stub
mode: mapreduce
map:
  input: "echo '[{\\"file\\": \\"a.py\\"}]'"
  agent_template:
    - claude: "/fix-file ${item.file} --id ${item_id}"
      capture_output: true
    - shell: "exit 3"
      on_failure:
        claude: "/repair after: ${claude.output}"
        max_attempts: 1
reduce:
  - claude: "/summarize ${map.successful} of ${map.total}"
"""
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(text, workdir)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    prompts = [c["argv"] for c in calls]
    assert prompts == [
        ["--print", "--dangerously-skip-permissions", "/fix-file a.py --id item_0"],
        [
            "--print",
            "--dangerously-skip-permissions",
            "/repair after: claude says /fix-file a.py --id item_0",
        ],
        ["--print", "--dangerously-skip-permissions", "/summarize 1 of 1"],
    ]
    assert all(c["automation"] == "true" for c in calls)
    assert done.reduce_output == "claude says /summarize 1 of 1"


@pytest.mark.parametrize("workspace", ["agent", "item"])
async def test_commit_validation_with_worktrees(
    nats_url: str,
    prefix: str,
    tmp_path: Path,
    workdir: Path,
    prodigy_examples: Path,
    workspace: str,
) -> None:
    """Prodigy's own test-commit-validation.yml, unchanged: item 2 makes no commit. In a
    worktree per agent (the default in a repository) or per item (``--worktrees``)."""
    init_repo(workdir)
    text = (prodigy_examples / "test-commit-validation.yml").read_text()
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(text, workdir, workspace=workspace, max_attempts=1)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        dlq = await stored(h, h.subjects.dlq_stream, h.subjects.dlq_of(done.workflow_id))
    assert (done.total, done.done, done.dead) == (3, 2, 1)
    assert "Expected: 2 successful (id 1,3), 1 failed (id 2)" in done.reduce_output
    assert len(dlq) == 1
    dead = dlq[0]
    assert isinstance(dead, ev.ItemDead)
    assert dead.error_type == "CommitValidationFailed"
    assert dead.item["id"] == 2 and "made no commit" in dead.error
    # the successful items' commits are merged into the workflow branch, before reduce
    assert (workdir / "file1.txt").read_text() == "Test content for item 1\n"
    assert (workdir / "file3.txt").read_text() == "Test content for item 3\n"
    assert not (workdir / "file2.txt").exists()
    log = git(workdir, "log", "--format=%s", "main")
    assert "Add file1.txt for item 1" in log and "Add file3.txt for item 3" in log
    assert git(workdir, "branch", "--show-current").strip() == "main"
    # worktrees are gone; no branch of a merged or empty item remains (agents' own
    # worktrees go when the agents exit, which may be just after the workflow's end)
    await wait_for(
        lambda: (
            git(workdir, "worktree", "list").count("\n") == 1
            and "jetreduce-" not in git(workdir, "branch", "--list")
        ),
        timeout_s=20,
    )


async def test_worktrees_need_a_git_repository(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    text = """
name: no-repo
mode: mapreduce
map:
  input: "echo '[1]'"
  agent_template:
    - shell: "true"
"""
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(text, workdir, workspace="item")
    assert isinstance(done, ev.WorkflowFailed)
    assert "--worktrees needs" in done.reason and "git repository" in done.reason


# --- CLI ---------------------------------------------------------------------------------------

JETREDUCE = [sys.executable, "-m", "jetreduce"]


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path: Path) -> None:
    (tmp_path / "items.json").write_text(json.dumps({"items": [{"n": i} for i in range(7)]}))
    wf = tmp_path / "wf.yml"
    wf.write_text("""
name: planned
mode: mapreduce
map:
  input: items.json
  json_path: "$.items[*]"
  filter: "n >= 4"
  max_parallel: 10
  agent_template:
    - shell: "touch ran-${item.n}"
reduce:
  - shell: "touch reduced"
""")
    out = subprocess.run(
        [*JETREDUCE, "run", str(wf), "--dry-run", "--data-dir", str(tmp_path / "data")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=env_without_jetreduce(),
    )
    assert out.returncode == 0, out.stderr
    assert "[DRY RUN]" in out.stdout and "MapReduce" in out.stdout
    assert "3 items" in out.stdout and 'item_0: {"n":4}' in out.stdout
    assert "parallelism: 3 (max_parallel 10)" in out.stdout
    assert not list(tmp_path.glob("ran-*")) and not (tmp_path / "reduced").exists()
    assert not (tmp_path / "data").exists()  # no server was even started


def test_dry_run_counts_the_input_the_run_would_read(tmp_path: Path) -> None:
    """``map.input`` rendered with the profile and an env file, as the setup agent renders it
    (lang/map_input.py): the dry run counts that file, not another (issue 16)."""
    (tmp_path / "items-dev.json").write_text(json.dumps(list(range(5))))
    (tmp_path / "items-prod.json").write_text(json.dumps(list(range(9))))
    (tmp_path / "vars.env").write_text("STAGE=prod\n")
    wf = tmp_path / "wf.yml"
    wf.write_text("""
name: profiled
mode: mapreduce
env_files: [vars.env]
profiles:
  dev: {STAGE: dev}
map:
  input: "items-${STAGE}.json"
  agent_template:
    - shell: "true"
""")

    def count(*extra: str) -> str:
        out = subprocess.run(
            [*JETREDUCE, "run", str(wf), "--dry-run", *extra],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env=env_without_jetreduce(),
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "9 items" in count()  # the env file's STAGE
    assert "5 items" in count("--profile", "dev")  # the profile's wins


def test_sigterm_exits_143(tmp_path: Path) -> None:
    started = tmp_path / "started"
    wf = tmp_path / "slow.yml"
    wf.write_text(f"""
name: slow
map:
  input: "seq 1 2"
  agent_template:
    - shell: "touch {started}; sleep 60"
""")
    proc = subprocess.Popen(
        [*JETREDUCE, "run", str(wf), "--data-dir", str(tmp_path / "data")],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_without_jetreduce(),
    )
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the step never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM): workflow" in err and "jetreduce resume" in err
