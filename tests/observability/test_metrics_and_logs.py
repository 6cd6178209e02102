"""Prometheus ``/metrics`` scraped over real HTTP during and after a run; JSON log lines with
workflow and item ids from real agents; ``jetreduce logs WF ITEM`` through the CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from pathlib import Path

import pytest

from helpers import services
from jetreduce.contract import events as ev
from jetreduce.runtime import telemetry
from support import env_without_jetreduce, wait_for

pytestmark = pytest.mark.anyio

WORKFLOW = """
name: measured
mode: mapreduce
map:
  input: "echo '[1, 2, 3, 4]'"
  max_parallel: 2
  agent_template:
    - shell: sleep 0.3; echo "out ${item}"
    - shell: echo "complaint ${item}" >&2; test ${item} -ne 3
reduce:
  - shell: echo "reduced ${map.successful}"
"""


async def scrape(port: int, path: str = "/metrics") -> tuple[str, str]:
    """One HTTP GET; (status line, body)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return head.splitlines()[0], body


def sample(text: str, name: str, labels: str = "") -> float | None:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


async def test_metrics_endpoint_during_and_after_a_run(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    async with services(nats_url, prefix, tmp_path, metrics_port=0) as h:
        port = h.host.metrics_port
        assert port
        status, _ = await scrape(port, "/nope")
        assert "404" in status
        run = asyncio.create_task(h.run(WORKFLOW, workdir, max_attempts=2))

        async def agents_busy() -> bool:
            _, text = await scrape(port)
            return (sample(text, "jetreduce_agents_active", '{phase="map"}') or 0) >= 1

        await wait_for(agents_busy, timeout_s=60)
        done = await asyncio.wait_for(run, 120)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()

        async def counted() -> str | None:
            _, text = await scrape(port)
            ok = sample(text, "jetreduce_items_done_total") == 3
            ok = ok and sample(text, "jetreduce_items_dead_total") == 1
            return text if ok else None

        text = await wait_for(counted, timeout_s=10)
    status_ok = "jetreduce_items_failed_total 2"
    assert status_ok in text  # item 3 failed twice (each attempt counts)
    assert sample(text, "jetreduce_items_enqueued_total") == 4
    assert "# TYPE jetreduce_item_duration_seconds histogram" in text
    assert sample(text, "jetreduce_item_duration_seconds_count", '{outcome="done"}') == 3
    assert sample(text, "jetreduce_item_duration_seconds_bucket", '{le="+Inf",outcome="dead"}') == 1
    assert sample(text, "jetreduce_queue_pending", '{lane="p1"}') == 0
    assert sample(text, "jetreduce_circuit_agents", '{state="open"}') == 0
    assert sample(text, "jetreduce_services", '{service="aggregator"}') == 1
    assert sample(text, "jetreduce_launcher_leader") == 1  # the only launcher leads


def test_json_formatter_carries_bound_ids() -> None:
    record = logging.LogRecord("jetreduce.x", logging.INFO, __file__, 1, "hello %s", ("w",), None)
    with telemetry.bound(workflow_id="wf-1", item_id="item_4"):
        line = json.loads(telemetry.JsonFormatter().format(record))
    assert line["message"] == "hello w" and line["level"] == "INFO"
    assert line["logger"] == "jetreduce.x" and line["ts"].endswith("Z")
    assert (line["workflow_id"], line["item_id"]) == ("wf-1", "item_4")
    bare = json.loads(telemetry.JsonFormatter().format(record))
    assert "workflow_id" not in bare and "item_id" not in bare


async def test_json_agent_logs_and_the_logs_command(
    nats_url: str,
    prefix: str,
    tmp_path: Path,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("JETREDUCE_LOG_FORMAT", "json")
    monkeypatch.setenv("JETREDUCE_LOG_LEVEL", "INFO")
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(WORKFLOW, workdir, max_attempts=2)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        wf = done.workflow_id
    lines = [
        json.loads(line)
        for path in sorted(h.log_dir.rglob("*.log"))
        for line in path.read_text().splitlines()
        if line.strip()
    ]  # every line of every agent log is one JSON object
    assert lines and all({"ts", "level", "logger", "message"} <= set(x) for x in lines)
    failures = [x for x in lines if "failed" in x["message"] or "dead" in x["message"]]
    assert {(x.get("workflow_id"), x.get("item_id")) for x in failures} == {(wf, "item_2")}
    assert {x["level"] for x in failures} == {"INFO", "WARNING"}

    env = env_without_jetreduce() | {"JETREDUCE_PREFIX": prefix}

    async def cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jetreduce", "--nats", nats_url, *args,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, out.decode(), err.decode()

    code, out, err = await cli("logs", wf, "item_2")
    assert code == 0, err
    assert "=== attempt 1: failed (exit code 1" in out and "=== attempt 2: failed" in out
    assert "complaint 3" in out  # the stderr tail of each attempt
    assert "=== dead after 2 attempt(s): CommandFailed" in out
    assert f"--- stored log (logs/{wf}/2)" in out and "stdout:\nout 3" in out
    code, out, err = await cli("logs", wf, "0")
    assert code == 0 and "=== done: attempt 1, exit code 0" in out and "out 1" in out
    code, out, err = await cli("logs", wf, "item_99")
    assert code == 1 and "nothing recorded for item_99" in err


async def test_lease_age_comes_from_the_agents_heartbeats(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    """An item held for seconds shows as the lane's oldest lease (agents report at each
    heartbeat, every third of the lease); once the workflow ends the lane is back to 0."""
    text = """
name: slow
map:
  input: "echo '[1, 2]'"
  max_parallel: 1
  agent_template:
    - shell: sleep 3
"""
    async with services(nats_url, prefix, tmp_path, metrics_port=0) as h:
        port = h.host.metrics_port
        assert port
        run = asyncio.create_task(h.run(text, workdir, lease_s=1.5))

        async def held_long() -> float | None:
            _, body = await scrape(port)
            age = sample(body, "jetreduce_queue_lease_age_max_seconds", '{lane="p1"}')
            return age if age is not None and age >= 1.0 else None

        age = await wait_for(held_long, timeout_s=60)
        done = await asyncio.wait_for(run, 120)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()

        async def released() -> bool:
            _, body = await scrape(port)
            return sample(body, "jetreduce_queue_lease_age_max_seconds", '{lane="p1"}') == 0

        await wait_for(released, timeout_s=15)
    assert 1.0 <= age < 10.0
