"""The process kubelet plays the Job controller as the real one (v1.36) behaves where our
Jobs depend on it: ``backoffLimit`` is checked before the per-index rules (and defaults to
MaxInt32 with per-index backoff), and the Job's own ``podFailurePolicy`` rules decide each
failed pod. Then the Jobs the launcher builds, run through it: a large Job with a failure in
most indexes completes, and a non-retriable exit fails its index at once and is neither
relaunched nor mistaken for a lost phase."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from harness import map_only_spec
from kmock_plus import EmulatorProcess, EmulatorThread
from kubelet import ProcessKubelet
from kubernetes import client as k8s

from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.launcher.kubernetes import KubernetesBackend, build_map_job, job_name
from jetreduce.runtime.settings import NatsSettings
from support import wait_for

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def _kubelet(api: k8s.ApiClient, ns: str, tmp_path: Path) -> AsyncIterator[ProcessKubelet]:
    kubelet = ProcessKubelet(api, ns, tmp_path, poll_s=0.05, nice=0)
    stop = asyncio.Event()
    task = asyncio.create_task(kubelet.run(stop))
    try:
        yield kubelet
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert kubelet.errors == []


def _condition(
    emu: EmulatorThread | EmulatorProcess, ns: str, name: str
) -> tuple[str, str, dict[str, Any]] | None:
    for job in emu.live("batch/v1/jobs", ns):
        if job["metadata"]["name"] == name:
            status = job.get("status") or {}
            for c in status.get("conditions") or []:
                if c["type"] in ("Complete", "Failed") and c["status"] == "True":
                    return c["type"], c.get("reason", ""), status
    return None


async def _run_job(
    emu: EmulatorThread | EmulatorProcess,
    api: k8s.ApiClient,
    ns: str,
    tmp_path: Path,
    job: dict[str, Any],
    exits: Callable[[int, int], int | None],
) -> tuple[str, str, dict[str, Any]]:
    """Create ``job``, let the kubelet run it with scripted exits; (condition, reason, status)."""
    job = copy.deepcopy(job)
    job["metadata"]["namespace"] = ns
    job["metadata"].pop("ownerReferences", None)
    name = job["metadata"]["name"]
    async with _kubelet(api, ns, tmp_path) as kubelet:
        kubelet.exits[name] = exits
        await asyncio.to_thread(
            k8s.BatchV1Api(api).create_namespaced_job, ns, job, _preload_content=False
        )
        done = await wait_for(lambda: _condition(emu, ns, name), timeout_s=60)
    assert isinstance(done, tuple)
    return done


def _agents_job(completions: int) -> dict[str, Any]:
    settings = KubernetesSettings(namespace="x", image="jetreduce:test")
    return build_map_job("wf-big", agents=completions, slots=1, settings=settings, nats_env={})


def _once(failing: range) -> Callable[[int, int], int]:
    """Indexes in ``failing`` exit 1 on their first attempt; everything else exits 0."""
    return lambda index, attempt: 1 if index in failing and attempt == 0 else 0


@pytest.mark.parametrize(
    ("backoff_limit", "expected"),
    [
        (None, ("Complete", "")),  # as built: the server's MaxInt32 can never bind first
        # What the real controller did to the Job as built before: backoffLimit binds first.
        (100, ("Failed", "BackoffLimitExceeded")),
    ],
    ids=["as-built", "backoff-limit-100"],
)
async def test_a_120_index_job_with_101_single_failures(
    emulator_process: EmulatorProcess,
    process_api_client: k8s.ApiClient,
    namespace: str,
    tmp_path: Path,
    backoff_limit: int | None,
    expected: tuple[str, str],
) -> None:
    job = _agents_job(120)
    assert "backoffLimit" not in job["spec"]
    if backoff_limit is not None:
        job["spec"]["backoffLimit"] = backoff_limit
    kind, reason, status = await _run_job(
        emulator_process, process_api_client, namespace, tmp_path, job, _once(range(101))
    )
    assert (kind, reason if kind == "Failed" else "") == expected
    assert status["failed"] == 101
    if kind == "Complete":
        assert status["succeeded"] == 120


async def test_a_non_retriable_exit_fails_its_index_at_once(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str, tmp_path: Path
) -> None:
    job = _agents_job(3)
    kind, reason, status = await _run_job(
        emulator,
        api_client,
        namespace,
        tmp_path,
        job,
        lambda index, attempt: 2 if index == 1 else 0,
    )
    # One pod for index 1 (FailIndex), not backoffLimitPerIndex + 1 = 4.
    assert (kind, reason) == ("Failed", "FailedIndexes")
    assert (status["failed"], status["failedIndexes"], status["succeeded"]) == (1, "1", 2)


def _policy_job(rules: list[dict[str, Any]], per_index: int | None = None) -> dict[str, Any]:
    job = _agents_job(2)
    job["spec"]["podFailurePolicy"] = {"rules": rules}
    if per_index is None:
        del job["spec"]["backoffLimitPerIndex"], job["spec"]["maxFailedIndexes"]
        job["spec"]["backoffLimit"] = 1
    return job


@pytest.mark.parametrize(
    ("rules", "per_index", "exits", "expected"),
    [
        # FailJob on exit 3: the whole Job fails at the first such pod.
        (
            [{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [3]}}],
            3,
            lambda i, a: 3 if i == 0 else 0,
            ("Failed", "PodFailurePolicy", 1),
        ),
        # Ignore on exit 4: retried without counting, then it succeeds.
        (
            [{"action": "Ignore", "onExitCodes": {"operator": "In", "values": [4]}}],
            None,
            lambda i, a: 4 if a < 3 else 0,
            ("Complete", "", 0),
        ),
        # NotIn [5] with another container's name: no match, so Count: two failures of
        # index 0 exceed backoffLimit 1.
        (
            [
                {
                    "action": "Ignore",
                    "onExitCodes": {"containerName": "other", "operator": "NotIn", "values": [5]},
                }
            ],
            None,
            lambda i, a: 1 if i == 0 else 0,
            ("Failed", "BackoffLimitExceeded", 2),
        ),
        # NotIn [5] for the agent container: exit 1 is not in it, so it is ignored.
        (
            [
                {
                    "action": "Ignore",
                    "onExitCodes": {"containerName": "agent", "operator": "NotIn", "values": [5]},
                }
            ],
            None,
            lambda i, a: 1 if a == 0 else 0,
            ("Complete", "", 0),
        ),
    ],
    ids=["failjob", "ignore-in", "count-other-container", "ignore-notin"],
)
async def test_the_jobs_own_pod_failure_policy_decides(
    emulator: EmulatorThread,
    api_client: k8s.ApiClient,
    namespace: str,
    tmp_path: Path,
    rules: list[dict[str, Any]],
    per_index: int | None,
    exits: Callable[[int, int], int | None],
    expected: tuple[str, str, int],
) -> None:
    kind, reason, status = await _run_job(
        emulator, api_client, namespace, tmp_path, _policy_job(rules, per_index), exits
    )
    assert (kind, reason if kind == "Failed" else "", status["failed"]) == expected


# -- the backend on such Jobs ---------------------------------------------------------------

Exit = tuple[str, str, int, int, bool, int, str]


async def _backend_run(
    emu: EmulatorThread,
    api: k8s.ApiClient,
    ns: str,
    tmp_path: Path,
    exits: Callable[[int, int], int | None],
) -> tuple[list[Exit], KubernetesBackend]:
    """Launch a 3-agent map through the backend, run it with scripted exits, and poll
    until the Job has finished and the backend has decided."""
    got: list[Exit] = []

    async def on_exit(*args: Any) -> None:
        got.append(args)  # type: ignore[arg-type]

    settings = KubernetesSettings(
        namespace=ns, image="jetreduce:test", poll_interval_s=3600, relaunch_delay_s=0
    )
    backend = KubernetesBackend(
        NatsSettings(url="nats://127.0.0.1:1", prefix="pc"),
        settings,
        api_client=api,
        on_exit=on_exit,
    )
    spec = map_only_spec()
    name = job_name("wf-p", "map")
    async with _kubelet(api, ns, tmp_path) as kubelet:
        kubelet.exits[name] = exits
        assert await backend.launch("wf-p", "map", [1, 1, 1], spec) == 3
        await wait_for(lambda: _condition(emu, ns, name), timeout_s=30)
        for _ in range(3):  # a relaunch (if any) would be created by one of these
            await backend.poll_once()
    await backend.stop_all()
    return got, backend


async def test_a_phase_whose_every_agent_exits_non_retriable_fails_without_relaunch(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str, tmp_path: Path
) -> None:
    got, _ = await _backend_run(emulator, api_client, namespace, tmp_path, lambda i, a: 2)
    jobs = {j["metadata"]["name"] for j in emulator.live("batch/v1/jobs", namespace)}
    assert jobs == {job_name("wf-p", "map")}  # no relaunch
    final = [e for e in got if not e[4] and e[5] == 0]
    assert final, got
    assert "non-retriable code 2" in final[-1][6], final


async def test_a_job_that_fails_after_its_phase_is_decided_is_left_alone(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str, tmp_path: Path
) -> None:
    """Index 1 fails for good (exit 2) while the others succeed: ``Failed/FailedIndexes``
    once all are done. Agents exit 0 only when their phase is over, so neither a relaunch
    (it would race map.complete) nor a final give-up (it would fail the workflow) follows."""
    got, backend = await _backend_run(
        emulator, api_client, namespace, tmp_path, lambda i, a: 2 if i == 1 else 0
    )
    jobs = {j["metadata"]["name"] for j in emulator.live("batch/v1/jobs", namespace)}
    assert jobs == {job_name("wf-p", "map")}
    assert got and not any(not e[4] and e[5] == 0 for e in got), got
    assert not backend.running("wf-p", "map")


async def test_a_finished_job_goes_after_its_ttl_and_the_backend_lets_it_go(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str, tmp_path: Path
) -> None:
    exits: list[Any] = []

    async def on_exit(*args: Any) -> None:
        exits.append(args)

    backend = KubernetesBackend(
        NatsSettings(url="nats://127.0.0.1:1", prefix="ttl"),
        KubernetesSettings(
            namespace=namespace,
            image="jetreduce:test",
            poll_interval_s=3600,
            ttl_seconds_after_finished=1,
        ),
        api_client=api_client,
        on_exit=on_exit,
    )
    name = job_name("wf-ttl", "map")
    kubelet = ProcessKubelet(api_client, namespace, tmp_path, poll_s=0.05, nice=0, ttl_scale=0.3)
    kubelet.exits[name] = lambda index, attempt: 0
    stop = asyncio.Event()
    task = asyncio.create_task(kubelet.run(stop))
    try:
        assert await backend.launch("wf-ttl", "map", [1, 1], map_only_spec()) == 2
        await wait_for(lambda: _condition(emulator, namespace, name), timeout_s=20)
        await backend.poll_once()
        assert not backend.running("wf-ttl", "map")  # complete

        def gone() -> bool:
            return not emulator.live("batch/v1/jobs", namespace) and not emulator.live(
                "v1/pods", namespace
            )

        await wait_for(gone, timeout_s=10)
        await backend.poll_once()  # the Job is gone: forgotten, nothing reported
        assert backend._seen == {} and exits == []
    finally:
        await backend.stop("wf-ttl")
        await backend.stop_all()
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_a_failure_is_counted_once_its_replacement_exists_after_the_backoff(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str, tmp_path: Path
) -> None:
    """Index 0 fails once. While its per-index backoff (10 s scaled to 0.5 s) runs, the
    failed pod is there and ``status.failed`` is still 0; the count comes with the
    replacement pod, as on the real controller."""
    job = copy.deepcopy(_agents_job(2))
    job["metadata"]["namespace"] = namespace
    name = job["metadata"]["name"]
    seen: list[tuple[int, int, bool]] = []
    """(status.failed, pods of index 0, one of them failed), as observed."""
    kubelet = ProcessKubelet(
        api_client, namespace, tmp_path, poll_s=0.05, nice=0, backoff_scale=0.05
    )
    kubelet.exits[name] = lambda index, attempt: 1 if index == 0 and attempt == 0 else 0
    stop = asyncio.Event()
    task = asyncio.create_task(kubelet.run(stop))
    try:
        await asyncio.to_thread(
            k8s.BatchV1Api(api_client).create_namespaced_job, namespace, job, _preload_content=False
        )

        def observe() -> bool:
            jobs = emulator.live("batch/v1/jobs", namespace)
            failed = int(((jobs[0].get("status") or {}) if jobs else {}).get("failed") or 0)
            pods = [
                p
                for p in emulator.live("v1/pods", namespace)
                if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0"
            ]
            crashed = any((p.get("status") or {}).get("phase") == "Failed" for p in pods)
            seen.append((failed, len(pods), crashed))
            return _condition(emulator, namespace, name) is not None

        await wait_for(observe, timeout_s=20, every_s=0.02)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert kubelet.errors == []
    assert (0, 1, True) in seen  # the backoff: failed pod there, not counted yet
    assert all(pods == 2 for failed, pods, _ in seen if failed == 1)
    assert seen[-1][0] == 1
