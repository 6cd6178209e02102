"""Uploading a workflow's ``map.input`` file at submit time, for agents that do not share the
submitter's disk (Kubernetes pods).

The object's name comes from the workflow id (``contract.events.input_upload_object``) and the
submission only says *that* it was uploaded (``SubmitOptions.input_upload``), so a submission
cannot point agents or the janitor at another workflow's object. The setup agent
uses the upload only when its working directory lacks the file (a setup step that writes the
input still wins); the janitor deletes it with the workflow's other objects.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from jetreduce.cli.submit import SubmitRejected, submit
from jetreduce.contract.events import SubmitOptions, SubmitReply, input_upload_object
from jetreduce.contract.subjects import Subjects
from jetreduce.runtime.state import StateStore

__all__ = ["delete_upload", "input_file", "submit_with_upload", "upload_input"]


def input_file(workflow: Any, workdir: Path, args: list[str]) -> Path | None:
    """The file ``map.input`` names, if it is one here and now (else it is a command, or a
    file setup will write: nothing to upload)."""
    from jetreduce.lang.interpolate import Variables, render_text
    from jetreduce.worker.secrets import positional_args

    _, arg_vars = positional_args(args)
    try:
        name = render_text(workflow.map.input, Variables({**workflow.env, **arg_vars}))
        path = workdir / name
        return path if path.is_file() else None
    except (ValueError, OSError):  # not a path at all (a long command line, a NUL…)
        return None


async def upload_input(
    js: JetStreamContext, subjects: Subjects, wf: str, path: Path, timeout_s: float = 30.0
) -> None:
    """Put ``path`` under the workflow's upload name (chunked: the file is streamed, never
    read whole). Waits, bounded, for the object store: the services declare it when they
    start, and a client started at the same moment may be first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            store = await js.object_store(subjects.objects_bucket)
            break
        except NotFoundError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no object store {subjects.objects_bucket!r} to upload {path} to: are the "
                    "jetreduce services running against this server (they declare it)?"
                ) from None
            await asyncio.sleep(0.2)
    with path.open("rb") as f:
        await store.put(input_upload_object(wf), f)


async def delete_upload(js: JetStreamContext, subjects: Subjects, wf: str) -> None:
    """Remove the upload of a submission that was rejected (no janitor will see it end)."""
    try:
        store = await js.object_store(subjects.objects_bucket)
        await store.delete(input_upload_object(wf))
    except NotFoundError:
        pass


async def submit_with_upload(
    nc: Any,
    subjects: Subjects,
    text: str,
    options: SubmitOptions,
    *,
    workflow_id: str,
    source: str,
    upload: Path | None,
) -> SubmitReply:
    """Submit, uploading ``upload`` first when there is one. A workflow that already exists
    (a resubmit of its id, which the planner answers as before) keeps the input it was
    submitted with: its upload is neither overwritten nor, if the answer is a rejection,
    deleted."""
    js = nc.jetstream()
    uploaded = False
    if upload is not None and await StateStore(js, subjects).get(workflow_id) is None:
        await upload_input(js, subjects, workflow_id, upload)
        uploaded = True
    try:
        return await submit(nc, subjects, text, options, workflow_id=workflow_id, source=source)
    except SubmitRejected:
        if uploaded:
            await delete_upload(js, subjects, workflow_id)
        raise
