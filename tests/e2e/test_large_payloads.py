"""Items and outputs too large for a message (issue 8): an item bigger than the server's
``max_payload`` travels through the object store instead of failing the enqueue, an output
bigger than an event's inline limit reaches reduce whole, and the janitor removes both
kinds of object when the workflow ends. Real nats-server, services in-process, agents as
child processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nats.js.errors import NotFoundError

from helpers import Harness, dlq, item_results, next_completion, services
from jetreduce.cli.watch import Watcher
from jetreduce.contract import events as ev
from jetreduce.contract.objects import item_object, output_object
from support import wait_for

pytestmark = pytest.mark.anyio

BIG_ITEM = 9 * 1024 * 1024  # over the test server's 8 MiB max_payload
BIG_OUTPUT = 200_000  # over the 64 KiB an event carries inline

WORKFLOW = f"""
name: large
map:
  input: items.json
  json_path: "$.items[*]"
  max_parallel: 2
  agent_template:
    - shell: "echo n=${{item.n}}"
    - shell: "if [ ${{item.n}} = 2 ]; then head -c {BIG_OUTPUT} /dev/zero | tr '\\\\0' x; fi"
reduce:
  - shell: |
      python3 - "${{map.results_file}}" <<'PY'
      import json, sys
      for line in open(sys.argv[1]):
          r = json.loads(line)
          print(r["item_id"], len(r["output"]), r["output"][:3])
      PY
"""


async def object_names(h: Harness) -> list[str]:
    store = await h.nc.jetstream().object_store(h.subjects.objects_bucket)
    try:
        return [info.name for info in await store.list(ignore_deletes=True)]
    except NotFoundError:
        return []


async def test_large_items_and_outputs_go_through_the_object_store(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    items = [{"n": 0}, {"n": 1, "blob": "b" * BIG_ITEM}, {"n": 2}]
    (workdir / "items.json").write_text(json.dumps({"items": items}))
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(WORKFLOW, workdir, timeout_s=120)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
        wf = done.workflow_id

        async def cleaned() -> bool:
            mine = [n for n in await object_names(h) if f"/{wf}/" in n]
            return not [n for n in mine if n.startswith(("items/", "outputs/"))]

        try:
            await wait_for(cleaned, timeout_s=20)
        except AssertionError:
            raise AssertionError(await object_names(h)) from None
    assert (done.done, done.dead) == (3, 0)
    lines = done.reduce_output.splitlines()
    # item 1 ran with its 9 MiB data; item 2's output arrived whole (its echo line + 200,000)
    assert lines[0] == "item_0 3 n=0"
    assert lines[1] == "item_1 3 n=1"
    assert lines[2] == f"item_2 {4 + BIG_OUTPUT} n=2"


async def test_a_dead_large_item_keeps_its_object_and_is_retried_whole(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    """An item stored as an object that dead-letters keeps its object past the workflow's
    end, while the janitor removes the rest (here item 0's large output); `dlq retry` then
    runs the item again with its whole data."""
    fixed = tmp_path / "fixed"
    workflow = f"""
name: large-dead
map:
  input: items.json
  json_path: "$.items[*]"
  agent_template:
    - shell: "test ${{item.n}} = 0 || test -e {fixed}"
    - shell: "if [ ${{item.n}} = 0 ]; then head -c {BIG_OUTPUT} /dev/zero | tr '\\\\0' x; fi"
    - shell: "printf '%s' '${{item.blob}}' | wc -c | tr -d ' '"
reduce:
  - shell: "echo ok=${{map.successful}} dead=${{map.failed}}"
"""
    blob = 300 * 1024  # over the 256 KiB an item message carries: stored as an object
    items = [{"n": 0, "blob": "a"}, {"n": 1, "blob": "b" * blob}]
    (workdir / "items.json").write_text(json.dumps({"items": items}))
    async with services(nats_url, prefix, tmp_path) as h:
        first = await h.run(workflow, workdir, max_attempts=1, workflow_id="big-dead")
        assert isinstance(first, ev.WorkflowCompleted), h.agent_logs()
        assert (first.done, first.dead) == (1, 1)

        async def output_removed() -> bool:
            return output_object("big-dead", 0) not in await object_names(h)

        await wait_for(output_removed, timeout_s=20)  # the janitor handled the workflow's end
        assert item_object("big-dead", 1) in await object_names(h)

        fixed.touch()
        watcher = Watcher(h.nc, h.subjects, "big-dead", show_events=False, tty=False)
        await watcher.start()
        try:
            retried = await dlq(h, "retry", "big-dead")
            assert retried.returncode == 0, retried.stderr
            second = await next_completion(watcher)
        finally:
            await watcher.stop()
        results = await item_results(h, "big-dead")
    assert (second.done, second.dead) == (2, 0)
    assert second.reduce_output == "ok=2 dead=0"
    assert isinstance(results[1], ev.ItemDone) and results[1].output.endswith(str(blob))
