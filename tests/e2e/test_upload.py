"""The submitter's upload of a ``map.input`` file (for agents that do not share its disk):
a resubmit of an existing workflow id keeps the input the workflow was submitted with, and
a rejected submission leaves no upload behind. Real nats-server and services."""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.js.errors import NotFoundError

from helpers import Harness, next_completion, services
from jetreduce.cli.submit import SubmitRejected
from jetreduce.cli.upload import submit_with_upload
from jetreduce.cli.watch import Watcher
from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.objects import input_upload_object
from support import wait_for

pytestmark = pytest.mark.anyio


async def uploaded(h: Harness, wf: str) -> bytes | None:
    store = await h.nc.jetstream().object_store(h.subjects.objects_bucket)
    try:
        return (await store.get(input_upload_object(wf))).data
    except NotFoundError:
        return None


async def test_resubmitting_an_id_keeps_the_first_upload(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    gate = tmp_path / "go"
    text = f"""
name: uploaded
setup:
  - shell: "while [ ! -e {gate} ]; do sleep 0.05; done"
map:
  input: items.json
  agent_template:
    - shell: "echo ${{item}}"
"""
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text("[1, 2]")
    second.write_text("[3, 4, 5]")
    options = SubmitOptions(workdir=str(workdir), input_upload=True)
    async with services(nats_url, prefix, tmp_path) as h:
        for upload in (first, second):  # the second is a resubmit of the same id
            reply = await submit_with_upload(
                h.nc, h.subjects, text, options, workflow_id="up-1", source="t", upload=upload
            )
            assert reply.accepted
        assert await uploaded(h, "up-1") == b"[1, 2]"
        watcher = Watcher(h.nc, h.subjects, "up-1", show_events=False, tty=False)
        await watcher.start()
        try:
            gate.touch()  # setup ends; the planner reads the upload (no items.json here)
            done = await next_completion(watcher)
        finally:
            await watcher.stop()
        assert done.total == 2  # the first upload's items

        async def removed() -> bool:
            return await uploaded(h, "up-1") is None  # by the janitor, at the end

        await wait_for(removed, timeout_s=30)

        with pytest.raises(SubmitRejected):
            await submit_with_upload(
                h.nc,
                h.subjects,
                "name: broken\nmap: {}\n",
                options,
                workflow_id="up-2",
                source="t",
                upload=first,
            )
        assert await uploaded(h, "up-2") is None
