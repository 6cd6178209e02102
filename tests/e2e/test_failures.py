"""Failure handling end to end (issue 4): retries with backoff, the dead-letter queue, error
policies, timeouts, cancellation, long items, evictions, crashed agents and a resumed run.

Real nats-server, the services in-process (``helpers.services``), agents as child processes.
Item scripts live in files in the workdir so the shell never sees an interpolated value."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import Harness, services, stored_events
from helpers import read_stream as read_js_stream
from jetreduce.cli.submit import submit
from jetreduce.cli.watch import Watcher
from jetreduce.contract import events as ev
from jetreduce.contract.events import SubmitOptions
from jetreduce.embedded import EmbeddedServer
from support import env_without_jetreduce, wait_for

pytestmark = pytest.mark.anyio

JETREDUCE = [sys.executable, "-m", "jetreduce"]
TOKEN = secrets.token_hex(3)
"""Makes workflow ids unique per test process: helpers find agents by workflow id."""
RES = f"res-1-{TOKEN}"


# -- helpers ------------------------------------------------------------------------------------
async def start(h: Harness, text: str, workdir: Path, wf: str, **options: Any) -> Watcher:
    """Submit with any SubmitOptions (``timeout_s`` included) and return a started watcher."""
    watcher = Watcher(h.nc, h.subjects, wf, show_events=False, tty=False)
    await watcher.start()
    await submit(
        h.nc,
        h.subjects,
        text,
        SubmitOptions(workdir=str(workdir), **options),
        workflow_id=wf,
        source="test",
    )
    return watcher


async def finish(watcher: Watcher, wait_s: float) -> Any:
    try:
        return await watcher.until_done(wait_s)
    finally:
        await watcher.stop()


async def run(
    h: Harness, text: str, workdir: Path, wf: str, wait_s: float = 90, **opts: Any
) -> Any:
    return await finish(await start(h, text, workdir, wf, **opts), wait_s)


async def read_stream(h: Harness, stream: str, subject: str) -> list[Any]:
    """Every message stored on ``subject`` in ``stream``, decoded, in stream order."""
    return await read_js_stream(h.nc.jetstream(), stream, subject)


async def terminal(h: Harness, wf: str) -> list[ev.ItemDone | ev.ItemDead]:
    return await read_stream(h, h.subjects.results_stream, h.subjects.terminal_of(wf))


async def dlq_entries(h: Harness, wf: str) -> list[ev.ItemDead]:
    return await read_stream(h, h.subjects.dlq_stream, h.subjects.dlq_of(wf))


async def failed_attempts(h: Harness, wf: str) -> list[ev.ItemFailed]:
    events = await stored_events(h.nc, h.subjects, h.subjects.item_failed(wf, "*"))  # type: ignore[arg-type]
    return [e for e in events if isinstance(e, ev.ItemFailed)]


async def queued(h: Harness, wf: str) -> int:
    """Messages of ``wf`` still in the work stream."""
    resp = await h.nc.request(
        f"$JS.API.STREAM.INFO.{h.subjects.work_stream}",
        json.dumps({"subjects_filter": h.subjects.work_of(wf)}).encode(),
        timeout=5,
    )
    body = json.loads(resp.data)
    return sum((body.get("state", {}).get("subjects") or {}).values())


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def agent_pids(wf: str, phase: str | None = None) -> list[int]:
    """Live agent processes of workflow ``wf`` (optionally of one phase)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if "jetreduce.cli.agent_main" not in _cmdline(pid):
            continue
        env = _environ(pid)
        if env.get("JETREDUCE_WORKFLOW_ID") != wf:
            continue
        if phase is not None and env.get("JETREDUCE_PHASE") != phase:
            continue
        if alive(pid):
            found.append(pid)
    return found


def pids_in(directory: Path) -> list[int]:
    """Pids the item scripts wrote (one file per started process)."""
    return [int(p.read_text().split()[0]) for p in directory.iterdir() if p.read_text().strip()]


def script(workdir: Path, name: str, body: str) -> None:
    (workdir / name).write_text("set -u\n" + body)


def kill_everything(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


FAST_RETRY = """
error_policy:
  retry_config:
    max_attempts: {attempts}
    backoff:
      exponential:
        initial: 0.2s
        multiplier: 2
"""


# -- retries ------------------------------------------------------------------------------------
async def test_item_failing_twice_is_retried_with_backoff_then_done(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    script(
        workdir,
        "flaky.sh",
        'f="count-$1"; n=$(( $(cat "$f" 2>/dev/null || echo 0) + 1 )); echo $n > "$f"\n'
        'if [ $n -lt 3 ]; then echo "partial $n"; echo "boom attempt $n" >&2; exit 5; fi\n'
        'echo "ok $1 after $n"\n',
    )
    text = """
name: retries
map:
  input: "echo '[7]'"
  agent_template:
    - shell: "sh flaky.sh ${item}"
""" + FAST_RETRY.format(attempts=3)
    async with services(nats_url, prefix, tmp_path) as h:
        done = await run(h, text, workdir, f"retry-1-{TOKEN}")
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        assert (done.total, done.done, done.dead) == (1, 1, 0)
        results = await terminal(h, f"retry-1-{TOKEN}")
        failures = await failed_attempts(h, f"retry-1-{TOKEN}")
        assert await dlq_entries(h, f"retry-1-{TOKEN}") == []
    assert len(results) == 1 and isinstance(results[0], ev.ItemDone)
    assert results[0].attempts == 3 and results[0].output == "ok 7 after 3"
    assert [f.attempt for f in failures] == [1, 2]
    for f in failures:
        assert f.index == 0 and f.item_id == "item_0"
        assert f.exit_code == 5
        assert f"boom attempt {f.attempt}" in f.stderr_tail
        assert "exited with code 5" in f.error
    # Exponential backoff with +-20% jitter: 0.2 s then 0.4 s.
    delays = [f.retry_in_s for f in failures]
    assert delays[0] is not None and 0.16 <= delays[0] <= 0.24, delays
    assert delays[1] is not None and 0.32 <= delays[1] <= 0.48, delays
    # A delayed redelivery, not a hot loop: the next attempt failed no sooner than the delay.
    assert failures[1].ts - failures[0].ts >= delays[0] * 0.9
    assert results[0].ts - failures[1].ts >= delays[1] * 0.9


async def test_dead_after_last_attempt_with_full_dlq_entry_and_log(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    script(
        workdir,
        "bad.sh",
        'if [ "$1" = "2" ]; then echo "stdout of $1"; echo "bad thing $1" >&2; exit 7; fi\n'
        'echo "fine $1"\n',
    )
    text = """
name: dead
map:
  input: "echo '[{\\"n\\": 1}, {\\"n\\": 2}, {\\"n\\": 3}]'"
  agent_template:
    - shell: "sh bad.sh ${item.n}"
reduce:
  - shell: "echo ok=${map.successful} dead=${map.failed}"
""" + FAST_RETRY.format(attempts=2)
    async with services(nats_url, prefix, tmp_path) as h:
        done = await run(h, text, workdir, f"dead-1-{TOKEN}")
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        assert (done.total, done.done, done.dead) == (3, 2, 1)
        assert done.reduce_output == "ok=2 dead=1"
        results = await terminal(h, f"dead-1-{TOKEN}")
        entries = await dlq_entries(h, f"dead-1-{TOKEN}")
        failures = await failed_attempts(h, f"dead-1-{TOKEN}")
        assert len(entries) == 1
        store = await h.nc.jetstream().object_store(h.subjects.objects_bucket)
        log_object = entries[0].log_object
        assert log_object
        log_text = (await store.get(log_object)).data.decode()
    dead = [r for r in results if isinstance(r, ev.ItemDead)]
    assert sorted(r.index for r in results) == [0, 1, 2]
    assert len(dead) == 1 and dead[0].index == 1
    assert (dead[0].attempts, dead[0].exit_code, dead[0].error_type) == (2, 7, "CommandFailed")
    entry = entries[0]
    assert entry.workflow_id == f"dead-1-{TOKEN}" and entry.index == 1 and entry.item_id == "item_1"
    assert entry.item == {"n": 2}
    assert "exited with code 7" in entry.error
    assert entry.error_type == "CommandFailed"
    assert (entry.attempts, entry.exit_code) == (2, 7)
    assert "bad thing 2" in entry.stderr_tail
    assert "bad thing 2" in log_text and "stdout of 2" in log_text
    assert [(f.index, f.attempt) for f in failures] == [(1, 1), (1, 2)]
    assert failures[0].retry_in_s is not None and failures[1].retry_in_s is None


async def test_skip_policy_tries_once_and_writes_no_dlq_entry(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    text = """
name: skip
map:
  input: "echo '[1, 2, 3]'"
  agent_template:
    - shell: "test ${item} -ne 2"
error_policy:
  on_item_failure: skip
  retry_config:
    max_attempts: 3
"""
    async with services(nats_url, prefix, tmp_path) as h:
        done = await run(h, text, workdir, f"skip-1-{TOKEN}")
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        assert (done.total, done.done) == (3, 2)
        failures = await failed_attempts(h, f"skip-1-{TOKEN}")
        entries = await dlq_entries(h, f"skip-1-{TOKEN}")
        results = await terminal(h, f"skip-1-{TOKEN}")
    assert [(f.index, f.attempt, f.retry_in_s) for f in failures] == [(1, 1, None)]
    assert entries == []
    assert sorted(r.index for r in results) == [0, 1, 2]


# -- error policies -----------------------------------------------------------------------------
STOPPING = """
name: policy
map:
  input: "seq 1 {n}"
  max_parallel: 2
  agent_template:
    - shell: "sh item.sh ${{item}}"
error_policy:
{policy}
  retry_config:
    max_attempts: 1
"""


def _stopping_items(workdir: Path, fail_when: str) -> Path:
    """Items for which ``fail_when`` (shell test on $1) holds fail at once; the others record
    their pid and run long, so a policy stop has to kill them."""
    pids = workdir / "pids"
    pids.mkdir()
    script(
        workdir,
        "item.sh",
        f'if {fail_when}; then echo "failing $1" >&2; exit 3; fi\necho $$ > {pids}/$1\nsleep 60\n',
    )
    return pids


async def _assert_stopped(h: Harness, wf: str, pids: Path, total: int) -> None:
    await wait_for(lambda: not agent_pids(wf), timeout_s=20)
    await wait_for(lambda: not [p for p in pids_in(pids) if alive(p)], timeout_s=10)

    async def purged() -> bool:
        return await queued(h, wf) == 0

    # The janitor purges on the terminal event; it may still be on its way (CI: 28 left).
    await wait_for(purged, timeout_s=15)
    assert len(await terminal(h, wf)) < total


async def test_max_failures_stops_the_workflow_purges_and_stops_agents(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    pids = _stopping_items(workdir, '[ "$1" -le 2 ]')
    text = STOPPING.format(n=30, policy="  max_failures: 2")
    async with services(nats_url, prefix, tmp_path) as h:
        end = await run(h, text, workdir, f"maxf-1-{TOKEN}", wait_s=60)
        assert isinstance(end, ev.WorkflowFailed), h.agent_logs()
        assert "max_failures 2" in end.reason and "2 items failed" in end.reason
        await _assert_stopped(h, f"maxf-1-{TOKEN}", pids, 30)


async def test_failure_threshold_stops_after_ten_items(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    # Items 1-12 are quick (every third fails: 4 of 12 = 33% > 25%); the rest run long.
    pids = workdir / "pids"
    pids.mkdir()
    script(
        workdir,
        "item.sh",
        'if [ "$1" -le 12 ]; then [ $(( $1 % 3 )) -ne 0 ] && exit 0; exit 4; fi\n'
        f"echo $$ > {pids}/$1\nsleep 60\n",
    )
    text = STOPPING.format(n=40, policy="  failure_threshold: 0.25")
    async with services(nats_url, prefix, tmp_path) as h:
        end = await run(h, text, workdir, f"thr-1-{TOKEN}", wait_s=60)
        assert isinstance(end, ev.WorkflowFailed), h.agent_logs()
        assert "failure_threshold 25%" in end.reason
        results = await terminal(h, f"thr-1-{TOKEN}")
        assert len(results) >= 10, "the threshold applies only after 10 items"
        await _assert_stopped(h, f"thr-1-{TOKEN}", pids, 40)


async def test_failure_threshold_is_not_applied_below_ten_items(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    text = """
name: few
map:
  input: "seq 1 4"
  agent_template:
    - shell: "test ${item} -eq 1"
error_policy:
  failure_threshold: 0.5
  retry_config:
    max_attempts: 1
"""
    async with services(nats_url, prefix, tmp_path) as h:
        end = await run(h, text, workdir, f"thr-few-{TOKEN}")
        assert isinstance(end, ev.WorkflowCompleted), h.agent_logs()
        assert (end.done, end.dead) == (1, 3)


@pytest.mark.parametrize(
    "policy",
    ["  continue_on_failure: false", "  on_item_failure: stop"],
    ids=["no-continue", "stop"],
)
async def test_first_failure_stops_the_workflow(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path, policy: str
) -> None:
    pids = _stopping_items(workdir, '[ "$1" -eq 1 ]')
    text = STOPPING.format(n=20, policy=policy)
    async with services(nats_url, prefix, tmp_path) as h:
        end = await run(h, text, workdir, f"first-1-{TOKEN}", wait_s=60)
        assert isinstance(end, ev.WorkflowFailed), h.agent_logs()
        assert "stopped at the first failed item" in end.reason
        await _assert_stopped(h, f"first-1-{TOKEN}", pids, 20)


# -- timeouts -----------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["step", "agent"])
async def test_timeout_kills_the_whole_process_group(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path, where: str
) -> None:
    pids = workdir / "pids"
    pids.mkdir()
    script(
        workdir, "bg.sh", f"sleep 300 &\necho $! > {pids}/child-$1\necho $$ > {pids}/sh-$1\nwait\n"
    )
    step_timeout = "\n      timeout: 2" if where == "step" else ""
    agent_timeout = "\n  agent_timeout_secs: 2" if where == "agent" else ""
    text = f"""
name: timeouts
map:
  input: "echo '[1]'"{agent_timeout}
  agent_template:
    - shell: "sh bg.sh ${{item}}"{step_timeout}
error_policy:
  retry_config:
    max_attempts: 1
"""
    async with services(nats_url, prefix, tmp_path) as h:
        end = await run(h, text, workdir, f"to-{where}-{TOKEN}", wait_s=60)
        assert isinstance(end, ev.WorkflowCompleted), h.agent_logs()
        assert end.dead == 1
        (dead,) = await terminal(h, f"to-{where}-{TOKEN}")
    assert isinstance(dead, ev.ItemDead)
    assert dead.error_type == "Timeout" and "timed out" in dead.error
    assert dead.duration_s < 15
    child = int((pids / "child-1").read_text())
    parent = int((pids / "sh-1").read_text())
    # The background child (same process group, never waited for by us) is gone too.
    await wait_for(lambda: not alive(child) and not alive(parent), timeout_s=5)


async def test_workflow_timeout_ends_as_timed_out(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    pids = _stopping_items(workdir, "false")
    text = STOPPING.format(n=6, policy="  max_failures: 100")
    async with services(nats_url, prefix, tmp_path) as h:
        t0 = time.monotonic()
        end = await run(h, text, workdir, f"wto-1-{TOKEN}", wait_s=30, timeout_s=3)
        elapsed = time.monotonic() - t0
        assert isinstance(end, ev.WorkflowTimedOut), h.agent_logs()
        assert end.timeout_s == 3
        assert elapsed < 10
        await _assert_stopped(h, f"wto-1-{TOKEN}", pids, 6)


# -- cancellation -------------------------------------------------------------------------------
async def _cancel_scenario(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path, agents_gone_within_s: float
) -> None:
    wf = f"cancel-1-{TOKEN}"
    pids = _stopping_items(workdir, "false")
    text = STOPPING.format(n=20, policy="  max_failures: 100")
    async with services(nats_url, prefix, tmp_path) as h:
        watcher = await start(h, text, workdir, wf)
        try:
            await wait_for(lambda: len(pids_in(pids)) >= 2, timeout_s=30)
            env = env_without_jetreduce() | {"JETREDUCE_PREFIX": prefix}
            out = await asyncio.to_thread(
                subprocess.run,
                [*JETREDUCE, "cancel", wf, "--nats", nats_url, "--reason", "enough"],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
            )
            assert out.returncode == 0, out.stderr
            assert "cancelled" in out.stderr
            end = await finish(watcher, 10)
        finally:
            await watcher.stop()
        assert isinstance(end, ev.WorkflowCancelled), h.agent_logs()
        assert end.reason == "enough"
        (request,) = await stored_events(
            h.nc, h.subjects, h.subjects.workflow("cancel", f"cancel-1-{TOKEN}")
        )
        assert end.ts - request.ts < 5, "workflow.cancelled later than 5 s after the request"
        assert await queued(h, f"cancel-1-{TOKEN}") == 0, "queued items were not purged"
        assert await terminal(h, f"cancel-1-{TOKEN}") == []
        gone_by = request.ts + agents_gone_within_s
        await wait_for(lambda: not agent_pids(f"cancel-1-{TOKEN}"), timeout_s=gone_by - time.time())
        await wait_for(
            lambda: not [p for p in pids_in(pids) if alive(p)], timeout_s=gone_by - time.time()
        )


async def test_cancel_command_cancels_within_five_seconds_purges_and_stops_agents(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    # Agents (and their steps) must go; how fast is the next test's business.
    await _cancel_scenario(nats_url, prefix, tmp_path, workdir, agents_gone_within_s=20)


async def test_cancel_stops_agents_and_steps_within_five_seconds(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    await _cancel_scenario(nats_url, prefix, tmp_path, workdir, agents_gone_within_s=5)


# -- leases, evictions, crashes -----------------------------------------------------------------
async def test_long_item_stays_leased_and_is_never_redelivered(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    starts = workdir / "starts"
    starts.mkdir()
    script(workdir, "long.sh", f"echo $$ >> {starts}/$1\nsleep 7\necho finished $1\n")
    text = """
name: long
map:
  input: "echo '[1, 2]'"
  max_parallel: 2
  agent_template:
    - shell: "sh long.sh ${item}"
"""
    async with services(nats_url, prefix, tmp_path) as h:
        done = await run(h, text, workdir, f"long-1-{TOKEN}", wait_s=60, lease_s=2)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        results = await terminal(h, f"long-1-{TOKEN}")
    assert sorted(r.index for r in results) == [0, 1]
    assert all(isinstance(r, ev.ItemDone) and r.attempts == 1 for r in results)
    for n in (1, 2):
        assert len((starts / str(n)).read_text().split()) == 1, f"item {n} started twice"


def _first_start_hangs(workdir: Path) -> Path:
    """Item 1 hangs on its first start and succeeds at once on any later start."""
    starts = workdir / "starts"
    starts.mkdir()
    script(
        workdir,
        "evict.sh",
        f"echo $$ >> {starts}/$1\n"
        f'if [ "$1" = 1 ] && [ $(wc -l < {starts}/$1) -eq 1 ]; then sleep 120; fi\n'
        "echo done $1\n",
    )
    return starts


EVICT = """
name: evict
map:
  input: "echo '[1, 2]'"
  max_parallel: 2
  agent_template:
    - shell: "sh evict.sh ${item}"
"""


def _agent_running(wf: str, step_pid: int) -> int:
    """The map agent whose session holds ``step_pid``."""
    stat = Path(f"/proc/{step_pid}/stat").read_text().rsplit(")", 1)[-1].split()
    session = int(stat[3])
    assert session in agent_pids(wf, "map"), (session, agent_pids(wf, "map"))
    return session


async def test_sigterm_hands_the_in_flight_item_back_at_once(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 2 s grace (the default is 20 s) against a 60 s lease: the same property, sooner.
    monkeypatch.setenv("JETREDUCE_GRACE_S", "2")
    starts = _first_start_hangs(workdir)
    async with services(nats_url, prefix, tmp_path) as h:
        watcher = await start(h, EVICT, workdir, f"evict-1-{TOKEN}", lease_s=60)
        try:
            await wait_for(lambda: (starts / "1").exists() and (starts / "2").exists(), 30)
            agent = _agent_running(f"evict-1-{TOKEN}", int((starts / "1").read_text().split()[0]))
            t0 = time.monotonic()
            os.kill(agent, signal.SIGTERM)
            # The item sleeps 120 s on this agent and the lease is 60 s.
            end = await finish(watcher, 35)
            elapsed = time.monotonic() - t0
        finally:
            await watcher.stop()
        assert isinstance(end, ev.WorkflowCompleted), h.agent_logs()
        assert (end.done, end.dead) == (2, 0)
        results = {r.index: r for r in await terminal(h, f"evict-1-{TOKEN}")}
    assert len((starts / "1").read_text().split()) == 2
    assert results[0].attempts == 2
    # Handed back after the grace period (2 s), never waiting out the 60 s lease.
    assert elapsed < 20, f"item came back after {elapsed:.1f}s"


async def test_grace_period_setting_reaches_local_agents(
    nats_url: str,
    prefix: str,
    tmp_path: Path,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("JETREDUCE_GRACE_S", "1")
    starts = _first_start_hangs(workdir)
    async with services(nats_url, prefix, tmp_path) as h:
        watcher = await start(h, EVICT, workdir, f"grace-1-{TOKEN}", lease_s=60)
        try:
            await wait_for(lambda: (starts / "1").exists() and (starts / "2").exists(), 30)
            agent = _agent_running(f"grace-1-{TOKEN}", int((starts / "1").read_text().split()[0]))
            assert _environ(agent).get("JETREDUCE_GRACE_S") == "1"
        finally:
            await h.nc.publish(
                h.subjects.workflow("cancel", f"grace-1-{TOKEN}"),
                ev.encode(ev.WorkflowCancelRequested(workflow_id=f"grace-1-{TOKEN}")),
            )
            await watcher.stop()


async def test_sigkilled_agent_item_is_redelivered_after_the_lease_and_done_once(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    starts = _first_start_hangs(workdir)
    async with services(nats_url, prefix, tmp_path) as h:
        watcher = await start(h, EVICT, workdir, f"kill-1-{TOKEN}", lease_s=3)
        try:
            await wait_for(lambda: (starts / "1").exists() and (starts / "2").exists(), 30)
            step = int((starts / "1").read_text().split()[0])
            agent = _agent_running(f"kill-1-{TOKEN}", step)
            t0 = time.monotonic()
            os.kill(agent, signal.SIGKILL)
            end = await finish(watcher, 60)
            elapsed = time.monotonic() - t0
        finally:
            await watcher.stop()
        assert isinstance(end, ev.WorkflowCompleted), h.agent_logs()
        assert (end.done, end.dead) == (2, 0)
        results = await terminal(h, f"kill-1-{TOKEN}")
    assert sorted(r.index for r in results) == [0, 1]
    by_index = {r.index: r for r in results}
    assert by_index[0].attempts == 2
    assert len((starts / "1").read_text().split()) == 2
    assert elapsed >= 2.5, "redelivered before the lease ran out"
    await wait_for(lambda: not alive(step), timeout_s=5)  # the orphaned step died with it


# -- resume -------------------------------------------------------------------------------------
def _processes_mentioning(text: str) -> list[int]:
    return [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and any(text in c for c in _cmdline(int(p.name))) and alive(int(p.name))
    ]


LEASE = ("--lease", "3")


def _run_kill_resume(
    work: Path,
    data: Path,
    wf_file: Path,
    starts: Path,
    *,
    only_the_run: bool = False,
    resume_timeout_s: float = 120,
) -> tuple[Any, float]:
    """``jetreduce run`` killed mid-map with everything it started (or, ``only_the_run``, just
    its own process), then ``resume``. Returns the resume's CompletedProcess and the
    wall-clock time of the kill."""
    env = env_without_jetreduce()
    proc = subprocess.Popen(
        # A short lease: what the killed run had in flight runs again after 3 s, not 30.
        [*JETREDUCE, "run", str(wf_file), "--id", RES, "--data-dir", str(data), "-q", *LEASE],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(starts.iterdir())) < 10:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the run never got going"
            time.sleep(0.05)
        if only_the_run:
            os.kill(proc.pid, signal.SIGKILL)
        else:  # everything the run started dies at once: the run, its nats-server, agents
            kill_everything([proc.pid, *_processes_mentioning(str(data)), *agent_pids(RES)])
        killed_at = time.time()
        proc.wait(10)
        assert len(list(starts.iterdir())) < 40, "the run finished before it was killed"
        resumed = subprocess.run(
            [*JETREDUCE, "resume", RES, "--data-dir", str(data)],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=resume_timeout_s,
            env=env,
        )
    finally:
        kill_everything([proc.pid, *_processes_mentioning(str(data)), *agent_pids(RES)])
    return resumed, killed_at


def _resumable(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """A 40-item workflow slow enough to be killed mid-map: (data dir, workdir, the folder of
    per-item start markers, the workflow file)."""
    data = tmp_path / "data"
    work = tmp_path / "work"
    work.mkdir()
    starts = work / "starts"
    starts.mkdir()
    script(work, "slow.sh", f"echo $$ >> {starts}/$1\nsleep 0.4\necho out-$1\n")
    wf_file = work / "wf.yml"
    wf_file.write_text(f"""
name: resumable
map:
  input: "seq 1 40"
  max_parallel: 2
  agent_template:
    - shell: "sh slow.sh ${{item}}"
reduce:
  - shell: "cp ${{map.results_file}} {work}/results.jsonl"
  - shell: "wc -l < ${{map.results_file}} | tr -d ' '"
  - shell: "echo ${{map.successful}}/${{map.total}}"
""")
    return data, work, starts, wf_file


async def test_resume_after_the_run_process_is_killed(tmp_path: Path) -> None:
    data, work, starts, wf_file = _resumable(tmp_path)
    resumed, killed_at = await asyncio.to_thread(_run_kill_resume, work, data, wf_file, starts)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert resumed.stdout.split() == ["40", "40/40"]
    lines = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    assert [r["item_id"] for r in lines] == [f"item_{i}" for i in range(40)]
    assert [r["output"] for r in lines] == [f"out-{i + 1}" for i in range(40)]

    # Read the store back: every item terminal once; none done before the kill ran again.
    server = EmbeddedServer(data / "nats").start()
    try:
        import nats

        nc = await nats.connect(server.url)
        try:
            from jetreduce.contract.subjects import Subjects

            s = Subjects("")
            js = nc.jetstream()
            results: list[Any] = await read_js_stream(
                js, s.results_stream, s.terminal_of(f"res-1-{TOKEN}")
            )
        finally:
            await nc.close()
    finally:
        server.stop()
    assert sorted(r.index for r in results) == list(range(40))
    before = [r for r in results if r.ts < killed_at]
    assert before, "nothing was terminal before the kill"
    for r in before:
        runs = len((starts / str(r.index + 1)).read_text().split())
        assert runs == 1, f"item {r.index} was terminal before the kill but ran {runs} times"


async def test_resume_after_only_the_run_process_is_sigkilled(tmp_path: Path) -> None:
    """``kill -9`` of the run alone leaves its nats-server and agents orphaned (they have
    sessions of their own); resume must still finish the workflow correctly."""
    data, work, starts, wf_file = _resumable(tmp_path)
    resumed, _ = await asyncio.to_thread(
        _run_kill_resume, work, data, wf_file, starts, only_the_run=True, resume_timeout_s=60
    )
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.split() == ["40", "40/40"]
    lines = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    assert [r["item_id"] for r in lines] == [f"item_{i}" for i in range(40)]


async def test_item_that_keeps_killing_its_agent_is_dead_lettered_as_agent_crashed(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    """Past the work consumer's max deliveries (max_attempts + 3) the janitor turns the
    server's advisory into a dead item and a DLQ entry."""
    starts = workdir / "starts"
    starts.mkdir()
    # The step's session is its agent's pid (an agent leads its own session): kill it.
    script(
        workdir,
        "crash.sh",
        f"echo $$ >> {starts}/$1\n"
        'if [ "$1" = 2 ]; then kill -9 "$(cut -d" " -f6 /proc/$$/stat)"; sleep 30; fi\n'
        "echo fine $1\n",
    )
    text = """
name: crasher
map:
  input: "echo '[1, 2, 3]'"
  max_parallel: 2
  agent_template:
    - shell: "sh crash.sh ${item}"
error_policy:
  retry_config:
    max_attempts: 1
"""
    async with services(nats_url, prefix, tmp_path) as h:
        end = await run(h, text, workdir, f"crash-1-{TOKEN}", wait_s=90, lease_s=1)
        assert isinstance(end, ev.WorkflowCompleted), h.agent_logs()
        assert (end.done, end.dead) == (2, 1)
        results = {r.index: r for r in await terminal(h, f"crash-1-{TOKEN}")}
        entries = await dlq_entries(h, f"crash-1-{TOKEN}")
    assert sorted(results) == [0, 1, 2]
    dead = results[1]
    assert isinstance(dead, ev.ItemDead) and dead.error_type == "AgentCrashed"
    assert [(e.index, e.error_type, e.item, e.attempts) for e in entries] == [
        (1, "AgentCrashed", 2, 4)
    ]
    assert len((starts / "2").read_text().split()) == 4
