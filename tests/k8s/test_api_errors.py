"""Kubernetes API errors, injected by the emulator over real HTTP, classified as a real API
server's would need: a permanent one (403, 404 namespace, 422) fails the workflow at once
with the API's message and is not retried; a transient one (429 with Retry-After, 500, a
dropped connection) is retried with backoff; and each namespace is polled, swept and stopped
on its own, so one without a Role does not blind the launcher in the others."""

from __future__ import annotations

import time
from typing import Any

import pytest
from harness import map_only_spec
from kmock_plus import EmulatorThread, Fault
from kubernetes import client as k8s

from jetreduce.launcher.k8s_api import TransientApiError
from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.launcher.kubernetes import KubernetesBackend, job_name
from jetreduce.runtime.settings import NatsSettings

pytestmark = pytest.mark.anyio


Exit = tuple[str, str, int, int, bool, int, str]


def _backend(
    api: k8s.ApiClient, namespace: str, exits: list[Exit], extra: tuple[str, ...] = ()
) -> KubernetesBackend:
    async def on_exit(*args: Any) -> None:
        exits.append(args)  # type: ignore[arg-type]

    settings = KubernetesSettings(
        namespace=namespace, workflow_namespaces=extra, image="jetreduce:test", poll_interval_s=3600
    )
    backend = KubernetesBackend(
        NatsSettings(url="nats://127.0.0.1:1", prefix="ae"),
        settings,
        api_client=api,
        on_exit=on_exit,
    )
    backend.kube.backoff_s = 0.01  # the jitter's scale; the schedule is what is under test
    return backend


def _inject(emulator: EmulatorThread, fault: Fault) -> Fault:
    assert emulator.cluster is not None
    emulator.cluster.faults.append(fault)
    return fault


@pytest.mark.parametrize(
    ("fault", "said"),
    [
        (
            Fault(
                "/jobs",
                403,
                method="POST",
                reason="Forbidden",
                message='jobs.batch is forbidden: User "system:serviceaccount:jetreduce:'
                'jetreduce-launcher" cannot create resource "jobs"',
                times=None,
            ),
            "403 Forbidden: jobs.batch is forbidden",
        ),
        (
            Fault(
                "/jobs",
                404,
                method="GET",
                reason="NotFound",
                message='namespaces "x" not found',
                times=None,
            ),
            'namespaces "x" not found',
        ),
        (
            Fault(
                "/jobs",
                422,
                method="POST",
                reason="Invalid",
                message='Job.batch "jr-wf-e-map" is invalid: spec.template.spec.priorityClassName',
                times=None,
            ),
            "is invalid: spec.template.spec.priorityClassName",
        ),
    ],
    ids=["403", "404-namespace", "422"],
)
async def test_a_permanent_error_fails_the_workflow_at_once_with_the_apis_message(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str, fault: Fault, said: str
) -> None:
    exits: list[Exit] = []
    backend = _backend(api_client, namespace, exits)
    _inject(emulator, fault)
    try:
        assert await backend.launch("wf-e", "map", [1, 1], map_only_spec()) == 0
    finally:
        await backend.stop_all()
    assert fault.hits == 1  # not retried
    (final,) = exits
    assert final[:6] == ("wf-e", "map", -1, -1, False, 0)
    assert final[6].startswith("could not be created: kubernetes ") and said in final[6], final


@pytest.mark.parametrize(
    "fault",
    [
        Fault("/jobs", 429, method="POST", reason="TooManyRequests", retry_after_s=1),
        Fault("/jobs", 500, method="POST", times=2),
        Fault("/jobs", method="POST", drop=True),
    ],
    ids=["429-retry-after", "500-twice", "dropped"],
)
async def test_a_transient_error_is_retried(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str, fault: Fault
) -> None:
    exits: list[Exit] = []
    backend = _backend(api_client, namespace, exits)
    _inject(emulator, fault)
    started = time.monotonic()
    try:
        assert await backend.launch("wf-t", "map", [1, 1], map_only_spec()) == 2
    finally:
        await backend.stop_all()
    assert fault.hits == (fault.times or 1) and exits == []
    jobs = {j["metadata"]["name"] for j in emulator.live("batch/v1/jobs", namespace)}
    assert jobs == {job_name("wf-t", "map")}
    if fault.retry_after_s:  # Retry-After honoured, not the (tiny) backoff
        assert time.monotonic() - started >= fault.retry_after_s * 0.9


async def test_a_transient_error_that_lasts_is_raised_for_the_callers_retry(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str
) -> None:
    exits: list[Exit] = []
    backend = _backend(api_client, namespace, exits)
    fault = _inject(emulator, Fault("/jobs", 503, method="POST", times=None))
    try:
        with pytest.raises(TransientApiError, match="503"):
            await backend.launch("wf-u", "map", [1], map_only_spec())
    finally:
        await backend.stop_all()
    assert fault.hits == 1 + backend.kube.retries and exits == []


async def test_each_namespace_is_polled_swept_and_stopped_on_its_own(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str
) -> None:
    """A second namespace whose every call is forbidden (no Role there): the first one's
    Jobs are still seen, swept and deleted; the poller counts as synced."""
    denied = f"{namespace}-b"
    exits: list[Exit] = []
    backend = _backend(api_client, namespace, exits, extra=(denied,))
    try:
        assert await backend.launch("wf-n", "map", [1], map_only_spec()) == 1
        fault = _inject(
            emulator,
            Fault(
                f"/namespaces/{denied}/", 403, reason="Forbidden", message="forbidden", times=None
            ),
        )
        await backend.poll_once()
        await backend.sync()
        assert backend.running("wf-n", "map")
        assert await backend.workflows() == {"wf-n"}
        await backend.stop("wf-n")
        assert emulator.live("batch/v1/jobs", namespace) == []
        assert emulator.live("v1/configmaps", namespace) == []
        assert fault.hits >= 3  # each of them did ask the forbidden namespace
    finally:
        await backend.stop_all()
    assert exits == []


async def test_a_namespace_that_does_not_exist_fails_the_workflow_with_the_apis_message(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str
) -> None:
    """Not injected: the emulator refuses a create in a missing namespace as the server does
    (and answers a list there with nothing)."""
    assert emulator.cluster is not None
    emulator.cluster.namespaces = set()
    exits: list[Exit] = []
    backend = _backend(api_client, namespace, exits)
    try:
        assert await backend.launch("wf-m", "map", [1], map_only_spec()) == 0
        emulator.cluster.namespaces.add(namespace)  # kubectl create namespace
        assert await backend.launch("wf-m2", "map", [1], map_only_spec()) == 1
    finally:
        await backend.stop_all()
    (final,) = exits
    assert final[:6] == ("wf-m", "map", -1, -1, False, 0)
    assert f'404 Not Found: namespaces "{namespace}" not found' in final[6], final
