"""The janitor deletes a finished workflow's large items and outputs and its dead items' logs
from the object store by its own objects only (janitor/objects.py): it never lists the whole
store, keeps what other workflows and the dead-letter queue still need, and does not miss an
object put just before the cleanup. Real nats-server, the janitor in-process."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore

from jetreduce.contract.objects import (
    input_object,
    input_upload_object,
    item_object,
    log_object,
    output_object,
)
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.janitor.service import Janitor
from jetreduce.runtime.connection import connect
from jetreduce.runtime.service import ServiceContext
from jetreduce.runtime.settings import NatsSettings

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def janitor(nats_url: str, prefix: str) -> AsyncIterator[tuple[Janitor, ServiceContext]]:
    nc = await connect(NatsSettings(url=nats_url, prefix=prefix), name="janitor-objects")
    subjects = Subjects(prefix)
    await declare(nc.jetstream(), subjects, None)
    ctx = ServiceContext(nc=nc, js=nc.jetstream(), subjects=subjects)
    service = Janitor(ctx)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop), name="janitor")
    try:
        yield service, ctx
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await nc.drain()


async def present(store: Any, names: list[str]) -> set[str]:
    found = set()
    for name in names:
        with contextlib.suppress(NotFoundError):
            info = await store.get_info(name)
            if not info.deleted:
                found.add(name)
    return found


async def test_cleanup_deletes_only_the_workflows_objects_without_listing_the_store(
    nats_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    wf = "wf-a"
    mine = [
        item_object(wf, 0),
        item_object(wf, 7),
        output_object(wf, 3),
        output_object(wf, 12),
        log_object(wf, 7),
    ]
    dead_lettered = {item_object(wf, 1), log_object(wf, 1)}
    others = [
        item_object("wf-a2", 0),  # an id that starts like wf-a's
        output_object("wf-b", 3),
        input_object(f"{wf}x"),
        input_upload_object("wf-b"),
        log_object("wf-b", 7),
    ]
    async with janitor(nats_url, prefix) as (service, ctx):
        store = await ctx.js.object_store(ctx.subjects.objects_bucket)
        await ctx.js.publish(ctx.subjects.dlq(wf, 1), b"{}")
        everything = [*mine, *dead_lettered, *others, input_object(wf), input_upload_object(wf)]
        for name in everything:
            await store.put(name, name.encode())

        # The cleanup must find the workflow's objects without reading every object's meta.
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("the janitor listed the whole object store")

        monkeypatch.setattr(ObjectStore, "list", refuse)
        monkeypatch.setattr(ObjectStore, "watch", refuse)
        # Right after the puts: the index must catch up with them before answering.
        await service.clean(wf)

        assert await present(store, everything) == {*dead_lettered, *others}
        assert await service.objects.names(wf) == dead_lettered
        # A later object of the same workflow (a reopened run's output) is found as well.
        await store.put(output_object(wf, 5), b"x")
        await service.clean(wf)
        assert await present(store, [output_object(wf, 5), *dead_lettered]) == dead_lettered
