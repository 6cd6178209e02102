"""The launcher's side of elastic slots and of a reduce that does not wait for map agents
(issues 17 and 18), on Kubernetes: the API emulator for Jobs (their status written by the
test, as the Job controller would), a real nats-server for records and events; no pods.

* ``held()`` counts the slots of the indexes that have not ended: a map agent that drained
  (exit 0 before ``map.complete``) completes its index, which frees its pod's slots at the
  next poll, and the launcher is told at once (``on_released``) to admit waiting workflows.
* A drained index is not "the phase is over": when another index then fails for good, the
  Job is relaunched as before (only index 0, the agent kept for retries, succeeding decides).
* The reduce Job is created while the map Job's deletion has not returned.
* A map Job created while a poll is under way keeps its slots counted when that poll ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from harness import GatedJobList
from kmock_plus import EmulatorThread
from kubernetes import client as k8s

from helpers import read_stream
from jetreduce.contract import events as ev
from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.records import Phase, StoredSpec, WorkflowRecord
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.lang.parse import parse_workflow
from jetreduce.launcher import service as launcher_service
from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.launcher.kubernetes import KubernetesBackend, job_name
from jetreduce.launcher.service import Launcher
from jetreduce.runtime.connection import connect
from jetreduce.runtime.leadership import Leadership
from jetreduce.runtime.service import ServiceContext
from jetreduce.runtime.settings import NatsSettings
from jetreduce.runtime.state import StateStore
from support import wait_for

pytestmark = pytest.mark.anyio

WORKFLOW = """
name: elastic
map:
  input: items.json
  max_parallel: {parallel}
  agent_template:
    - shell: "true"
{reduce}"""
REDUCE = """reduce:
  - shell: "echo reduced"
"""


def _spec(parallel: int, reduce: bool = False) -> StoredSpec:
    text = WORKFLOW.format(parallel=parallel, reduce=REDUCE if reduce else "")
    return StoredSpec(
        workflow=parse_workflow(text, source="t.yml").workflow,
        options=SubmitOptions(backend="kubernetes"),
    )


class GatedMapStop(KubernetesBackend):
    """Deleting a map Job waits for :attr:`gate` (a slow API server, made deterministic)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.map_stops = 0
        self.map_stopped = 0

    async def stop(self, wf: str, phase: str | None = None, grace_s: float = 10.0) -> None:
        if phase == "map":
            self.map_stops += 1
            await self.gate.wait()
        await super().stop(wf, phase, grace_s)
        if phase == "map":
            self.map_stopped += 1


def _backend(
    api: k8s.ApiClient, namespace: str, prefix: str, *, slots_per_pod: int = 1, **kw: Any
) -> GatedMapStop:
    nats = NatsSettings(url="nats://127.0.0.1:4222", prefix=prefix)
    settings = KubernetesSettings(
        namespace=namespace,
        image="jetreduce:test",
        slots_per_pod=slots_per_pod,
        poll_interval_s=kw.pop("poll_interval_s", 3600),
        **kw,
    )
    return GatedMapStop(nats, settings, api_client=api)


async def _job_status(api: k8s.ApiClient, ns: str, job: str, status: dict[str, Any]) -> None:
    """Play the Job controller: write ``status`` on ``job``."""
    batch = k8s.BatchV1Api(api)
    await asyncio.to_thread(
        batch.patch_namespaced_job_status, job, ns, {"status": status}, _preload_content=False
    )


def _jobs(emu: EmulatorThread, ns: str) -> set[str]:
    return {j["metadata"]["name"] for j in emu.live("batch/v1/jobs", ns)}


# -- the backend alone ----------------------------------------------------------------------
async def test_held_counts_the_indexes_not_ended_and_reports_a_release(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str
) -> None:
    backend = _backend(api_client, namespace, "tp", slots_per_pod=2)
    released: list[tuple[str, str]] = []

    async def on_released(wf: str, phase: str) -> None:
        released.append((wf, phase))

    backend.on_released = on_released
    job = job_name("wf-e", "map")
    try:
        assert await backend.launch("wf-e", "map", backend.plan(6), _spec(6)) == 3
        assert backend.held("wf-e", "map") == 6  # 3 pods of 2 slots, known from the launch
        await backend.poll_once()
        assert backend.held("wf-e", "map") == 6 and released == []

        # Index 2 drained (its queue ran dry: exit 0), index 1 is being retried.
        await _job_status(api_client, namespace, job, {"active": 2, "completedIndexes": "2"})
        await backend.poll_once()
        assert backend.held("wf-e", "map") == 4
        assert released == [("wf-e", "map")]
        await backend.poll_once()  # unchanged: no second report
        assert released == [("wf-e", "map")]
        assert backend.running("wf-e", "map")  # agent 0 still runs until map.complete

        await _job_status(
            api_client,
            namespace,
            job,
            {
                "succeeded": 3,
                "completedIndexes": "0-2",
                "conditions": [{"type": "Complete", "status": "True"}],
            },
        )
        await backend.poll_once()
        assert backend.held("wf-e", "map") == 0 and not backend.running("wf-e", "map")
    finally:
        await backend.stop_all()


async def test_a_drained_index_does_not_decide_a_failed_job(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str
) -> None:
    """Index 1 drained (succeeded), then index 0, the agent kept for retries, failed for
    good: items may remain, so the Job is relaunched. Before, any succeeded index counted as
    "the phase is over" and the workflow was left with no agent at all."""
    backend = _backend(api_client, namespace, "tp", max_relaunches=1, relaunch_delay_s=0)
    failed = {
        "succeeded": 1,
        "failed": 1,
        "completedIndexes": "1",
        "failedIndexes": "0",
        "conditions": [{"type": "Failed", "status": "True", "reason": "FailedIndexes"}],
    }
    try:
        await backend.launch("wf-d", "map", [1, 1], _spec(2))
        await _job_status(api_client, namespace, job_name("wf-d", "map"), failed)
        await backend.poll_once()
        assert _jobs(emulator, namespace) == {job_name("wf-d", "map"), job_name("wf-d", "map", 1)}

        # Index 0 succeeded: agent 0 exits 0 only once the phase is over. Decided.
        await backend.launch("wf-o", "map", [1, 1], _spec(2))
        over = dict(failed, completedIndexes="0", failedIndexes="1")
        await _job_status(api_client, namespace, job_name("wf-o", "map"), over)
        await backend.poll_once()
        assert job_name("wf-o", "map", 1) not in _jobs(emulator, namespace)
    finally:
        await backend.stop_all()


async def test_a_phase_stop_returns_once_its_pods_no_longer_run(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str
) -> None:
    """A deleted Job's pod runs on for its grace period (handing its items back): the map
    stop, whose slots the launcher counts while it is under way, returns only once the pod
    has ended, not when the Job is gone."""
    backend = _backend(api_client, namespace, "tp")
    backend.gate.set()  # the backend's own stop, not held back
    core = k8s.CoreV1Api(api_client)
    job = job_name("wf-g", "map")
    stopping: asyncio.Task[None] | None = None
    try:
        await backend.launch("wf-g", "map", [1, 1], _spec(2))
        (body,) = emulator.live("batch/v1/jobs", namespace)
        labels = body["spec"]["template"]["metadata"]["labels"]
        # No ownerReference: the emulator's garbage collector would delete it with the
        # Job at once, where a real pod stays, terminating, until its agent has exited.
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{job}-0-abcde", "labels": labels},
            "spec": {"containers": [{"name": "agent", "image": "x"}]},
            "status": {"phase": "Running"},
        }
        await asyncio.to_thread(core.create_namespaced_pod, namespace, pod, _preload_content=False)
        stopping = asyncio.create_task(backend.stop("wf-g", "map"))
        await wait_for(lambda: job not in _jobs(emulator, namespace), 10)
        # The backend learns of the deletion from the API's answer, just after the emulator
        # has made it: wait for that, not only for the emulator.
        await wait_for(lambda: not backend.running("wf-g", "map"), 10)
        assert not stopping.done()

        await asyncio.to_thread(
            core.patch_namespaced_pod_status,
            pod["metadata"]["name"],
            namespace,
            {"status": {"phase": "Succeeded"}},
            _preload_content=False,
        )
        await asyncio.wait_for(stopping, 10)
    finally:
        if stopping is not None and not stopping.done():
            stopping.cancel()
            await asyncio.gather(stopping, return_exceptions=True)
        await backend.stop_all()


# -- the launcher ---------------------------------------------------------------------------
@asynccontextmanager
async def _launcher(
    nats_url: str, prefix: str, backend: KubernetesBackend, max_slots: int | None
) -> AsyncIterator[tuple[Launcher, ServiceContext]]:
    nc = await connect(NatsSettings(url=nats_url, prefix=prefix), name="elastic-k8s")
    subjects = Subjects(prefix)
    await declare(nc.jetstream(), subjects, None)
    ctx = ServiceContext(nc=nc, js=nc.jetstream(), subjects=subjects)
    # A long lease: a term lost to a stalled loop on a busy machine would cancel the stops
    # these tests hold back (and end them with stop_all, as it should).
    leadership = Leadership(
        ctx.js,
        subjects.claims_bucket,
        subjects.claim_key("leader", "launcher"),
        name="launcher",
        ttl_s=120.0,
        poll_s=0.05,
    )
    launcher = Launcher(ctx, backend, max_slots=max_slots, leadership=leadership)
    stop = asyncio.Event()
    task = asyncio.create_task(launcher.run(stop))
    try:
        await wait_for(lambda: launcher.leadership.leading, 10)
        yield launcher, ctx
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await nc.drain()


async def _mapping(ctx: ServiceContext, wf: str, spec: StoredSpec, at: float) -> None:
    state = StateStore(ctx.js, ctx.subjects)
    parallel = spec.workflow.map.max_parallel if spec.workflow.map else 1
    record = WorkflowRecord(
        workflow_id=wf,
        name="elastic",
        phase=Phase.MAPPING,
        created_ts=at,
        updated_ts=at,
        total=2,
        max_parallel=parallel,
    )
    assert await state.create(record)
    await state.put_spec(wf, spec)


async def _map_done(ctx: ServiceContext, wf: str) -> None:
    """The results of both items, then ``map.complete`` (what the aggregator publishes)."""
    for i in range(2):
        done = ev.ItemDone(
            workflow_id=wf,
            index=i,
            item_id=f"item_{i}",
            output="",
            exit_code=0,
            duration_s=0.0,
            attempts=1,
        )
        await ctx.js.publish(ctx.subjects.item_done(wf, i), ev.encode(done))
    await ctx.js.publish(
        ctx.subjects.map("complete", wf),
        ev.encode(ev.MapComplete(workflow_id=wf, total=2, done=2, dead=0)),
    )


async def test_a_drained_pod_hands_its_slot_to_a_waiting_workflow(
    emulator: EmulatorThread,
    api_client: k8s.ApiClient,
    namespace: str,
    nats_url: str,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two slots: ``busy`` holds both (two pods), ``small`` (one slot) waits. Busy's pod 1
    drains: at the next poll its slot is free, and small's Job is created, long before
    busy's map completes (the reconciler, which would also admit, runs once an hour here)."""
    monkeypatch.setattr(launcher_service, "RECONCILE_EVERY_S", 3600.0)
    backend = _backend(api_client, namespace, prefix, poll_interval_s=0.1)
    now = time.time()
    async with _launcher(nats_url, prefix, backend, max_slots=2) as (launcher, ctx):
        await _mapping(ctx, "busy", _spec(2), now - 10)
        await _mapping(ctx, "small", _spec(1), now)
        await launcher.reconcile()
        assert _jobs(emulator, namespace) == {job_name("busy", "map")}
        assert backend.held("busy", "map") == 2

        await _job_status(
            api_client, namespace, job_name("busy", "map"), {"active": 1, "completedIndexes": "1"}
        )
        await wait_for(lambda: job_name("small", "map") in _jobs(emulator, namespace), 10)
        assert backend.held("busy", "map") == 1 and backend.running("busy", "map")


async def test_a_map_launched_while_a_poll_lists_keeps_its_slots(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str, nats_url: str, prefix: str
) -> None:
    """Two slots. ``late``'s map Job (two slots) is created while a poll that listed the
    Jobs before it is under way; once that poll is over, ``early`` (older, so first in line)
    comes and waits: the two slots are still ``late``'s, not free for ``early`` beside it."""
    backend = _backend(api_client, namespace, prefix)
    backend.kube = kube = GatedJobList(backend.kube)
    async with _launcher(nats_url, prefix, backend, max_slots=2) as (launcher, ctx):
        await launcher.reconcile()  # the first poll: no Job yet
        async with kube.slow_poll(backend):
            await _mapping(ctx, "late", _spec(2), time.time())
            await launcher.admit_maps("late")
            assert _jobs(emulator, namespace) == {job_name("late", "map")}
        await _mapping(ctx, "early", _spec(2), time.time() - 10)
        await launcher.admit_maps("early")
        assert _jobs(emulator, namespace) == {job_name("late", "map")}
        assert backend.held("late", "map") == 2


async def test_the_reduce_job_is_created_before_the_map_job_is_deleted(
    emulator: EmulatorThread,
    api_client: k8s.ApiClient,
    namespace: str,
    nats_url: str,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(launcher_service, "RECONCILE_EVERY_S", 3600.0)
    backend = _backend(api_client, namespace, prefix)
    async with _launcher(nats_url, prefix, backend, max_slots=None) as (launcher, ctx):
        await _mapping(ctx, "wf-r", _spec(2, reduce=True), time.time())
        await launcher.reconcile()
        map_job, reduce_job = job_name("wf-r", "map"), job_name("wf-r", "reduce")
        assert _jobs(emulator, namespace) == {map_job}

        await _map_done(ctx, "wf-r")
        await wait_for(lambda: reduce_job in _jobs(emulator, namespace), 10)
        assert map_job in _jobs(emulator, namespace)  # its deletion waits at the gate
        assert (backend.map_stops, backend.map_stopped) == (1, 0)

        # A second delivery of map.complete, and the reconciler: no second stop or reduce.
        await ctx.js.publish(
            ctx.subjects.map("complete", "wf-r"),
            ev.encode(ev.MapComplete(workflow_id="wf-r", total=2, done=2, dead=0)),
        )
        await launcher.reconcile()
        await wait_for(lambda: _consumed(ctx), 10)
        launched = await read_stream(
            ctx.js, ctx.subjects.events_stream, ctx.subjects.agent("launched", "wf-r")
        )
        assert [e.phase for e in launched if isinstance(e, ev.AgentLaunched)] == ["map", "reduce"]
        assert (backend.map_stops, backend.map_stopped) == (1, 0)

        backend.gate.set()
        await wait_for(lambda: _jobs(emulator, namespace) == {reduce_job}, 10)
        assert backend.map_stopped == 1


async def test_a_map_reopened_while_its_job_is_deleted_gets_a_new_job_after(
    emulator: EmulatorThread,
    api_client: k8s.ApiClient,
    namespace: str,
    nats_url: str,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A DLQ retry reopens the map while the old map Job's deletion is still under way: the
    launcher does not launch beside it (``launch`` would find the old Job and start
    nothing, and the deletion would then leave the map without agents); once the deletion
    has returned, the new map Job is created."""
    monkeypatch.setattr(launcher_service, "RECONCILE_EVERY_S", 3600.0)
    backend = _backend(api_client, namespace, prefix)
    async with _launcher(nats_url, prefix, backend, max_slots=None) as (launcher, ctx):
        await _mapping(ctx, "wf-o", _spec(2, reduce=True), time.time())
        await launcher.reconcile()
        map_job, reduce_job = job_name("wf-o", "map"), job_name("wf-o", "reduce")
        await _map_done(ctx, "wf-o")
        await wait_for(lambda: reduce_job in _jobs(emulator, namespace), 10)

        # What the planner does on a DLQ retry of a reducing workflow.
        await ctx.js.purge_stream(
            ctx.subjects.events_stream, subject=ctx.subjects.map("complete", "wf-o")
        )
        await StateStore(ctx.js, ctx.subjects).reopen("wf-o")
        await ctx.js.publish(
            ctx.subjects.workflow("reopened", "wf-o"),
            ev.encode(ev.WorkflowReopened(workflow_id="wf-o", retried=1)),
        )
        await launcher.admit_maps("wf-o")  # as the event's handler does: nothing yet
        assert backend.map_stopped == 0 and launcher.leadership.terms == 1
        assert backend.running("wf-o", "map")
        old = _uids(emulator, namespace, map_job)
        assert len(old) == 1

        backend.gate.set()
        await wait_for(lambda: backend.map_stopped == 1, 10)
        await wait_for(lambda: len(_uids(emulator, namespace, map_job) - old) == 1, 10)
        # The emulator lists the new Job a moment before its create returns to the launch,
        # which then records it. (A poll that listed the Jobs between the deletion and the
        # launch no longer forgets it: see test_poll_race.py.)
        await wait_for(lambda: backend.running("wf-o", "map"), 10)


async def _consumed(ctx: ServiceContext) -> bool:
    """The launcher's consumer has handled every event stored so far."""
    info = await ctx.js.consumer_info(ctx.subjects.events_stream, "launcher")
    return info.num_pending == 0 and info.num_ack_pending == 0


def _uids(emu: EmulatorThread, ns: str, name: str) -> set[str]:
    return {
        j["metadata"]["uid"] for j in emu.live("batch/v1/jobs", ns) if j["metadata"]["name"] == name
    }
