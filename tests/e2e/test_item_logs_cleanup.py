"""A dead item's stored log (``logs/<wf>/<i>``, contract/objects.py) goes with the workflow's
other objects: the janitor deletes it when the workflow ends unless the item is still
dead-lettered (``dlq show`` prints it); ``dlq purge`` deletes the kept ones. Before, no
``logs/`` object was ever deleted. Real nats-server, services in-process, agents as child
processes."""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.js.errors import NotFoundError

from helpers import Harness, dlq, services
from jetreduce.contract import events as ev
from jetreduce.contract.objects import input_object, log_object, object_prefix
from support import wait_for

pytestmark = pytest.mark.anyio

WORKFLOW = """
name: logs-cleanup
map:
  input: "echo '[1, 2, 3]'"
  agent_template:
    - shell: "echo out ${{item}}; test ${{item}} -ne 2"
error_policy:
  on_item_failure: {policy}
  retry_config:
    max_attempts: 1
"""


async def logs_of(h: Harness, wf: str) -> set[str]:
    """Every stored (not deleted) ``logs/<wf>/…`` object."""
    store = await h.nc.jetstream().object_store(h.subjects.objects_bucket)
    try:
        infos = await store.list(ignore_deletes=True)
    except NotFoundError:
        return set()
    return {i.name for i in infos if i.name.startswith(object_prefix(log_object, wf))}


async def ended_with_a_dead_item(h: Harness, workdir: Path, policy: str, wf: str) -> None:
    """Run the workflow (item 1 dies) and wait until the janitor has handled its end: its
    resolved input object is gone (deleted by the same cleanup, before the per-item ones)."""
    done = await h.run(WORKFLOW.format(policy=policy), workdir, workflow_id=wf)
    assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
    assert (done.done, done.dead) == (2, 1)

    async def input_gone() -> bool:
        store = await h.nc.jetstream().object_store(h.subjects.objects_bucket)
        try:
            info = await store.get_info(input_object(wf))
        except NotFoundError:
            return True
        return bool(info.deleted)

    await wait_for(input_gone, timeout_s=20)


async def test_a_skipped_dead_items_log_is_deleted_when_the_workflow_ends(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    async with services(nats_url, prefix, tmp_path) as h:
        await ended_with_a_dead_item(h, workdir, "skip", "logs-skip")

        async def no_logs() -> bool:
            return not await logs_of(h, "logs-skip")

        await wait_for(no_logs, timeout_s=20)


async def test_a_dead_lettered_items_log_stays_until_the_dlq_is_purged(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    async with services(nats_url, prefix, tmp_path) as h:
        await ended_with_a_dead_item(h, workdir, "dlq", "logs-dlq")
        # Kept for `dlq show` while the item is dead-lettered.
        assert await logs_of(h, "logs-dlq") == {log_object("logs-dlq", 1)}
        shown = await dlq(h, "show", "logs-dlq", "1")
        assert shown.returncode == 0, shown.stderr
        assert "--- log (logs/logs-dlq/1)" in shown.stdout and "out 2" in shown.stdout

        purged = await dlq(h, "purge", "logs-dlq")
        assert purged.returncode == 0, purged.stderr
        assert await logs_of(h, "logs-dlq") == set()
