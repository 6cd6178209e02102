"""Uploading a workflow's ``map.input`` file at submit time, for agents that do not share the
submitter's disk (Kubernetes pods).

The object's name comes from the workflow id (``contract.objects.input_upload_object``) and the
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
from jetreduce.contract.events import SubmitOptions, SubmitReply
from jetreduce.contract.objects import input_upload_object
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.workflow import Workflow
from jetreduce.lang.map_input import input_file as map_input_file
from jetreduce.runtime.state import StateStore
from jetreduce.worker.secrets import EnvironmentProblem, positional_args, resolve_environment

__all__ = ["delete_upload", "input_file", "submit_with_upload", "upload_input"]


def input_file(
    workflow: Workflow, workdir: Path, args: list[str], profile: str | None = None
) -> Path | None:
    """The file ``map.input`` names, if it is one here and now (else it is a command, or a
    file setup will write: nothing to upload). Rendered with the variables the setup agent
    uses (`lang.map_input`), short of the secrets, which only the agent reads."""
    try:
        scope = resolve_environment(
            workflow, args=args, profile=profile, base_dir=workdir, with_secrets=False
        ).variables
    except EnvironmentProblem:  # the agent will say what is wrong; upload what is known
        _, scope = positional_args(args)
        scope = {**workflow.env, **scope}
    return map_input_file(workflow.map.input, scope, workdir)


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
