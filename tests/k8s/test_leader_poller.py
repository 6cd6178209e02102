"""Two launcher replicas on Kubernetes (issue 14 point 9): only the leader creates Jobs, polls
and publishes ``agent.job`` / ``agent.pod_failed`` / ``agent.exited``; the standby makes no
API call at all. When the leader stops, the standby takes over (the lease is released), finds
the Job by label, and reports nothing twice: the stored reports are its memory.

Each replica talks to the emulator with its own bearer token, so the request log says which
replica made each call."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from kmock_plus import EmulatorThread, request_verb
from kubernetes import client as k8s

from helpers import read_stream
from jetreduce.contract import events as ev
from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.records import Phase, StoredSpec, WorkflowRecord
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.lang import parse_workflow
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

WF = "wf-lead"
WORKFLOW = """
name: leadership
map:
  input: items.json
  max_parallel: 2
  agent_template:
    - shell: "true"
"""


@dataclass
class Replica:
    name: str
    launcher: Launcher
    backend: KubernetesBackend
    api: k8s.ApiClient
    stop: asyncio.Event
    task: asyncio.Task[None]


def _calls(emulator: EmulatorThread, token: str) -> list[tuple[str, str]]:
    """(verb, resource) of every API request made with ``token``."""

    def collect(cluster: Any) -> list[tuple[str, str]]:
        return [
            request_verb(r)
            for r in list(cluster)
            if r.resource is not None
            and {k.lower(): v for k, v in r.headers.items()}.get("authorization")
            == f"Bearer {token}"
        ]

    result: list[tuple[str, str]] = emulator.call(collect)
    return result


@contextlib.asynccontextmanager
async def replicas(
    emulator: EmulatorThread, namespace: str, nats_url: str, prefix: str
) -> AsyncIterator[tuple[ServiceContext, list[Replica]]]:
    nats = NatsSettings(url=nats_url, prefix=prefix)
    nc = await connect(nats, name="k8s-leadership")
    subjects = Subjects(prefix)
    await declare(nc.jetstream(), subjects, None)
    ctx = ServiceContext(nc=nc, js=nc.jetstream(), subjects=subjects)
    made: list[Replica] = []
    try:
        for name in ("replica-a", "replica-b"):
            config = k8s.Configuration(host=emulator.url)
            config.api_key = {"authorization": f"Bearer {name}"}
            api = k8s.ApiClient(config)
            settings = KubernetesSettings(
                namespace=namespace, image="jetreduce:test", poll_interval_s=0.1
            )
            backend = KubernetesBackend(nats, settings, api_client=api)
            leadership = Leadership(
                ctx.js,
                subjects.claims_bucket,
                subjects.claim_key("leader", "launcher"),
                name="launcher",
                ttl_s=3.0,
                poll_s=0.05,
                holder=f"{name}/1",
                host=name,  # as pods on two nodes: neither can see the other's process
            )
            launcher = Launcher(ctx, backend, leadership=leadership)
            stop = asyncio.Event()
            task = asyncio.create_task(launcher.run(stop), name=name)
            made.append(Replica(name, launcher, backend, api, stop, task))
        yield ctx, made
    finally:
        for r in made:
            r.stop.set()
        for r in made:
            await asyncio.wait_for(r.task, 30)
            r.api.close()
        await nc.drain()


async def _mapping(ctx: ServiceContext) -> None:
    state = StateStore(ctx.js, ctx.subjects)
    spec = StoredSpec(
        workflow=parse_workflow(WORKFLOW, source="t.yml").workflow,
        options=SubmitOptions(backend="kubernetes"),
    )
    await state.put_spec(WF, spec)
    now = time.time()
    record = WorkflowRecord(
        workflow_id=WF,
        name="leadership",
        phase=Phase.MAPPING,
        created_ts=now,
        updated_ts=now,
        total=4,
        max_parallel=2,
    )
    assert await state.create(record)
    await ctx.js.publish(
        ctx.subjects.workflow("planned", WF),
        ev.encode(ev.WorkflowPlanned(workflow_id=WF, total=4, max_parallel=2)),
    )


def _failed_pod(job: str, index: int, code: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job}-{index}-fail1",
            "labels": {"batch.kubernetes.io/job-name": job},
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
        },
        "spec": {"containers": [{"name": "agent", "image": "x"}]},
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": "agent",
                    "image": "x",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"terminated": {"exitCode": code, "reason": "Error"}},
                }
            ],
        },
    }


async def test_only_the_leader_creates_polls_and_reports_and_a_successor_repeats_nothing(
    emulator: EmulatorThread,
    api_client: k8s.ApiClient,
    namespace: str,
    nats_url: str,
    prefix: str,
) -> None:
    async with replicas(emulator, namespace, nats_url, prefix) as (ctx, both):
        await wait_for(lambda: any(r.launcher.leadership.leading for r in both), 10)
        leader = next(r for r in both if r.launcher.leadership.leading)
        standby = next(r for r in both if r is not leader)
        s = ctx.subjects

        async def stored(kind: str) -> list[Any]:
            return await read_stream(ctx.js, s.events_stream, s.agent(kind, WF))

        await _mapping(ctx)
        job = job_name(WF, "map")
        await wait_for(lambda: emulator.live("batch/v1/jobs", namespace), 10)

        # The Job runs; one pod fails (its index is retried): the controller's writes.
        batch, core = k8s.BatchV1Api(api_client), k8s.CoreV1Api(api_client)
        await asyncio.to_thread(
            core.create_namespaced_pod, namespace, _failed_pod(job, 1, 3), _preload_content=False
        )
        await asyncio.to_thread(
            batch.patch_namespaced_job_status,
            job,
            namespace,
            {"status": {"active": 2, "ready": 2, "failed": 1}},
            _preload_content=False,
        )

        async def reported() -> bool:
            return bool(await stored("job")) and bool(await stored("pod_failed"))

        await wait_for(reported, 10)
        await wait_for(lambda: stored("exited"), 10)
        polls = sum(c == ("list", "jobs") for c in _calls(emulator, leader.name))
        await wait_for(
            lambda: sum(c == ("list", "jobs") for c in _calls(emulator, leader.name)) >= polls + 3,
            10,
        )
        assert _calls(emulator, standby.name) == [], "the standby called the API"
        assert not standby.backend.running(WF, "map")

        # The leader stops (a rolling update): the standby takes over at once, and its
        # first polls find the same Job and failed pod.
        leader.stop.set()
        await asyncio.wait_for(leader.task, 30)
        await wait_for(lambda: standby.launcher.leadership.leading, 5)
        await wait_for(lambda: standby.launcher.reconciles >= 1, 10)
        await wait_for(
            lambda: sum(c == ("list", "jobs") for c in _calls(emulator, standby.name)) >= 3, 10
        )
        assert standby.backend.running(WF, "map")
        # A change of the Job after the take-over is reported, once.
        await asyncio.to_thread(
            batch.patch_namespaced_job_status,
            job,
            namespace,
            {
                "status": {
                    "active": 0,
                    "ready": 0,
                    "failed": 1,
                    "succeeded": 2,
                    "conditions": [{"type": "Complete", "status": "True"}],
                }
            },
            _preload_content=False,
        )

        async def complete_reported() -> bool:
            return any(e.state == "complete" for e in await stored("job"))

        await wait_for(complete_reported, 10)

    calls = _calls(emulator, "replica-a") + _calls(emulator, "replica-b")
    assert calls.count(("create", "jobs")) == 1
    nc = await connect(NatsSettings(url=nats_url, prefix=prefix), name="check")
    try:
        js = nc.jetstream()
        s = Subjects(prefix)
        launched = await read_stream(js, s.events_stream, s.agent("launched", WF))
        statuses = await read_stream(js, s.events_stream, s.agent("job", WF))
        pods = await read_stream(js, s.events_stream, s.agent("pod_failed", WF))
        exits = await read_stream(js, s.events_stream, s.agent("exited", WF))
    finally:
        await nc.close()
    assert len(launched) == 1, launched
    assert [(e.job, e.state) for e in statuses] == [(job, "running"), (job, "complete")]
    assert [(e.pod, e.exit_code) for e in pods] == [(f"{job}-1-fail1", 3)]
    assert [(e.index, e.exit_code, e.restarted) for e in exits] == [(1, 3, True)]
