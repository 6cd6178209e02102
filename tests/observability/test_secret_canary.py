"""The secret canary: a workflow whose steps use a secret (in env, on stdout, on stderr, in a
failing item and in reduce), with everything turned on — every message on ``>`` (payload
and headers), every span (attributes, events, status) from the services and the agents,
every log line at DEBUG in JSON (services here, agents in their logs), the stored log of the
dead item. The secret's value must appear in none of it."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from helpers import services
from jetreduce.contract import events as ev
from jetreduce.contract.objects import log_object
from jetreduce.runtime import telemetry

pytestmark = pytest.mark.anyio

CANARY = "canary-Zq81-secret-77b"

WORKFLOW = """
name: canary
mode: mapreduce
secrets:
  API_TOKEN: "${env:JR_CANARY_TOKEN}"
setup:
  - shell: echo "setup has $API_TOKEN"
map:
  input: "echo '[1, 2]'"
  agent_template:
    - shell: echo "token=${API_TOKEN}"; echo "err $API_TOKEN" >&2
    - shell: 'test ${item} -eq 1 || { echo "failing with $API_TOKEN" >&2; exit 3; }'
reduce:
  - shell: 'echo "reduce $API_TOKEN ${map.results}"'
"""


async def test_the_secret_appears_in_no_message_span_or_log(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JR_CANARY_TOKEN", CANARY)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")  # agents: spans into their logs
    monkeypatch.setenv("JETREDUCE_LOG_FORMAT", "json")
    monkeypatch.setenv("JETREDUCE_LOG_LEVEL", "DEBUG")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    previous = telemetry.use_tracer_provider(provider)
    service_log = io.StringIO()
    handler = logging.StreamHandler(service_log)
    handler.setFormatter(telemetry.JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    seen: list[bytes] = []

    async def record(msg: Any) -> None:
        seen.append(msg.subject.encode() + repr(msg.headers).encode() + msg.data)

    try:
        async with services(nats_url, prefix, tmp_path) as h:
            sub = await h.nc.subscribe(">", cb=record)
            try:
                done = await h.run(WORKFLOW, workdir, max_attempts=2)
                await h.nc.flush()
            finally:
                await sub.unsubscribe()
            assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
            objects = await h.nc.jetstream().object_store(h.subjects.objects_bucket)
            stored_log = (await objects.get(log_object(done.workflow_id, 1))).data or b""
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        telemetry.use_tracer_provider(previous)
        provider.shutdown()
    spans = [s.to_json(indent=None) for s in exporter.get_finished_spans()]
    agent_logs = h.agent_logs()
    # The run really exercised every channel: the canary had its chances.
    assert (done.done, done.dead) == (1, 1)
    assert "token=***" in done.reduce_output
    assert any(b"item.failed" in m for m in seen) and any(b"traceparent" in m for m in seen)
    assert any("workflow accept" in s for s in spans)
    assert '"name": "item item_1"' in agent_logs or '"name":"item item_1"' in agent_logs
    assert '"item_id": "item_1"' in agent_logs  # the JSON line of the failed attempts
    assert b"failing with ***" in stored_log
    assert service_log.getvalue()
    # ... and it went nowhere.
    leaks = [m[:200] for m in seen if CANARY.encode() in m]
    assert not leaks
    assert not [s for s in spans if CANARY in s]
    assert CANARY not in agent_logs
    assert CANARY not in service_log.getvalue()
    assert CANARY.encode() not in stored_log
    for line in service_log.getvalue().splitlines():
        json.loads(line)  # services' lines are JSON too
