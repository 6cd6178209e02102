"""Job and pod status as events: the kubernetes backend reports a Job that starts running,
each pod that fails or is disrupted (with the pod's own reason: ``OOMKilled``, ``Evicted``,
``EvictionByEvictionAPI``, ``Error`` with its exit code) and a Job that finishes (``complete``,
``failed``, or ``stopped`` when the launcher deletes it first). The backend alone against the
emulator, with pod and Job status written as the kubelet and Job controller would; the
launcher's publishing of them is proven end to end in ``test_e2e.py``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from kmock_plus import EmulatorThread
from kubernetes import client as k8s

from jetreduce.cli.watch import describe
from jetreduce.contract import events as ev
from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.records import StoredSpec
from jetreduce.lang.parse import parse_workflow
from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.launcher.k8s_status import JobSeen
from jetreduce.launcher.kubernetes import KubernetesBackend, job_name
from jetreduce.runtime.settings import NatsSettings

pytestmark = pytest.mark.anyio

WORKFLOW = """
name: status-check
mode: mapreduce
map:
  input: items.json
  agent_template:
    - shell: "echo ${item}"
"""


def _spec() -> StoredSpec:
    return StoredSpec(
        workflow=parse_workflow(WORKFLOW, source="t.yml").workflow,
        options=SubmitOptions(backend="kubernetes"),
    )


def _pod(job: str, index: int, name: str, status: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"batch.kubernetes.io/job-name": job},
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
        },
        "spec": {"containers": [{"name": "agent", "image": "x"}]},
        "status": status,
    }


def _terminated(code: int, reason: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "agent",
            "image": "x",
            "imageID": "",
            "ready": False,
            "restartCount": 0,
            "state": {"terminated": {"exitCode": code, "reason": reason}},
        }
    ]


async def test_running_pod_failures_with_reasons_and_finished(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str
) -> None:
    statuses: list[ev.JobStatus | ev.PodFailed] = []
    exits: list[tuple[Any, ...]] = []

    async def on_status(event: ev.JobStatus | ev.PodFailed) -> None:
        statuses.append(event)

    async def on_exit(*args: Any) -> None:
        exits.append(args)

    nats = NatsSettings(url="nats://127.0.0.1:4222", prefix="tp")
    settings = KubernetesSettings(namespace=namespace, image="jetreduce:test", poll_interval_s=3600)
    backend = KubernetesBackend(
        nats, settings, api_client=api_client, on_exit=on_exit, on_status=on_status
    )
    batch, core = k8s.BatchV1Api(api_client), k8s.CoreV1Api(api_client)

    async def job_status(name: str, status: dict[str, Any]) -> None:
        await asyncio.to_thread(
            batch.patch_namespaced_job_status,
            name,
            namespace,
            {"status": status},
            _preload_content=False,
        )

    async def pod(job: str, index: int, name: str, status: dict[str, Any]) -> None:
        body = _pod(job, index, name, status)
        await asyncio.to_thread(core.create_namespaced_pod, namespace, body, _preload_content=False)

    job = job_name("wf-s", "map")
    try:
        await backend.launch("wf-s", "map", [1, 1, 1], _spec())
        await backend.poll_once()
        assert statuses == []  # created, not running yet: no pod is active

        await job_status(job, {"active": 3})
        await backend.poll_once()
        assert [(s.state, s.active) for s in statuses if isinstance(s, ev.JobStatus)] == [
            ("running", 3)
        ]

        # OOM-killed (counts), evicted under node pressure (counts: no DisruptionTarget), and
        # evicted through the Eviction API after handing its items back (exit 0, ignored).
        await pod(
            job,
            0,
            f"{job}-0-oom01",
            {"phase": "Failed", "containerStatuses": _terminated(137, "OOMKilled")},
        )
        await pod(
            job,
            1,
            f"{job}-1-evi01",
            {
                "phase": "Failed",
                "reason": "Evicted",
                "message": "The node was low on resource: memory.",
            },
        )
        await pod(
            job,
            2,
            f"{job}-2-dis01",
            {
                "phase": "Succeeded",
                "conditions": [
                    {
                        "type": "DisruptionTarget",
                        "status": "True",
                        "reason": "EvictionByEvictionAPI",
                        "message": "Eviction API: evicting",
                    }
                ],
                "containerStatuses": _terminated(0, "Completed"),
            },
        )
        await job_status(job, {"active": 3, "failed": 2})
        statuses.clear()
        await backend.poll_once()
        failed = {s.pod: s for s in statuses if isinstance(s, ev.PodFailed)}
        assert {
            p.index: (p.reason, p.exit_code, p.disruption, p.job, p.phase) for p in failed.values()
        } == {
            0: ("OOMKilled", 137, False, job, "map"),
            1: ("Evicted", None, False, job, "map"),
            2: ("EvictionByEvictionAPI", 0, True, job, "map"),
        }
        assert failed[f"{job}-1-evi01"].message == "The node was low on resource: memory."
        assert all(s.workflow_id == "wf-s" for s in statuses)
        # The failed pods (not the disrupted one that succeeded) are exits as before.
        assert sorted((e[2], e[3], e[4]) for e in exits) == [(0, 137, True), (1, -1, True)]
        assert "OOMKilled, exit code 137" in describe(failed[f"{job}-0-oom01"])
        assert "disruption" in describe(failed[f"{job}-2-dis01"])

        # Reported once, however often the Job's status changes.
        await job_status(job, {"active": 2, "failed": 2, "succeeded": 1})
        statuses.clear()
        await backend.poll_once()
        await backend.poll_once()
        assert statuses == []

        await job_status(
            job,
            {
                "active": 0,
                "failed": 2,
                "succeeded": 3,
                "conditions": [{"type": "Complete", "status": "True", "reason": "Completed"}],
            },
        )
        await backend.poll_once()
        await backend.poll_once()
        assert [(s.state, s.succeeded, s.failed) for s in statuses] == [("complete", 3, 2)]
        assert describe(statuses[0]).startswith(f"map Job {job} complete")

        # Deleting a finished Job adds nothing; a running one is announced as stopped.
        await backend.launch("wf-s", "reduce", [1], _spec())
        await job_status(job_name("wf-s", "reduce"), {"active": 1})
        await backend.poll_once()
        statuses.clear()
        await backend.stop("wf-s")
        assert [(s.job, s.state, s.active) for s in statuses] == [
            (job_name("wf-s", "reduce"), "stopped", 1)
        ]
        assert emulator.live("batch/v1/jobs", namespace) == []
    finally:
        await backend.stop_all()


async def test_a_job_that_fails_is_announced_with_its_reason(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str
) -> None:
    statuses: list[ev.JobStatus | ev.PodFailed] = []

    async def on_status(event: ev.JobStatus | ev.PodFailed) -> None:
        statuses.append(event)

    nats = NatsSettings(url="nats://127.0.0.1:4222", prefix="tp")
    settings = KubernetesSettings(
        namespace=namespace, image="jetreduce:test", poll_interval_s=3600, max_relaunches=0
    )
    backend = KubernetesBackend(nats, settings, api_client=api_client, on_status=on_status)
    batch = k8s.BatchV1Api(api_client)
    job = job_name("wf-f", "setup")
    try:
        await backend.launch("wf-f", "setup", [1], _spec())
        status = {
            "failed": 0,
            "conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}],
        }
        await asyncio.to_thread(
            batch.patch_namespaced_job_status,
            job,
            namespace,
            {"status": status},
            _preload_content=False,
        )
        await backend.poll_once()
        await backend.stop("wf-f")  # finished already: not announced again as stopped
        assert [(s.job, s.state, s.reason) for s in statuses] == [
            (job, "failed", "DeadlineExceeded")
        ]
    finally:
        await backend.stop_all()


async def test_a_slow_poll_reports_only_the_newest_pod_of_a_given_up_index_as_final() -> None:
    """Three pods of index 0 failed between two polls and the Job gave the index up: the two
    that were replaced are reported as restarted, the newest as final (fresh clone 10: all
    three read the index's present status and were reported as final)."""
    exits: list[tuple[int, bool]] = []

    async def on_exit(wf: str, phase: str, index: int, code: int, restart: bool, *_: Any) -> None:
        exits.append((index, restart))

    backend = KubernetesBackend(
        NatsSettings(url="nats://127.0.0.1:1"),
        KubernetesSettings(),
        api_client=k8s.ApiClient(),  # no call is made: the pods are given
        on_exit=on_exit,
    )

    def pod(name: str, index: int, created: str) -> dict[str, Any]:
        return {
            "metadata": {
                "name": name,
                "creationTimestamp": created,
                "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
            },
            "status": {
                "phase": "Failed",
                "containerStatuses": [
                    {"name": "agent", "state": {"terminated": {"exitCode": 3}}}
                ],
            },
        }

    pods = {
        "items": [
            pod("j-0-c", 0, "2026-12-07T10:00:02Z"),
            pod("j-0-a", 0, "2026-12-07T10:00:01Z"),
            pod("j-0-b", 0, "2026-12-07T10:00:01Z"),
            pod("j-1-a", 1, "2026-12-07T10:00:01Z"),
        ]
    }
    seen = JobSeen("wf", "map")
    status = {"failedIndexes": "0", "succeeded": 0}
    await backend._report_pods(seen, False, False, status, 3, pods, "")
    assert sorted(exits) == [(0, False), (0, True), (0, True), (1, True)]
