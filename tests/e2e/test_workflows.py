"""End to end: real nats-server, the four services in-process, agents as child processes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import THOUSAND, services, stored_events
from jetreduce.contract import events as ev

pytestmark = pytest.mark.anyio


async def test_prodigy_command_input_example_runs_unchanged(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path, prodigy_examples: Path
) -> None:
    text = (prodigy_examples / "test-mapreduce.yml").read_text()
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(text, workdir)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        assert (done.total, done.done, done.dead) == (3, 3, 0)
        assert done.reduce_output.strip() == "Processed 3 items"


async def test_setup_writes_the_input_file(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path, prodigy_examples: Path
) -> None:
    text = (prodigy_examples / "test-mapreduce-context.yml").read_text()
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(text, workdir)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        assert done.total == 2
        assert "Processed 2 out of 2 items" in done.reduce_output
        assert json.loads((workdir / "test-items.json").read_text()) == ["item1", "item2"]


async def test_thousand_items_results_in_input_order(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    items = [{"n": i, "word": f"w{i}"} for i in range(1000)]
    (workdir / "items.json").write_text(json.dumps({"items": items}))
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(THOUSAND, workdir, timeout_s=240)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        assert (done.total, done.done, done.dead) == (1000, 1000, 0)
        assert done.reduce_output.split("\n") == ["1000", "1000/1000"]
        results = await _terminal_results(h, done.workflow_id)
    assert sorted(results) == list(range(1000))
    assert all(results[i].output == f"{i * 2} w{i}" for i in range(1000))


async def test_results_are_given_to_reduce_in_input_order(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    out = workdir / "reduce-saw.jsonl"
    text = f"""
name: ordered
mode: mapreduce
map:
  input: "seq 0 199"
  max_parallel: 6
  agent_template:
    - shell: "sleep 0.0$(( ${{item}} % 7 )); echo out-${{item}}"
reduce:
  - shell: "cp ${{map.results_file}} {out}"
  - write_file:
      path: results.json
      content: "${{map.results}}"
"""
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(text, workdir)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["item_id"] for r in lines] == [f"item_{i}" for i in range(200)]
    assert [r["output"] for r in lines] == [f"out-{i}" for i in range(200)]
    assert all(r["status"] == "Success" and r["attempts"] == 1 for r in lines)
    inline = json.loads((workdir / "results.json").read_text())
    assert [r["output"] for r in inline] == [f"out-{i}" for i in range(200)]


async def test_empty_input_skips_map_and_reduce(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    text = """
name: empty
mode: mapreduce
map:
  input: "true"
  agent_template:
    - shell: "touch map-ran"
reduce:
  - shell: "touch reduce-ran"
"""
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(text, workdir)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        assert (done.total, done.done, done.dead) == (0, 0, 0)
        started = await stored_events(h.nc, h.subjects, h.subjects.reduce("*", done.workflow_id))
    assert started == []
    assert not (workdir / "map-ran").exists()
    assert not (workdir / "reduce-ran").exists()


async def test_hostile_item_data_is_never_executed(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In every step kind: shell (quoted through the environment), claude (one argv entry,
    never a shell line) and write_file (written as text)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "claude").write_text(
        "#!/usr/bin/env python3\nimport sys\nprint('prompt: ' + sys.argv[-1])\n"
    )
    (bin_dir / "claude").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    hostile = [
        "$(touch PWNED1)",
        "`touch PWNED2`",
        "; touch PWNED3",
        "' ; touch PWNED4 ; '",
        '" ; touch PWNED5 ; "',
        "a\ntouch PWNED6",
        "$(rm -rf ~)",
    ]
    (workdir / "items.json").write_text(json.dumps([{"v": v} for v in hostile]))
    text = """
name: hostile
mode: mapreduce
map:
  input: items.json
  agent_template:
    - shell: "printf '%s' ${item.v}"
    - shell: "echo 'single: ${item.v}'"
    - shell: 'echo "double: ${item.v}"'
    - claude: "/check ${item.v}"
    - write_file:
        path: "out-${item_index}.txt"
        content: "${item.v}"
    - shell: "cat out-${item_index}.txt"
reduce:
  - shell: "echo ${map.successful}"
"""
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(text, workdir)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        assert done.done == len(hostile)
        results = await _terminal_results(h, done.workflow_id)
    assert not list(workdir.glob("PWNED*"))
    for index, value in enumerate(hostile):
        assert results[index].output == (
            f"{value}\nsingle: {value}\ndouble: {value}\nprompt: /check {value}\n{value}"
        )


async def _terminal_results(h: object, wf: str) -> dict[int, ev.ItemDone]:
    from helpers import Harness

    assert isinstance(h, Harness)
    js = h.nc.jetstream()
    sub = await js.subscribe(
        h.subjects.terminal_of(wf), stream=h.subjects.results_stream, ordered_consumer=True
    )
    out: dict[int, ev.ItemDone] = {}
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except TimeoutError:
                break
            event = ev.decode(msg.data)
            assert isinstance(event, ev.ItemDone)
            assert event.index not in out, "an item was recorded twice"
            out[event.index] = event
    finally:
        await sub.unsubscribe()
    return out
