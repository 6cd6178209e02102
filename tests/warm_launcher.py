"""A launcher in a process of its own, for the test that SIGKILLs it
(tests/integration/test_warm_agents.py): it starts one warm probe agent, prints the host's
pid, and waits to be killed."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.records import StoredSpec
from jetreduce.lang.parse import parse_workflow
from jetreduce.launcher.local import LocalBackend
from jetreduce.runtime.settings import NatsSettings


async def run(directory: str) -> None:
    workdir = Path(directory)
    parsed = parse_workflow(
        "name: t\nmap:\n  input: x.json\n  agent_template:\n    - shell: 'true'\n"
    )
    spec = StoredSpec(workflow=parsed.workflow, options=SubmitOptions(workdir=str(workdir)))
    backend = LocalBackend(
        NatsSettings(url="nats://127.0.0.1:1"),
        log_dir=workdir / "logs",
        max_processes=1,
        entry="warm_probe:main",
    )
    await backend.launch("wf", "map", [1], spec)
    # The agent is spawned by a task of the backend's: poll (bounded by the test's wait).
    while backend._warm is None or backend._warm.proc is None:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    print(json.dumps({"host": backend._warm.proc.pid}), flush=True)
    await asyncio.Event().wait()
