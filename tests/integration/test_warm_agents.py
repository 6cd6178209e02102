"""Warm agents (launcher/warm.py, cli/agent_host.py): an agent forked from the warm host is
the process an exec'd one was (environment, working directory, session, stdio, signal
dispositions and mask, open files, what /proc shows), shares nothing random with its
siblings, keeps no secret in the host, is supervised with the same exit codes, and dies
with the launcher; without a host, agents are exec'd as before.

The agents are the probe in tests/warm_probe.py (``entry="warm_probe:main"``): it writes
what it sees of its own process to its log, then does what ``PROBE_MODE`` says."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.records import StoredSpec
from jetreduce.lang.parse import parse_workflow
from jetreduce.launcher import warm
from jetreduce.launcher.local import AGENT_COMMAND, LocalBackend
from jetreduce.launcher.warm import WARM_ENV, WarmHost
from jetreduce.runtime.settings import NatsSettings
from support import wait_for

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not warm.warm_supported(), reason="warm agents need Linux x86-64/arm64"),
]

TESTS = Path(__file__).resolve().parents[1]
PROBE = "warm_probe:main"
Exit = tuple[int, int, bool, int]


def probe_env(**extra: str) -> dict[str, str]:
    """An agent's environment: the probe's path, this run's leak token (so a leaked agent
    is found), and ``extra``."""
    return {
        "PYTHONPATH": str(TESTS),
        "JRTEST_LEAK_TOKEN": os.environ["JRTEST_LEAK_TOKEN"],
        **extra,
    }


def lines(log: Path) -> list[dict[str, Any]]:
    try:
        text = log.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def probed(log: Path) -> dict[str, Any]:
    """The probe's report of itself (the first line it writes)."""
    found: list[dict[str, Any]] = await wait_for(lambda: lines(log), timeout_s=10)
    return found[0]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def proc_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(kv.split("=", 1) for kv in raw.split("\0") if "=" in kv)


def memory_holds(pid: int, needle: bytes) -> bool:
    """Whether ``needle`` is anywhere in the readable memory of process ``pid`` (a child
    of this one: Yama's default ptrace scope lets a parent read it)."""
    try:
        mem_file = open(f"/proc/{pid}/mem", "rb", 0)  # noqa: SIM115
    except PermissionError:
        pytest.skip("this machine does not let a process read its child's memory")
    with open(f"/proc/{pid}/maps") as maps, mem_file as mem:
        for line in maps:
            fields = line.split()
            if not fields[1].startswith("r") or (len(fields) > 5 and fields[5] == "[vvar]"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            with contextlib.suppress(OSError, ValueError, OverflowError):
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
    return False


async def spawn(host: WarmHost, log: Path, env: dict[str, str], cwd: Path) -> warm.WarmProcess:
    with open(log, "ab") as out:
        return await host.spawn(env, str(cwd), out.fileno(), PROBE, AGENT_COMMAND)


async def test_a_warm_agent_is_the_process_an_exec_would_be(tmp_path: Path) -> None:
    env = probe_env(PROBE_MODE="wait", TZ="UTC")
    (tmp_path / "warm").mkdir()
    (tmp_path / "exec").mkdir()
    exec_log, warm_log = tmp_path / "exec.log", tmp_path / "warm.log"
    with open(exec_log, "ab") as out:
        cold_proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "import sys, warm_probe; sys.exit(warm_probe.main())",
            env=env,
            cwd=tmp_path / "exec",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    host = WarmHost()
    try:
        agent = await spawn(host, warm_log, env, tmp_path / "warm")
        cold, hot = await probed(exec_log), await probed(warm_log)
        assert hot["env"] == env
        # An exec'd interpreter may add LC_CTYPE when there is no locale (PEP 538); the
        # warm child has exactly what the launcher computed.
        assert {k: v for k, v in cold["env"].items() if k != "LC_CTYPE"} == env
        assert hot["cwd"] == str(tmp_path / "warm")
        assert hot["pid"] == hot["sid"] == hot["pgid"] == agent.pid  # its own session
        assert hot["ppid"] == os.getpid()  # the launcher's child, not the host's
        assert (hot["stdin"], hot["stdout"]) == ("/dev/null", str(warm_log))
        for key in ("handlers", "mask", "fds", "loggers"):
            assert hot[key] == cold[key], key
        # What is seen from outside is the agent's, not the host's.
        assert proc_environ(agent.pid) == env
        cmdline = Path(f"/proc/{agent.pid}/cmdline").read_bytes().split(b"\0")
        assert [c.decode() for c in cmdline if c] == list(AGENT_COMMAND)
        os.killpg(agent.pid, signal.SIGTERM)
        os.killpg(cold_proc.pid, signal.SIGTERM)
        assert await asyncio.wait_for(agent.wait(), 10) == -signal.SIGTERM
        assert await asyncio.wait_for(cold_proc.wait(), 10) == -signal.SIGTERM
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(cold_proc.pid, signal.SIGKILL)
        await cold_proc.wait()
        await host.stop()


async def test_one_agents_secret_is_neither_in_the_host_nor_in_the_next_agent(
    tmp_path: Path,
) -> None:
    secret = secrets.token_hex(16)
    host = WarmHost()
    try:
        first = await spawn(host, tmp_path / "a.log", probe_env(SECRET=secret), tmp_path)
        assert await asyncio.wait_for(first.wait(), 10) == 0
        second = await spawn(host, tmp_path / "b.log", probe_env(PROBE_MODE="wait"), tmp_path)
        seen = await probed(tmp_path / "b.log")
        assert "SECRET" not in seen["env"]
        assert secret.encode() not in Path(f"/proc/{second.pid}/environ").read_bytes()
        assert not memory_holds(second.pid, secret.encode())
        assert host.proc is not None
        assert not memory_holds(host.proc.pid, secret.encode())
        assert secret.encode() not in Path(f"/proc/{host.proc.pid}/environ").read_bytes()
        # The search does find a secret where there is one: the agent given it, alive.
        third = await spawn(
            host, tmp_path / "c.log", probe_env(SECRET=secret, PROBE_MODE="wait"), tmp_path
        )
        await probed(tmp_path / "c.log")
        assert memory_holds(third.pid, secret.encode())
        for agent in (second, third):
            os.killpg(agent.pid, signal.SIGTERM)
            await asyncio.wait_for(agent.wait(), 10)
    finally:
        await host.stop()


async def test_sibling_agents_draw_their_own_inboxes_and_randomness(tmp_path: Path) -> None:
    """nats-py draws a client's NUID (its inbox prefix) when the client is made, in the
    child: two agents forked from one host must not share inboxes, or replies would cross."""
    host = WarmHost()
    try:
        seen = []
        for name in ("a", "b"):
            agent = await spawn(host, tmp_path / f"{name}.log", probe_env(), tmp_path)
            assert await asyncio.wait_for(agent.wait(), 10) == 0
            seen.append(await probed(tmp_path / f"{name}.log"))
        a, b = seen
        prefix = len("_INBOX.") + 12  # the NUID's random prefix
        assert a["inbox"][:prefix] != b["inbox"][:prefix]
        assert a["random"] != b["random"]
        assert a["uuid"] != b["uuid"]
    finally:
        await host.stop()


async def test_past_the_pidfd_budget_a_thread_waits_for_the_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(warm, "pidfd_budget", lambda: 0)
    host = WarmHost()
    try:
        for mode, code in (("exit:5", 5), ("signal:15", -15)):
            log = tmp_path / f"{code}.log"
            agent = await spawn(host, log, probe_env(PROBE_MODE=mode), tmp_path)
            assert await asyncio.wait_for(agent.wait(), 10) == code
            assert agent.returncode == code
    finally:
        await host.stop()


def spec(workdir: Path) -> StoredSpec:
    parsed = parse_workflow(
        "name: t\nmap:\n  input: x.json\n  agent_template:\n    - shell: 'true'\n"
    )
    return StoredSpec(workflow=parsed.workflow, options=SubmitOptions(workdir=str(workdir)))


def backend(tmp_path: Path, exits: list[Exit], max_restarts: int = 1) -> LocalBackend:
    async def on_exit(
        wf: str,
        phase: str,
        index: int,
        code: int,
        restarted: bool,
        remaining: int,
        reason: str = "",
    ) -> None:
        exits.append((index, code, restarted, remaining))

    return LocalBackend(
        NatsSettings(url="nats://127.0.0.1:1"),
        log_dir=tmp_path / "logs",
        max_processes=1,
        max_restarts=max_restarts,
        on_exit=on_exit,
        entry=PROBE,
    )


def agent_pid(b: LocalBackend) -> int | None:
    (run,) = b._agents[("wf", "map")]
    proc = run.proc
    return proc.pid if proc is not None and proc.returncode is None else None


@pytest.mark.parametrize(
    ("mode", "code"), [("exit:3", 3), ("raise", 1), (f"signal:{int(signal.SIGSEGV)}", -11)]
)
async def test_warm_agents_exit_codes_are_an_exec_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, code: int
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.setenv("PROBE_MODE", mode)
    exits: list[Exit] = []
    b = backend(tmp_path, exits)
    try:
        await b.launch("wf", "map", [1], spec(tmp_path))
        await wait_for(lambda: not b.running("wf", "map"), timeout_s=15)
        assert exits == [(0, code, True, 1), (0, code, False, 0)]
        log = tmp_path / "logs" / "wf" / "map-0.log"
        assert len(lines(log)) == 2  # both runs were the probe, forked warm
        assert all(line["ppid"] == os.getpid() for line in lines(log))
    finally:
        await b.stop_all(grace_s=5)


async def test_a_warm_agent_killed_from_outside_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.setenv("PROBE_MODE", "wait")
    exits: list[Exit] = []
    b = backend(tmp_path, exits)
    try:
        await b.launch("wf", "map", [1], spec(tmp_path))
        first = await wait_for(lambda: agent_pid(b), timeout_s=10)
        os.kill(first, signal.SIGKILL)
        await wait_for(lambda: exits, timeout_s=10)
        assert exits == [(0, -signal.SIGKILL, True, 1)]
        second = await wait_for(lambda: agent_pid(b), timeout_s=10)
        assert second != first and b.running("wf", "map")
    finally:
        await b.stop_all(grace_s=5)


async def test_stop_all_leaves_no_agent_step_or_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.setenv("PROBE_MODE", "step")
    b = backend(tmp_path, [])
    log = tmp_path / "logs" / "wf" / "map-0.log"
    await b.launch("wf", "map", [1], spec(tmp_path))
    try:
        found = await wait_for(lambda: len(lines(log)) == 2 and lines(log), timeout_s=10)
        agent, step = found[0]["pid"], found[1]["step"]
        assert b._warm is not None and b._warm.proc is not None
        host = b._warm.proc.pid
        assert alive(agent) and alive(step) and alive(host)
    finally:
        await b.stop_all(grace_s=5)
    await wait_for(lambda: not (alive(agent) or alive(step) or alive(host)), timeout_s=10)


async def test_a_dead_host_costs_no_agent_and_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agents are the launcher's children: the host's death leaves them running, and
    the next agent is forked by a new host."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.setenv("PROBE_MODE", "wait")
    exits: list[Exit] = []
    b = backend(tmp_path, exits)
    try:
        await b.launch("wf", "map", [1], spec(tmp_path))
        agent = await wait_for(lambda: agent_pid(b), timeout_s=10)
        assert b._warm is not None and b._warm.proc is not None
        old_host = b._warm.proc.pid
        os.kill(old_host, signal.SIGKILL)
        await wait_for(lambda: not b._warm.alive, timeout_s=10)
        assert alive(agent) and not exits
        os.kill(agent, signal.SIGTERM)
        await wait_for(lambda: exits, timeout_s=10)
        assert exits == [(0, -signal.SIGTERM, True, 1)]
        replaced = await wait_for(lambda: agent_pid(b), timeout_s=10)
        assert replaced != agent
        assert b._warm.proc is not None and b._warm.proc.pid != old_host
    finally:
        await b.stop_all(grace_s=5)


async def test_a_killed_launcher_takes_its_host_agents_and_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL the launcher: its agents get the parent-death signal, its host too, and the
    session reaper kills the steps they had started."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.setenv("PROBE_MODE", "step")
    launcher = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import asyncio, sys, warm_launcher; asyncio.run(warm_launcher.run(sys.argv[1]))",
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert launcher.stdout is not None
        line = await asyncio.wait_for(launcher.stdout.readline(), 30)
        host = json.loads(line)["host"]
        log = tmp_path / "logs" / "wf" / "map-0.log"
        # Bounds for a cold interpreter and a host start on a loaded machine.
        found = await wait_for(lambda: len(lines(log)) == 2 and lines(log), timeout_s=30)
        agent, step = found[0]["pid"], found[1]["step"]
        assert found[0]["ppid"] == launcher.pid
        assert alive(agent) and alive(step) and alive(host)
    finally:
        launcher.kill()
        await launcher.wait()
    await wait_for(lambda: not [p for p in (agent, step, host) if alive(p)], timeout_s=20)


async def test_agents_are_execd_when_switched_off_or_given_a_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = NatsSettings(url="nats://127.0.0.1:1")
    assert LocalBackend(settings, command=("sleep", "60"))._warm is None
    assert LocalBackend(settings, warm=False)._warm is None
    monkeypatch.setenv(WARM_ENV, "0")
    b = LocalBackend(settings, max_processes=1)
    assert b._warm is None
    await b.launch("wf", "map", [1], spec(tmp_path))
    try:
        pid = await wait_for(lambda: agent_pid(b), timeout_s=10)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        # exec'd: the interpreter's own command line, and no host was started
        assert b"jetreduce.cli.agent_main" in cmdline and b._warm is None
    finally:
        await b.stop_all(grace_s=5)


async def test_a_host_that_cannot_start_falls_back_to_exec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(warm, "HOST_MODULE", "jetreduce.cli.no_such_module")
    b = LocalBackend(NatsSettings(url="nats://127.0.0.1:1"), max_processes=3)
    assert b._warm is not None
    await b.launch("wf", "map", [1, 1, 1], spec(tmp_path))  # three spawns learn it at once

    def started() -> list[int]:
        procs = [r.proc for r in b._agents[("wf", "map")]]
        return [p.pid for p in procs if p is not None and p.returncode is None]

    try:
        pids = await wait_for(lambda: len(started()) == 3 and started(), timeout_s=30)
        assert b._warm is None  # given up for this backend: agents are exec'd
        for pid in pids:
            assert b"jetreduce.cli.agent_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            assert stat[1] == str(os.getpid())
        assert all(r.task is not None and not r.task.done() for r in b._agents[("wf", "map")])
    finally:
        await b.stop_all(grace_s=5)
