"""A phase whose Job fails as a whole (its pods' backoff used up while items remain): the
backend relaunches it within ``max_relaunches`` and then gives up with the event on which the
workflow fails. First the backend alone against the emulator (Job status written by the test,
as the Job controller would), then whole workflows through the process kubelet, whose
``crash`` makes every pod of a Job exit at once."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
from harness import orchestrator, stored_events
from kmock_plus import EmulatorProcess, EmulatorThread
from kubelet import ProcessKubelet
from kubernetes import client as k8s

from jetreduce.cli.submit import submit
from jetreduce.cli.watch import Watcher
from jetreduce.contract import events as ev
from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.records import StoredSpec
from jetreduce.lang.parse import parse_workflow
from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.launcher.kubernetes import (
    ATTEMPT_ANNOTATION,
    KubernetesBackend,
    job_name,
)
from jetreduce.runtime.settings import NatsSettings
from support import wait_for

pytestmark = pytest.mark.anyio

WORKFLOW = """
name: relaunch-check
mode: mapreduce
setup:
  - shell: "true"
map:
  input: items.json
  json_path: "$.items[*]"
  max_parallel: 3
  agent_template:
    - shell: "echo ${item.n}"
"""

Exit = tuple[str, str, int, int, bool, int, str]


def _spec() -> StoredSpec:
    return StoredSpec(
        workflow=parse_workflow(WORKFLOW, source="t.yml").workflow, options=SubmitOptions()
    )


def _backend(api: k8s.ApiClient, namespace: str, exits: list[Exit], **kw: Any) -> KubernetesBackend:
    async def on_exit(*args: Any) -> None:
        exits.append(args)  # type: ignore[arg-type]

    nats = NatsSettings(url="nats://127.0.0.1:4222", prefix="tp", user="u", password="s3cret")
    settings = KubernetesSettings(
        namespace=namespace, image="jetreduce:test", poll_interval_s=3600, **kw
    )
    return KubernetesBackend(nats, settings, api_client=api, on_exit=on_exit)


def _jobs(emu: EmulatorThread, ns: str) -> dict[str, dict[str, Any]]:
    return {j["metadata"]["name"]: j for j in emu.live("batch/v1/jobs", ns)}


async def _fail_job(
    api: k8s.ApiClient, ns: str, job: str, reason: str, pod: tuple[int, int] | None
) -> None:
    """Play the Job controller: the Job failed as a whole, after one more failed pod
    (index, exit code) or, with ``pod`` None, with no pod failure (a deadline)."""
    batch, core = k8s.BatchV1Api(api), k8s.CoreV1Api(api)
    status: dict[str, Any] = {
        "failed": 0,
        "conditions": [{"type": "Failed", "status": "True", "reason": reason}],
    }
    if pod is not None:
        index, code = pod
        await asyncio.to_thread(
            core.create_namespaced_pod, ns, _failed_pod(job, index, code), _preload_content=False
        )
        status["failed"] = 1
        status["failedIndexes"] = str(index)
    await asyncio.to_thread(
        batch.patch_namespaced_job_status, job, ns, {"status": status}, _preload_content=False
    )


def _failed_pod(job: str, index: int, code: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job}-{index}-abcde",
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
                    "state": {"terminated": {"exitCode": code}},
                }
            ],
        },
    }


# -- the backend alone ----------------------------------------------------------------------
async def test_failed_job_is_relaunched_once_then_given_up(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str
) -> None:
    exits: list[Exit] = []
    backend = _backend(api_client, namespace, exits, max_relaunches=1, relaunch_delay_s=0)
    first, second = job_name("wf-a", "map"), job_name("wf-a", "map", 1)
    try:
        assert await backend.launch("wf-a", "map", [1, 1, 1], _spec()) == 3
        await _fail_job(api_client, namespace, first, "MaxFailedIndexesExceeded", (1, 42))
        await backend.poll_once()
        # The pod comes back (in the relaunched Job), so the workflow goes on.
        assert exits == [("wf-a", "map", 1, 42, True, 3, "")]
        jobs = _jobs(emulator, namespace)
        assert set(jobs) == {first, second}
        old, new = jobs[first], jobs[second]
        assert new["metadata"]["annotations"][ATTEMPT_ANNOTATION] == "1"
        assert new["metadata"]["ownerReferences"] == old["metadata"]["ownerReferences"]
        assert new["metadata"]["labels"]["jetreduce.io/phase"] == "map"
        assert new["spec"]["completions"] == new["spec"]["parallelism"] == 3
        assert new["spec"]["template"]["spec"] == old["spec"]["template"]["spec"]

        # Neither the reconciler's launch nor another poll starts a third run.
        assert await backend.launch("wf-a", "map", [1, 1, 1], _spec()) == 0
        await backend.poll_once()
        assert set(_jobs(emulator, namespace)) == {first, second}
        assert len(exits) == 1

        # The relaunch fails too: the budget (1) is spent, so the last exit is final.
        await _fail_job(api_client, namespace, second, "BackoffLimitExceeded", (0, 7))
        await backend.poll_once()
        why = f"kept crashing (last exit code 7): Job {second} failed with BackoffLimitExceeded"
        assert exits[1:] == [("wf-a", "map", 0, 7, False, 0, f"{why} after 1 relaunch(es)")]
        await backend.poll_once()
        assert len(exits) == 2 and set(_jobs(emulator, namespace)) == {first, second}
    finally:
        await backend.stop_all()


async def test_job_past_its_deadline_is_not_relaunched(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str
) -> None:
    """The phase's time is spent: give up at once, even with no failed pod to report."""
    exits: list[Exit] = []
    backend = _backend(api_client, namespace, exits, max_relaunches=2, relaunch_delay_s=0)
    try:
        await backend.launch("wf-a", "setup", [1], _spec())
        await _fail_job(api_client, namespace, job_name("wf-a", "setup"), "DeadlineExceeded", None)
        await backend.poll_once()
        await backend.poll_once()
        setup = job_name("wf-a", "setup")
        why = f"ran out of time: Job {setup} failed with DeadlineExceeded"
        assert exits == [("wf-a", "setup", -1, -1, False, 0, why)]
        assert set(_jobs(emulator, namespace)) == {job_name("wf-a", "setup")}
    finally:
        await backend.stop_all()


async def test_relaunch_waits_for_its_delay(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str
) -> None:
    exits: list[Exit] = []
    backend = _backend(api_client, namespace, exits, relaunch_delay_s=3600)
    try:
        await backend.launch("wf-a", "map", [1, 1], _spec())
        await _fail_job(
            api_client, namespace, job_name("wf-a", "map"), "BackoffLimitExceeded", (0, 1)
        )
        await backend.poll_once()
        await backend.poll_once()
        assert exits == [("wf-a", "map", 0, 1, True, 2, "")]  # coming back, not yet relaunched
        assert set(_jobs(emulator, namespace)) == {job_name("wf-a", "map")}
    finally:
        await backend.stop_all()


# -- whole workflows ------------------------------------------------------------------------
async def _run(
    nats_url: str,
    prefix: str,
    tmp_path: Path,
    workdir: Path,
    api: k8s.ApiClient,
    emulator: EmulatorProcess,
    namespace: str,
    *,
    crash: list[int],
    max_relaunches: int,
) -> tuple[Any, list[Any], ProcessKubelet, str]:
    """One 12-item workflow whose map Jobs of the runs in ``crash`` crash-loop (exit 3).
    Returns its terminal event, its ``agent.exited`` events, the kubelet and the id; checks
    that nothing is left behind."""
    (workdir / "items.json").write_text(json.dumps({"items": [{"n": i} for i in range(12)]}))
    settings = NatsSettings(url=nats_url, prefix=prefix)
    k8s_settings = KubernetesSettings(
        namespace=namespace,
        image="jetreduce:test",
        poll_interval_s=0.2,
        max_relaunches=max_relaunches,
        relaunch_delay_s=0.5,
    )
    backend = KubernetesBackend(settings, k8s_settings, api_client=api)
    (tmp_path / "pods").mkdir()
    kubelet = ProcessKubelet(api, namespace, tmp_path / "pods", log_dir=tmp_path / "pod-logs")
    wf = f"rl-{secrets.token_hex(3)}"
    kubelet.crash = {job_name(wf, "map", n): 3 for n in crash}
    kubelet_stop = asyncio.Event()
    kubelet_task = asyncio.create_task(kubelet.run(kubelet_stop), name="kubelet")
    try:
        async with orchestrator(settings, backend, sweep_every_s=1) as ctx:
            watcher = Watcher(ctx.nc, ctx.subjects, wf, show_events=False, tty=False)
            await watcher.start()
            try:
                await submit(
                    ctx.nc,
                    ctx.subjects,
                    WORKFLOW,
                    SubmitOptions(workdir=str(workdir), backend="kubernetes"),
                    workflow_id=wf,
                    source="test",
                )
                done = await watcher.until_done(120)
            finally:
                await watcher.stop()
            exited = await stored_events(ctx, ctx.subjects.agent("exited", wf))

            def nothing_left() -> bool:
                return not any(
                    emulator.live(r, namespace)
                    for r in ("batch/v1/jobs", "v1/configmaps", "v1/secrets", "v1/pods")
                )

            await wait_for(nothing_left, timeout_s=30)
            await wait_for(lambda: kubelet.processes_alive() == 0, timeout_s=30)
    finally:
        kubelet_stop.set()
        await asyncio.wait_for(kubelet_task, 30)
        await backend.stop_all()
    assert kubelet.errors == []
    return done, exited, kubelet, wf


def _runs(kubelet: ProcessKubelet, wf: str) -> set[str]:
    """Names of the map Jobs the kubelet ran for ``wf``."""
    names = set(kubelet.jobs) | set(kubelet.finished)
    return {n for n in names if n.startswith(job_name(wf, "map"))}


@pytest.mark.slow
async def test_workflow_completes_after_its_map_job_failed_and_was_relaunched(
    nats_url: str,
    prefix: str,
    tmp_path: Path,
    workdir: Path,
    emulator_process: EmulatorProcess,
    process_api_client: k8s.ApiClient,
    namespace: str,
) -> None:
    done, exited, kubelet, wf = await _run(
        nats_url,
        prefix,
        tmp_path,
        workdir,
        process_api_client,
        emulator_process,
        namespace,
        crash=[0],
        max_relaunches=2,
    )
    assert isinstance(done, ev.WorkflowCompleted), done
    assert (done.total, done.done, done.dead) == (12, 12, 0)
    assert _runs(kubelet, wf) == {job_name(wf, "map"), job_name(wf, "map", 1)}
    first = kubelet.finished[job_name(wf, "map")]
    assert first.failed_indexes  # it failed as a whole: some indexes used up their backoff
    map_exits = [e for e in exited if e.phase == "map"]
    # Which failures are reported as restarted depends on what each 0.2 s poll saw of
    # pods that crash at once (an index may use up its backoff between two polls); what
    # must hold is that none of them gave the phase up while a relaunch was due: the final
    # exit (not restarted, none remaining) fails the workflow.
    assert map_exits and any(e.restarted for e in map_exits), map_exits
    assert not any(not e.restarted and e.remaining == 0 for e in map_exits), map_exits
    assert {e.exit_code for e in map_exits} == {3}


@pytest.mark.slow
async def test_workflow_fails_with_the_reason_once_relaunches_run_out(
    nats_url: str,
    prefix: str,
    tmp_path: Path,
    workdir: Path,
    emulator_process: EmulatorProcess,
    process_api_client: k8s.ApiClient,
    namespace: str,
) -> None:
    done, exited, kubelet, wf = await _run(
        nats_url,
        prefix,
        tmp_path,
        workdir,
        process_api_client,
        emulator_process,
        namespace,
        crash=[0, 1, 2],
        max_relaunches=1,
    )
    assert isinstance(done, ev.WorkflowFailed), done
    # The reason names the Job that gave up and why (AgentExited.reason).
    assert done.reason.startswith("map agents kept crashing (last exit code 3): Job "), done
    assert f"{job_name(wf, 'map', 1)} failed with" in done.reason, done
    assert done.reason.endswith("after 1 relaunch(es)"), done
    # One relaunch, as budgeted, and no third run.
    assert _runs(kubelet, wf) == {job_name(wf, "map"), job_name(wf, "map", 1)}
    final = [e for e in exited if not e.restarted and e.remaining == 0]
    assert final and all(e.phase == "map" and e.exit_code == 3 for e in final), exited
