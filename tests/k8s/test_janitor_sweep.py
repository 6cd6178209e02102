"""The janitor's orphan sweep against the API emulator and the real nats-server: on start and
then periodically, it deletes (through the backend's own ``stop``) the Jobs, ConfigMaps and
Secrets of workflows that are terminal or unknown in the workflows KV, and leaves running
workflows alone."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from kmock_plus import EmulatorThread
from kubernetes import client as k8s

from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.records import Phase, StoredSpec, WorkflowRecord
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.janitor.k8s_sweep import OrphanSweeper
from jetreduce.janitor.service import Janitor
from jetreduce.lang.parse import parse_workflow
from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.launcher.kubernetes import KubernetesBackend
from jetreduce.runtime.connection import connect
from jetreduce.runtime.service import ServiceContext
from jetreduce.runtime.settings import NatsSettings
from jetreduce.runtime.state import StateStore
from support import wait_for

pytestmark = pytest.mark.anyio

WORKFLOW = """
name: sweep-check
mode: mapreduce
map:
  input: items.json
  max_parallel: 2
  agent_template:
    - shell: "echo ${item}"
"""
KINDS = ("batch/v1/jobs", "v1/configmaps", "v1/secrets")


@contextlib.asynccontextmanager
async def _context(nats_url: str, prefix: str) -> AsyncIterator[ServiceContext]:
    nc = await connect(NatsSettings(url=nats_url, prefix=prefix), name="sweep-test")
    subjects = Subjects(prefix)
    await declare(nc.jetstream(), subjects, None)
    try:
        yield ServiceContext(nc=nc, js=nc.jetstream(), subjects=subjects)
    finally:
        await nc.drain()


@contextlib.asynccontextmanager
async def _janitor(ctx: ServiceContext, backend: KubernetesBackend, every_s: float):  # type: ignore[no-untyped-def]
    stop = asyncio.Event()
    task = asyncio.create_task(Janitor(ctx, objects=backend, sweep_every_s=every_s).run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def _record(state: StateStore, wf: str, phase: Phase) -> None:
    now = time.time()
    assert await state.create(
        WorkflowRecord(
            workflow_id=wf, name="sweep-check", phase=phase, created_ts=now, updated_ts=now
        )
    )


def _objects(emu: EmulatorThread, ns: str) -> dict[str, set[str]]:
    """Workflow id → the kinds of object it owns."""
    out: dict[str, set[str]] = {}
    for kind in KINDS:
        for obj in emu.live(kind, ns):
            out.setdefault(obj["metadata"]["annotations"]["jetreduce.io/workflow-id"], set()).add(
                kind
            )
    return out


async def test_janitor_sweeps_orphans_on_start_and_periodically(
    nats_url: str,
    prefix: str,
    emulator: EmulatorThread,
    api_client: k8s.ApiClient,
    namespace: str,
) -> None:
    nats = NatsSettings(url=nats_url, prefix=prefix, user="u", password="pw")
    backend = KubernetesBackend(
        nats,
        KubernetesSettings(namespace=namespace, image="jetreduce:test", poll_interval_s=3600),
        api_client=api_client,
    )
    spec = StoredSpec(
        workflow=parse_workflow(WORKFLOW, source="t.yml").workflow, options=SubmitOptions()
    )
    async with _context(nats_url, prefix) as ctx:
        state = StateStore(ctx.js, ctx.subjects)
        await _record(state, "wf-running", Phase.MAPPING)
        await _record(state, "wf-done", Phase.COMPLETED)
        await _record(state, "wf-cancelled", Phase.CANCELLED)
        try:
            for wf in ("wf-running", "wf-done", "wf-cancelled", "wf-unknown"):
                await backend.launch(wf, "map", [1, 1], spec)
            everything = set(KINDS)
            assert _objects(emulator, namespace) == {
                wf: everything for wf in ("wf-running", "wf-done", "wf-cancelled", "wf-unknown")
            }

            # On start (the interval is an hour): terminal and unknown go, running stays.
            async with _janitor(ctx, backend, every_s=3600):
                await wait_for(lambda: set(_objects(emulator, namespace)) == {"wf-running"})
            assert _objects(emulator, namespace) == {"wf-running": everything}

            # Periodically: a launch that raced its workflow's end, and a workflow that ends.
            async with _janitor(ctx, backend, every_s=0.2):
                await wait_for(lambda: set(_objects(emulator, namespace)) == {"wf-running"})
                await _record(state, "wf-late", Phase.FAILED)
                await backend.launch("wf-late", "map", [1], spec)
                await wait_for(lambda: set(_objects(emulator, namespace)) == {"wf-running"})
                await state.transition("wf-running", Phase.TIMED_OUT, reason="test")
                await wait_for(lambda: not _objects(emulator, namespace))
        finally:
            await backend.stop_all()


async def test_a_workflow_whose_record_cannot_be_read_is_not_swept(
    nats_url: str,
    prefix: str,
    emulator: EmulatorThread,
    api_client: k8s.ApiClient,
    namespace: str,
) -> None:
    """Unknown is an answer; an error is not. Without the KV bucket (deleted), every read
    fails, and nothing may be deleted on that basis."""
    nats = NatsSettings(url=nats_url, prefix=prefix)
    backend = KubernetesBackend(
        nats,
        KubernetesSettings(namespace=namespace, image="jetreduce:test", poll_interval_s=3600),
        api_client=api_client,
    )
    spec = StoredSpec(
        workflow=parse_workflow(WORKFLOW, source="t.yml").workflow, options=SubmitOptions()
    )
    async with _context(nats_url, prefix) as ctx:
        try:
            await backend.launch("wf-x", "map", [1], spec)
            await ctx.js.delete_key_value(ctx.subjects.workflows_bucket)
            sweeper = OrphanSweeper(StateStore(ctx.js, ctx.subjects), backend)
            assert await sweeper.sweep_once() == []
            assert set(_objects(emulator, namespace)) == {"wf-x"}
        finally:
            await backend.stop_all()
