"""A poll's listing is a snapshot: Jobs created or deleted while the poll goes on (a launch, a
stop, the poll's own relaunch) must not be undone by it when it finishes.

The backend alone against the API emulator (Job status written by the test, as the Job
controller would). A slow poll is made deterministic (``GatedJobList``): its Job LIST
answers, then the poll waits for the test to launch or stop before it goes on.

Without this, a map reopened while its old Job was deleted (its new Job reuses the name) was
forgotten by a poll that listed between the deletion and the launch: ``running`` was False and
``held`` 0 until the next poll, so an admission in between counted the map's slots as free
(and the same after every relaunch, whose Job the relaunching poll had not listed).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from harness import GatedJobList, map_only_spec
from kmock_plus import EmulatorThread
from kubernetes import client as k8s

from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.launcher.kubernetes import KubernetesBackend, job_name
from jetreduce.runtime.settings import NatsSettings

pytestmark = pytest.mark.anyio


def _backend(
    api: k8s.ApiClient, namespace: str, **kw: Any
) -> tuple[KubernetesBackend, GatedJobList]:
    nats = NatsSettings(url="nats://127.0.0.1:4222", prefix="tp")
    settings = KubernetesSettings(
        namespace=namespace, image="jetreduce:test", poll_interval_s=3600, **kw
    )
    backend = KubernetesBackend(nats, settings, api_client=api)
    backend.kube = gated = GatedJobList(backend.kube)
    return backend, gated


async def _fail(api: k8s.ApiClient, namespace: str, job: str) -> None:
    """The Job failed for good (as the Job controller says it once an index used up its
    backoff): one pod failed."""
    await asyncio.to_thread(
        k8s.BatchV1Api(api).patch_namespaced_job_status,
        job,
        namespace,
        {
            "status": {
                "failed": 1,
                "conditions": [
                    {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}
                ],
            }
        },
        _preload_content=False,
    )


def _job_names(emu: EmulatorThread, ns: str) -> set[str]:
    return {j["metadata"]["name"] for j in emu.live("batch/v1/jobs", ns)}


async def test_a_job_launched_after_a_poll_listed_stays_known(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str
) -> None:
    """The map's Job is deleted, a poll lists (no Job), the reopened map's new Job (same
    name) is launched, then the poll finishes: the new Job is still counted."""
    backend, kube = _backend(api_client, namespace)
    try:
        assert await backend.launch("wf-r", "map", [1, 1], map_only_spec()) == 2
        await backend.poll_once()
        await backend.stop("wf-r", "map")
        assert not backend.running("wf-r", "map")

        async with kube.slow_poll(backend):
            assert await backend.launch("wf-r", "map", [1, 1], map_only_spec()) == 2
            assert _job_names(emulator, namespace) == {job_name("wf-r", "map")}
        assert backend.running("wf-r", "map") and backend.held("wf-r", "map") == 2

        await backend.poll_once()  # the next poll lists it: nothing changes
        assert backend.running("wf-r", "map") and backend.held("wf-r", "map") == 2
    finally:
        await backend.stop_all()


async def test_a_job_stopped_after_a_poll_listed_stays_gone(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str
) -> None:
    """A poll lists the map's Job, the map is stopped (its Job deleted), then the poll
    finishes: it does not bring back what it listed before the deletion."""
    backend, kube = _backend(api_client, namespace)
    try:
        assert await backend.launch("wf-s", "map", [1, 1], map_only_spec()) == 2
        await backend.poll_once()

        async with kube.slow_poll(backend):
            await backend.stop("wf-s", "map")
            assert _job_names(emulator, namespace) == set()
        assert not backend.running("wf-s", "map") and backend.held("wf-s", "map") == 0
    finally:
        await backend.stop_all()


async def test_a_relaunched_job_is_known_after_the_poll_that_created_it(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str
) -> None:
    """The poll that relaunches a failed Job did not list the new one: it counts it anyway."""
    backend, _ = _backend(api_client, namespace, max_relaunches=1, relaunch_delay_s=0)
    first, second = job_name("wf-f", "map"), job_name("wf-f", "map", 1)
    try:
        assert await backend.launch("wf-f", "map", [1, 1], map_only_spec()) == 2
        await _fail(api_client, namespace, first)
        await backend.poll_once()
        assert _job_names(emulator, namespace) == {first, second}
        assert backend.running("wf-f", "map") and backend.held("wf-f", "map") == 2
    finally:
        await backend.stop_all()


async def test_a_failed_job_stopped_while_its_pods_are_listed_is_not_relaunched(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str
) -> None:
    """A poll finds the map's Job failed and lists its pods (to report them); meanwhile the
    map is stopped (its Job deleted). With no relaunch delay the poll went on to create the
    next Job for a phase that had just been stopped."""
    backend, kube = _backend(api_client, namespace, max_relaunches=1, relaunch_delay_s=0)
    first = job_name("wf-p", "map")
    try:
        assert await backend.launch("wf-p", "map", [1, 1], map_only_spec()) == 2
        await backend.poll_once()
        await _fail(api_client, namespace, first)
        async with kube.slow_poll(backend, at_pods=True):
            await backend.stop("wf-p", "map")
            assert _job_names(emulator, namespace) == set()
        assert _job_names(emulator, namespace) == set()
        assert not backend.running("wf-p", "map") and backend.held("wf-p", "map") == 0
    finally:
        await backend.stop_all()
