"""``run`` and ``submit`` build their submission with one builder
(``cli/workflow_options.submit_options``): an option either command takes reaches the
workflow's stored options the same way. Real processes: a planner and ``jetreduce submit``."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.subjects import Subjects
from jetreduce.runtime.connection import connect
from jetreduce.runtime.settings import NatsSettings
from jetreduce.runtime.state import StateStore
from support import env_without_jetreduce

JETREDUCE = [sys.executable, "-m", "jetreduce"]
WORKFLOW = """
name: timed
mode: mapreduce
map:
  input: items.json
  agent_template:
    - shell: "echo ${item}"
"""


async def _stored_options(nats_url: str, prefix: str, wf: str) -> SubmitOptions:
    nc = await connect(NatsSettings(url=nats_url), forever=False)
    try:
        spec = await StateStore(nc.jetstream(), Subjects(prefix)).get_spec(wf)
        assert spec is not None, f"no stored spec for {wf}"
        return spec.options
    finally:
        await nc.close()


def test_submit_timeout_reaches_the_stored_options(
    tmp_path: Path, nats_url: str, prefix: str
) -> None:
    (tmp_path / "wf.yml").write_text(WORKFLOW)
    (tmp_path / "items.json").write_text("[1, 2]")
    env = env_without_jetreduce() | {"JETREDUCE_PREFIX": prefix}
    planner = subprocess.Popen(
        [*JETREDUCE, "service", "planner", "--nats", nats_url],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        sub = subprocess.run(
            [
                *JETREDUCE,
                *("submit", "wf.yml", "--nats", nats_url, "--id", "timed-1"),
                *("--timeout", "42.5", "--max-attempts", "2"),
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert sub.returncode == 0, sub.stderr
        assert sub.stdout.strip() == "timed-1"
        options = asyncio.run(_stored_options(nats_url, prefix, "timed-1"))
        assert options.timeout_s == 42.5
        assert options.max_attempts == 2
        assert options.workdir == str(tmp_path.resolve())
    finally:
        planner.send_signal(signal.SIGTERM)
        try:
            planner.wait(timeout=30)
        except subprocess.TimeoutExpired:
            planner.kill()
            pytest.fail("the planner did not stop on SIGTERM")
