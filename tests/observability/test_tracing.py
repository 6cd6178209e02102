"""One trace per workflow, across the CLI's submit, the services (in this process, into an
in-memory exporter) and the agents (child processes, console exporter into their logs):
every span shares the trace id, and the parents follow the messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from helpers import Harness, services
from jetreduce.contract import events as ev
from jetreduce.runtime import telemetry
from support import wait_for

pytestmark = pytest.mark.anyio

WORKFLOW = """
name: traced
mode: mapreduce
setup:
  - shell: echo preparing
map:
  input: "echo '[1, 2, 3]'"
  max_parallel: 2
  agent_template:
    - shell: echo "item ${item}"
    - shell: test ${item} -ne 3
reduce:
  - shell: echo "reduced ${map.successful}"
"""


def agent_spans(h: Harness) -> list[dict[str, Any]]:
    """Spans the agents wrote to their logs (one JSON object per line)."""
    spans = []
    for path in sorted(h.log_dir.rglob("*.log")):
        for line in path.read_text().splitlines():
            if line.startswith("{") and '"context"' in line:
                spans.append(json.loads(line))
    return spans


def normalise(span: Any) -> dict[str, Any]:
    """An SDK span (this process) in the console exporter's JSON shape (the agents')."""
    out: dict[str, Any] = json.loads(span.to_json(indent=None))
    return out


@pytest.fixture
def in_memory() -> Any:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    previous = telemetry.use_tracer_provider(provider)
    yield exporter
    telemetry.use_tracer_provider(previous)
    provider.shutdown()


async def test_one_trace_per_workflow_with_the_parent_chain(
    nats_url: str,
    prefix: str,
    tmp_path: Path,
    workdir: Path,
    in_memory: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Agents inherit the environment: they trace to their log (stderr) as console JSON.
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(WORKFLOW, workdir, max_attempts=2)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        submit_headers = await h.nc.jetstream().get_last_msg(
            h.subjects.submit_stream, h.subjects.submit
        )
        # The aggregator's span for reduce.completed ends just after it publishes
        # workflow.completed, which may reach us first (CI saw it missing).
        await wait_for(
            lambda: any(s.name == "reduce.completed" for s in in_memory.get_finished_spans()),
            timeout_s=10,
        )

        def whole() -> list[dict[str, Any]] | None:
            """Every span, once each one's parent is among them: an agent writes its spans
            as it exits, which may be just after the workflow's end."""
            found = [normalise(s) for s in in_memory.get_finished_spans()] + agent_spans(h)
            ids = {s["context"]["span_id"] for s in found}
            return found if all(s["parent_id"] in ids for s in found if s["parent_id"]) else None

        spans = await wait_for(whole, timeout_s=10)
    assert "traceparent" in (submit_headers.headers or {})
    assert {s["context"]["trace_id"] for s in spans} == {spans[0]["context"]["trace_id"]}
    by_id = {s["context"]["span_id"]: s for s in spans}

    def named(name: str) -> list[dict[str, Any]]:
        return [s for s in spans if s["name"] == name]

    def parent(span: dict[str, Any]) -> str:
        return str(by_id[span["parent_id"]]["name"]) if span["parent_id"] else ""

    (submit,) = named("workflow submit")
    assert submit["parent_id"] is None and submit["kind"] == "SpanKind.PRODUCER"
    assert submit["attributes"]["messaging.system"] == "nats"
    assert submit["attributes"]["messaging.destination.name"] == h.subjects.submit
    assert [parent(s) for s in named("workflow accept")] == ["workflow submit"]
    assert [parent(s) for s in named("setup")] == ["workflow accept"]
    assert [parent(s) for s in named("plan")] == ["setup"]
    assert [parent(s) for s in named("enqueue")] == ["plan"]
    items = [s for s in spans if s["name"].startswith("item ")]
    # item_0 and item_1 once each; item_2 fails twice (two attempts, each its own span).
    outcomes = {
        (a["jetreduce.item.id"], a["jetreduce.item.attempt"]): a["jetreduce.item.outcome"]
        for a in (s["attributes"] for s in items)
    }
    assert sorted(outcomes) == [("item_0", 1), ("item_1", 1), ("item_2", 1), ("item_2", 2)]
    assert {parent(s) for s in items} == {"plan"}
    assert outcomes[("item_2", 1)] == "retry" and outcomes[("item_2", 2)] == "dead"
    assert all(s["attributes"]["messaging.system"] == "nats" for s in items)
    steps_of_items = [s for s in named("step shell") if parent(s).startswith("item ")]
    assert len(steps_of_items) == 8  # two steps per attempt
    assert [parent(s) for s in named("map complete")] == ["plan"]
    assert [parent(s) for s in named("reduce")] == ["map complete"]
    assert [parent(s) for s in named("reduce.completed")] == ["reduce"]
    assert {parent(s) for s in named("step shell")} == {"setup", "reduce"} | {
        s["name"] for s in items
    }


async def test_nothing_traced_without_otel_variables(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    assert not telemetry.tracing_enabled()
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(WORKFLOW, workdir, max_attempts=1)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        stored = await h.nc.jetstream().get_last_msg(h.subjects.submit_stream, h.subjects.submit)
        accepted = await h.nc.jetstream().get_last_msg(
            h.subjects.events_stream, h.subjects.workflow("accepted", done.workflow_id)
        )
    assert "traceparent" not in (stored.headers or {})
    assert "traceparent" not in (accepted.headers or {})
    assert not agent_spans(h)
