"""``--max-slots`` across a launcher restart on Kubernetes: Jobs outlive the launcher, so a
new one must learn what runs (one poll of the API server) before it hands out slots. Real
nats-server for the workflow records, the API emulator for Jobs; no pods needed."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from kmock_plus import EmulatorThread
from kubernetes import client as k8s

from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.records import Phase, StoredSpec, WorkflowRecord
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.lang.parse import parse_workflow
from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.launcher.kubernetes import KubernetesBackend, job_name
from jetreduce.launcher.service import Launcher
from jetreduce.runtime.connection import connect
from jetreduce.runtime.service import ServiceContext
from jetreduce.runtime.settings import NatsSettings
from jetreduce.runtime.state import StateStore
from support import wait_for

pytestmark = pytest.mark.anyio

WORKFLOW = """
name: slots-check
map:
  input: items.json
  max_parallel: 2
  agent_template:
    - shell: "true"
"""


def _spec(priority: str) -> StoredSpec:
    return StoredSpec(
        workflow=parse_workflow(WORKFLOW, source="t.yml").workflow,
        options=SubmitOptions(backend="kubernetes", priority=priority),
    )


def _backend(api: k8s.ApiClient, namespace: str, prefix: str) -> KubernetesBackend:
    nats = NatsSettings(url="nats://127.0.0.1:4222", prefix=prefix)
    # A poll interval far beyond the test: only the first poll (or none) can happen.
    settings = KubernetesSettings(namespace=namespace, image="jetreduce:test", poll_interval_s=3600)
    return KubernetesBackend(nats, settings, api_client=api)


async def test_restarted_launcher_counts_jobs_left_running_before_admitting(
    emulator: EmulatorThread,
    api_client: k8s.ApiClient,
    namespace: str,
    nats_url: str,
    prefix: str,
) -> None:
    """Two slots; ``busy`` (normal) holds both through a Job started by the previous
    launcher; ``eager`` (high) waits. The new launcher's first admission must see the Job
    and start nothing (before the fix it saw no Job, and ``eager`` went first)."""
    nc = await connect(NatsSettings(url=nats_url, prefix=prefix), name="admission-restart")
    try:
        subjects = Subjects(prefix)
        await declare(nc.jetstream(), subjects, None)
        ctx = ServiceContext(nc=nc, js=nc.jetstream(), subjects=subjects)
        state = StateStore(ctx.js, subjects)
        now = time.time()
        for wf, priority, created in (("busy", "normal", now - 10), ("eager", "high", now)):
            record = WorkflowRecord(
                workflow_id=wf,
                name="slots-check",
                phase=Phase.MAPPING,
                created_ts=created,
                updated_ts=created,
                total=2,
                max_parallel=2,
            )
            assert await state.create(record)
            await state.put_spec(wf, _spec(priority))

        before = _backend(api_client, namespace, prefix)  # the launcher before the restart
        try:
            assert await before.launch("busy", "map", before.plan(2), _spec("normal")) > 0
        finally:
            await before.stop_all()  # leaves the Job running, as a launcher upgrade does

        after = _backend(api_client, namespace, prefix)
        launcher = Launcher(ctx, after, max_slots=2)
        stop = asyncio.Event()
        running = asyncio.create_task(launcher.run(stop))
        try:
            # Its first act as leader: a full reconciliation, admissions included.
            await wait_for(lambda: launcher.reconciles >= 1 or running.done(), timeout_s=30)
            assert not running.done(), running
            jobs: list[dict[str, Any]] = emulator.live("batch/v1/jobs", namespace)
            assert {j["metadata"]["name"] for j in jobs} == {job_name("busy", "map")}
            assert after.running("busy", "map")
            assert not after.running("eager", "map")
        finally:
            stop.set()
            await asyncio.wait_for(running, 30)
    finally:
        await nc.drain()
