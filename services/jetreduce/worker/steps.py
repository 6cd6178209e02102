"""Running one step (shell / claude / write_file) in a subprocess with a bounded output buffer
and a timeout that kills the step's whole process group.

Agents start from a clean environment (as Prodigy does): a few basics from the agent's own
environment plus the workflow's variables, never the caller's whole environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from jetreduce.contract.workflow.model import Step
from jetreduce.lang.interpolate import Variables, render_shell, render_text

__all__ = ["BASE_ENV_KEYS", "StepOutcome", "base_env", "run_step"]

BASE_ENV_KEYS = ("PATH", "HOME", "USER", "SHELL", "TMPDIR", "TERM", "LANG", "LC_ALL", "TZ")
OUTPUT_LIMIT = 256 * 1024
"""Bytes of stdout kept per step (the tail); the rest is dropped with a marker."""
STDERR_LIMIT = 16 * 1024
KILL_GRACE_S = 5.0


def base_env() -> dict[str, str]:
    return {k: os.environ[k] for k in BASE_ENV_KEYS if k in os.environ}


@dataclass
class StepOutcome:
    exit_code: int
    stdout: str
    stderr: str
    duration_s: float
    timed_out: bool = False
    error: str = ""
    kind: str = ""
    """Why it failed when not by its exit code alone (``worker/outcome.py``'s kinds:
    ``CommitValidationFailed``, ``MergeConflict``, ``WorktreeError``); empty otherwise."""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.error


class _Tail:
    """Keeps the last ``limit`` bytes of a stream, remembering whether it dropped any."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = bytearray()
        self.dropped = 0

    def feed(self, chunk: bytes) -> None:
        self.buf += chunk
        if len(self.buf) > self.limit:
            cut = len(self.buf) - self.limit
            self.dropped += cut
            del self.buf[:cut]

    def text(self) -> str:
        body = self.buf.decode("utf-8", errors="replace")
        return f"[... {self.dropped} bytes dropped ...]\n{body}" if self.dropped else body


async def _pump(stream: asyncio.StreamReader | None, tail: _Tail) -> None:
    if stream is None:
        return
    while chunk := await stream.read(65536):
        tail.feed(chunk)


async def _pump_to_file(stream: asyncio.StreamReader | None, path: Path) -> None:
    if stream is None:
        return
    with open(path, "wb") as f:
        while chunk := await stream.read(65536):
            f.write(chunk)


async def run_process(
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: str | None,
    timeout_s: float | None,
    stdout_path: Path | None = None,
) -> StepOutcome:
    """Run to completion (or timeout). Keeps the tail of stdout, or all of it in
    ``stdout_path`` when given (map input: never truncated)."""
    start = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=cwd,
            # Its own process group (a timeout kills everything the step started), but the
            # agent's session, so whoever stops the agent can find and stop its steps too.
            process_group=0,
        )
    except OSError as exc:
        return StepOutcome(127, "", str(exc), time.monotonic() - start, error=str(exc))
    out, err = _Tail(OUTPUT_LIMIT), _Tail(STDERR_LIMIT)
    out_pump = (
        _pump(proc.stdout, out) if stdout_path is None else _pump_to_file(proc.stdout, stdout_path)
    )
    pumps = asyncio.gather(out_pump, _pump(proc.stderr, err), proc.wait())
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.shield(pumps), timeout_s)
    except TimeoutError:
        timed_out = True
        await _kill_group(proc)
        with contextlib.suppress(Exception):  # the step is killed; its output is best effort
            await asyncio.wait_for(pumps, KILL_GRACE_S)
    except asyncio.CancelledError:
        await _kill_group(proc)
        raise
    code = proc.returncode if proc.returncode is not None else -9
    return StepOutcome(code, out.text(), err.text(), time.monotonic() - start, timed_out)


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            await asyncio.wait_for(proc.wait(), KILL_GRACE_S)
            return
        except TimeoutError:
            continue


def claude_argv(prompt: str) -> list[str]:
    """Prodigy runs ``claude --print --dangerously-skip-permissions "<cmd>"``. The program is
    configurable (``JETREDUCE_CLAUDE_COMMAND``) so tests and sites can substitute it."""
    program = os.environ.get("JETREDUCE_CLAUDE_COMMAND", "claude")
    return [program, "--print", "--dangerously-skip-permissions", prompt]


async def run_step(
    step: Step,
    variables: Variables,
    *,
    env: dict[str, str],
    cwd: str,
    timeout_s: float | None,
    spill_dir: Path,
) -> StepOutcome:
    """Run one step. ``timeout_s`` is the tighter of the step's and the agent's budget."""
    limit = min((t for t in (step.timeout_s, timeout_s) if t is not None), default=None)
    step_env = {**env, **{k: render_text(v, variables) for k, v in step.env.items()}}
    workdir = cwd
    if step.working_dir:
        workdir = str(Path(cwd, render_text(step.working_dir, variables)))
    if step.shell is not None:
        cmd = render_shell(step.shell, variables, spill_dir=spill_dir)
        return await run_process(
            ["sh", "-c", cmd.script], env={**step_env, **cmd.env}, cwd=workdir, timeout_s=limit
        )
    if step.claude is not None:
        prompt = render_text(step.claude, variables)
        step_env.setdefault("PRODIGY_AUTOMATION", "true")
        return await run_process(claude_argv(prompt), env=step_env, cwd=workdir, timeout_s=limit)
    assert step.write_file is not None
    return _write_file(step, variables, workdir)


def _write_file(step: Step, variables: Variables, cwd: str) -> StepOutcome:
    spec = step.write_file
    assert spec is not None
    start = time.monotonic()
    path = Path(cwd, render_text(spec.path, variables))
    content = render_text(spec.content, variables)
    try:
        if spec.format == "json":
            content = json.dumps(json.loads(content), indent=2) + "\n"
        elif spec.format == "yaml":
            content = yaml.safe_dump(yaml.safe_load(content), sort_keys=False)
        if spec.create_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        path.chmod(int(spec.mode, 8))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        msg = f"write_file {path}: {exc}"
        return StepOutcome(1, "", msg, time.monotonic() - start, error=msg)
    return StepOutcome(0, "", "", time.monotonic() - start)
