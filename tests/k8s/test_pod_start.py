"""Pods that cannot start surface instead of hanging the workflow: the process kubelet
refuses them as the control plane and kubelet would (a missing ServiceAccount: no pod, a
``FailedCreate`` Event on the Job; a missing Secret for env: ``CreateContainerConfigError``;
a missing Secret volume: ``FailedMount``; an image that cannot be pulled; no node fits), the
backend reports each as ``agent.pod_failed`` with the API's reason and message, and gives the
phase up with that reason once the startup deadline has passed."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from harness import map_only_spec, orchestrator, stored_events
from kmock_plus import EmulatorThread
from kubelet import ProcessKubelet
from kubernetes import client as k8s

from jetreduce.cli.submit import submit
from jetreduce.cli.watch import Watcher
from jetreduce.contract import events as ev
from jetreduce.contract.events import JobStatus, PodFailed, SubmitOptions
from jetreduce.launcher.k8s_manifests import COMPLETION_INDEX_ANNOTATION
from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.launcher.k8s_status import STALE_EVENT_S, start_problems
from jetreduce.launcher.kubernetes import KubernetesBackend, job_name
from jetreduce.runtime.settings import NatsSettings
from support import wait_for

pytestmark = pytest.mark.anyio

JOB = job_name("wf-s", "map")

Exit = tuple[str, str, int, int, bool, int, str]
DEADLINE_S = 2.5


async def _run(
    api: k8s.ApiClient,
    ns: str,
    tmp_path: Path,
    settings: dict[str, Any],
    fault: Callable[[ProcessKubelet], None] = lambda kubelet: None,
    *,
    until_given_up: bool = True,
) -> tuple[list[Exit], list[PodFailed]]:
    exits: list[Exit] = []
    statuses: list[PodFailed] = []

    async def on_exit(*args: Any) -> None:
        exits.append(args)  # type: ignore[arg-type]

    async def on_status(event: JobStatus | PodFailed) -> None:
        if isinstance(event, PodFailed):
            statuses.append(event)

    options: dict[str, Any] = {
        "namespace": ns,
        "image": "jetreduce:test",
        "command": ("sleep", "30"),
        "poll_interval_s": 3600,
        # Long enough for a loaded machine's kubelet to have written why the pods wait
        # (else "no pod started" would be the reason), short enough for a quick test.
        "startup_deadline_s": DEADLINE_S,
        **settings,
    }
    backend = KubernetesBackend(
        NatsSettings(url="nats://127.0.0.1:1", prefix="ps"),
        KubernetesSettings(**options),
        api_client=api,
        on_exit=on_exit,
        on_status=on_status,
    )
    spec = map_only_spec()
    kubelet = ProcessKubelet(api, ns, tmp_path, poll_s=0.05, nice=0, retry_s=0.05)
    fault(kubelet)
    stop = asyncio.Event()
    task = asyncio.create_task(kubelet.run(stop))
    try:
        await backend.launch("wf-s", "map", [1, 1], spec)

        async def given_up() -> bool:
            await backend.poll_once()
            return any(not e[4] and e[5] == 0 for e in exits)

        if until_given_up:
            await wait_for(given_up, timeout_s=15, every_s=0.1)
        else:
            for _ in range(int(DEADLINE_S * 10) + 5):  # past the startup deadline
                assert not await given_up(), exits
                await asyncio.sleep(0.1)
    finally:
        await backend.stop("wf-s")
        await backend.stop_all()
        stop.set()
        await asyncio.wait_for(task, 30)
    assert kubelet.errors == []
    return exits, statuses


def _unschedulable(kubelet: ProcessKubelet) -> None:
    kubelet.unschedulable[JOB] = "0/3 nodes are available: 3 Insufficient cpu."


def _bad_image(kubelet: ProcessKubelet) -> None:
    kubelet.image_errors["jetreduce:test"] = (
        "ErrImagePull",
        'failed to pull image "jetreduce:test": not found',
    )


CASES = {
    "missing-service-account": (
        {"service_account": "missing-sa"},
        None,
        "FailedCreate",
        'serviceaccount "missing-sa" not found',
    ),
    "missing-env-secret": (
        {"nats_env_secret": "agent-nats"},
        None,
        "CreateContainerConfigError",
        'secret "agent-nats" not found',
    ),
    "missing-volume-secret": (
        {"nats_files_secret": "nats-files"},
        None,
        "FailedMount",
        'secret "nats-files" not found',
    ),
    "image-pull": ({}, _bad_image, "ErrImagePull", "not found"),
    "unschedulable": ({}, _unschedulable, "Unschedulable", "Insufficient cpu"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_pod_that_cannot_start_fails_the_phase_with_the_apis_reason(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str, tmp_path: Path, case: str
) -> None:
    settings, fault, reason, names = CASES[case]
    exits, statuses = await _run(
        api_client, namespace, tmp_path, settings, fault or (lambda k: None)
    )
    reported = [s for s in statuses if s.reason == reason]
    assert reported, statuses
    assert names in reported[0].message and reported[0].job == JOB
    if reason == "FailedCreate":  # no pod was ever created: the Job itself is named
        assert reported[0].pod == "" and reported[0].index == -1
    else:  # once per pod
        assert sorted(s.index for s in reported) == [0, 1]
    final = [e for e in exits if not e[4] and e[5] == 0]
    assert len(final) == 1, exits
    assert final[0][6].startswith(f"could not start within {DEADLINE_S:g}s: {reason}: "), final
    assert names in final[0][6] and JOB in final[0][6]


async def test_pods_that_run_are_not_given_up(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str, tmp_path: Path
) -> None:
    exits, statuses = await _run(api_client, namespace, tmp_path, {}, until_given_up=False)
    assert exits == [] and statuses == []


# -- a whole workflow -----------------------------------------------------------------------
WORKFLOW = """
name: cannot-start
mode: mapreduce
map:
  input: items.json
  json_path: "$.items[*]"
  max_parallel: 4
  agent_template:
    - shell: "true"
"""


async def test_a_workflow_whose_agents_cannot_start_fails_with_the_missing_objects_name(
    nats_url: str,
    prefix: str,
    workdir: Path,
    tmp_path: Path,
    emulator: EmulatorThread,
    api_client: k8s.ApiClient,
    namespace: str,
) -> None:
    """Through the real services: the agents' NATS credentials Secret does not exist. The
    workflow fails within the startup deadline, the reason names the Secret, the pods'
    reasons are on ``agent.pod_failed``, and nothing is left in the cluster."""
    (workdir / "items.json").write_text(json.dumps({"items": list(range(8))}))
    settings = NatsSettings(url=nats_url, prefix=prefix)
    backend = KubernetesBackend(
        settings,
        KubernetesSettings(
            namespace=namespace,
            image="jetreduce:test",
            poll_interval_s=0.2,
            startup_deadline_s=DEADLINE_S,
            nats_env_secret="agent-nats",
        ),
        api_client=api_client,
    )
    kubelet = ProcessKubelet(api_client, namespace, tmp_path, poll_s=0.05, nice=0, retry_s=0.1)
    stop = asyncio.Event()
    task = asyncio.create_task(kubelet.run(stop))
    wf = f"cs-{secrets.token_hex(3)}"
    try:
        async with orchestrator(settings, backend, sweep_every_s=1) as ctx:
            watcher = Watcher(ctx.nc, ctx.subjects, wf, show_events=False, tty=False)
            await watcher.start()
            started = asyncio.get_running_loop().time()
            try:
                await submit(
                    ctx.nc,
                    ctx.subjects,
                    WORKFLOW,
                    SubmitOptions(workdir=str(workdir), backend="kubernetes"),
                    workflow_id=wf,
                    source="test",
                )
                done = await watcher.until_done(30)
            finally:
                await watcher.stop()
            took = asyncio.get_running_loop().time() - started
            failed = await stored_events(ctx, ctx.subjects.agent("pod_failed", wf))

            def nothing_left() -> bool:
                return not any(
                    emulator.live(r, namespace)
                    for r in ("batch/v1/jobs", "v1/configmaps", "v1/secrets", "v1/pods")
                )

            await wait_for(nothing_left, timeout_s=15)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await backend.stop_all()
    assert isinstance(done, ev.WorkflowFailed), done
    # The first phase's agents (a setup phase reads the uploaded input) never start.
    assert f" agents could not start within {DEADLINE_S:g}s: " in done.reason, done.reason
    assert 'CreateContainerConfigError: secret "agent-nats" not found' in done.reason
    assert took < 15, took
    assert {e.reason for e in failed} == {"CreateContainerConfigError"}
    assert kubelet.errors == []


# -- stale Warning Events ---------------------------------------------------------------------
def _event(kind: str, name: str, reason: str, ago_s: float, now: float) -> dict[str, Any]:
    stamp = datetime.fromtimestamp(now - ago_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "involvedObject": {"kind": kind, "name": name},
        "reason": reason,
        "message": f'{reason}: secret "gone" not found',
        "lastTimestamp": stamp,
    }


@pytest.mark.parametrize(
    ("ago_s", "counted"), [(10.0, True), (STALE_EVENT_S["FailedMount"] + 60, False)]
)
def test_a_failed_mount_counts_only_while_it_repeats(ago_s: float, counted: bool) -> None:
    """Events outlive their cause by about an hour: a pod still pending (pulling its image)
    after the missing Secret was created must not be given up for an old FailedMount."""
    now = time.time()
    pods = {
        "items": [
            {
                "metadata": {"name": "p-0", "annotations": {COMPLETION_INDEX_ANNOTATION: "0"}},
                "status": {"phase": "Pending"},
            }
        ]
    }
    events = {"items": [_event("Pod", "p-0", "FailedMount", ago_s, now)]}
    problems = start_problems("job", pods, events, now=now)
    assert [p.reason for p in problems] == (["FailedMount"] if counted else [])


def test_an_old_failed_create_is_history() -> None:
    now = time.time()
    old = _event("Job", "job", "FailedCreate", STALE_EVENT_S["FailedCreate"] + 60, now)
    fresh = _event("Job", "job", "FailedCreate", 5, now)
    assert start_problems("job", {"items": []}, {"items": [old]}, now=now) == []
    (problem,) = start_problems("job", {"items": []}, {"items": [old, fresh]}, now=now)
    assert problem.hard and problem.index == -1
