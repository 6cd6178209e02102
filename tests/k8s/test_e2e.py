"""End to end through the Kubernetes backend: the real planner, launcher (with
``KubernetesBackend``), aggregator and janitor on the session nats-server; the API emulator;
and the process kubelet running every Job index as a local ``python -m jetreduce worker``
with the env the pod would get (completion index from the annotation, NATS password from
the Secret). One agent pod is killed (a crash, reported as the kernel's OOM killer would:
the Job re-runs its index) and one is evicted (a disruption: ignored by the podFailurePolicy);
no item is lost, each fault is published with its reason (``agent.pod_failed``), the map
Job's life as ``agent.job`` events, and nothing is left behind.

Once flaky (the faults could land after the last item): API calls took up to ~13 s, because
kmock scanned its whole request log on every request and its thread shared this process's GIL
with the services, the kubelet's threads and 50 agent starts. Now the emulator runs in a
process of its own with the log off (``emulator_process``), pods run under ``nice``, and the
faults are injected once 20 items are done, with an assertion that the re-run came while
items remained.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
from pathlib import Path
from typing import Any

import pytest
from harness import orchestrator, stored_events
from kmock_plus import EmulatorProcess
from kubelet import ProcessKubelet
from kubernetes import client as k8s

from jetreduce.cli.submit import submit
from jetreduce.cli.watch import Watcher
from jetreduce.contract import events as ev
from jetreduce.contract.events import SubmitOptions
from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.launcher.kubernetes import KubernetesBackend, job_name
from jetreduce.runtime.settings import NatsSettings
from support import wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ITEMS = 300
PARALLEL = 50
WORKFLOW = f"""
name: k8s-e2e
mode: mapreduce
map:
  input: items.json
  json_path: "$.items[*]"
  max_parallel: {PARALLEL}
  agent_template:
    - shell: "sleep 2; echo $(( ${{item.n}} * 3 ))"
reduce:
  - shell: "echo ${{map.successful}}/${{map.total}}"
"""


async def test_workflow_runs_through_indexed_jobs_with_pod_failures(
    nats_url: str,
    prefix: str,
    tmp_path: Path,
    workdir: Path,
    emulator_process: EmulatorProcess,
    process_api_client: k8s.ApiClient,
    namespace: str,
) -> None:
    emulator, api_client = emulator_process, process_api_client
    (workdir / "items.json").write_text(json.dumps({"items": [{"n": i} for i in range(ITEMS)]}))
    # Credentials the server does not check (it has no auth): they prove the Secret → env
    # path, and that the Secret is cleaned up too.
    settings = NatsSettings(url=nats_url, prefix=prefix, user="jr", password="not-checked")
    k8s_settings = KubernetesSettings(
        namespace=namespace, image="jetreduce:test", poll_interval_s=0.2
    )
    backend = KubernetesBackend(settings, k8s_settings, api_client=api_client)
    kubelet = ProcessKubelet(
        api_client, namespace, tmp_path / "pods", log_dir=tmp_path / "pod-logs"
    )
    (tmp_path / "pods").mkdir()
    wf = f"k8s-{secrets.token_hex(3)}"
    map_job = job_name(wf, "map")
    kubelet_stop = asyncio.Event()
    kubelet_task = asyncio.create_task(kubelet.run(kubelet_stop), name="kubelet")
    try:
        async with orchestrator(settings, backend, sweep_every_s=2) as ctx:
            nc = ctx.nc
            watcher = Watcher(nc, ctx.subjects, wf, show_events=False, tty=False)
            await watcher.start()
            try:
                await submit(
                    nc,
                    ctx.subjects,
                    WORKFLOW,
                    # A killed agent's item comes back after its lease: 10 s, not 30.
                    SubmitOptions(workdir=str(workdir), lease_s=10, backend="kubernetes"),
                    workflow_id=wf,
                    source="test",
                )
                # Items done so far, live (the workflow record's count is only written at
                # the end of the phase): every result as it is published.
                finished: set[str] = set()

                async def on_done(msg: Any) -> None:
                    finished.add(msg.subject)

                results = await nc.subscribe(ctx.subjects.done_of(wf), cb=on_done)

                await wait_for(
                    lambda: (
                        kubelet.attempt(map_job, 7) is not None
                        and kubelet.attempt(map_job, 11) is not None
                    ),
                    timeout_s=60,
                )
                # Early in the map phase (agents are taking items), so the faults hit a run
                # in flight: ~10 s of work remain when they do.
                await wait_for(lambda: len(finished) >= 20, timeout_s=90)
                killed = kubelet.kill(map_job, 7, signal.SIGKILL, reason="OOMKilled")
                evicted_attempt = kubelet.attempt(map_job, 11)
                evicted = kubelet.evict(map_job, 11)
                done_at_faults = len(finished)
                await _wait_rerun(kubelet, map_job, 7)
                rerun_done = len(finished)
                assert evicted_attempt is not None and evicted_attempt.proc is not None
                evicted_proc = evicted_attempt.proc
                await wait_for(lambda: evicted_proc.returncode is not None, timeout_s=60)
                if evicted_proc.returncode != 0:  # not complete: the Job re-runs the index
                    await _wait_rerun(kubelet, map_job, 11)
                done = await watcher.until_done(240)
            finally:
                await watcher.stop()
                await results.unsubscribe()

            logs = "\n".join(p.read_text() for p in sorted((tmp_path / "pod-logs").glob("*")))
            assert isinstance(done, ev.WorkflowCompleted), logs[-5000:]
            # The faults and the re-run happened while items remained (not after the fact).
            assert done_at_faults < ITEMS - PARALLEL and rerun_done < ITEMS, (
                done_at_faults,
                rerun_done,
            )
            assert (done.total, done.done, done.dead) == (ITEMS, ITEMS, 0)
            assert done.reduce_output.strip() == f"{ITEMS}/{ITEMS}"

            run = kubelet.finished.get(map_job) or kubelet.jobs[map_job]
            pids = {i: _pids(kubelet, map_job, i) for i in (7, 11)}
            assert killed in pids[7] and len(pids[7]) >= 2, pids  # the crashed index re-ran
            assert evicted in pids[11], pids
            assert run.failures.get(7) == 1 and 11 not in run.failures  # eviction not counted
            # An evicted agent hands its items back and exits; with exit 0 (today's agent)
            # the pod Succeeds and, as with the real Job controller, its index counts as
            # complete; with a non-zero exit the index is re-run outside the backoff budget.
            # (Whether the kubelet wrote the index down as succeeded before the launcher deleted
            # the Job on map.complete is a race of the test double, so it is not asserted.)
            if evicted_proc.returncode == 0:
                assert len(pids[11]) == 1, pids
            else:
                assert len(pids[11]) >= 2, pids
            assert run.body["spec"]["parallelism"] == PARALLEL

            # Job and pod status, as published by the launcher (watch shows them).
            pods_failed = await stored_events(ctx, ctx.subjects.agent("pod_failed", wf))
            faults = {(p.job, p.index): p for p in pods_failed}
            oom = faults[(map_job, 7)]
            assert (oom.reason, oom.exit_code, oom.disruption) == ("OOMKilled", 137, False)
            evicted_event = faults[(map_job, 11)]
            assert evicted_event.reason == "EvictionByEvictionAPI" and evicted_event.disruption
            assert len(pods_failed) == len({p.pod for p in pods_failed})  # once per pod
            job_events = await stored_events(ctx, ctx.subjects.agent("job", wf))
            map_states = [j.state for j in job_events if j.job == map_job]
            assert map_states[0] == "running", job_events
            # Deleted on map.complete: complete if the kubelet finished it first, else stopped.
            assert map_states[-1] in ("complete", "stopped") and len(map_states) == 2, job_events

            # The launcher's stop on the terminal event removes every object of the workflow.
            def nothing_left() -> bool:
                return not any(
                    emulator.live(r, namespace)
                    for r in ("batch/v1/jobs", "v1/configmaps", "v1/secrets", "v1/pods")
                )

            try:
                await wait_for(nothing_left, timeout_s=30)
            except AssertionError:
                left = {
                    r: [o["metadata"]["name"] for o in emulator.live(r, namespace)]
                    for r in ("batch/v1/jobs", "v1/configmaps", "v1/secrets", "v1/pods")
                }
                raise AssertionError(f"left behind: {left}") from None
            await wait_for(lambda: kubelet.processes_alive() == 0, timeout_s=30)
            assert kubelet.errors == []
    finally:
        kubelet_stop.set()
        await asyncio.wait_for(kubelet_task, 30)
        await backend.stop_all()
    assert kubelet.processes_alive() == 0


def _pids(kubelet: ProcessKubelet, job: str, index: int) -> list[int]:
    """Every process the kubelet started for ``index`` of ``job``, in order."""
    run = kubelet.jobs.get(job) or kubelet.finished.get(job)
    return [] if run is None else [pid for i, pid in run.started if i == index]


async def _wait_rerun(kubelet: ProcessKubelet, job: str, index: int) -> None:
    """Until a second process ran for ``index``; on timeout, say what the Job run saw."""
    try:
        await wait_for(lambda: len(_pids(kubelet, job, index)) >= 2, timeout_s=60)
    except AssertionError:
        run = kubelet.jobs.get(job) or kubelet.finished.get(job)
        task = None if run is None else run.task
        raise AssertionError(
            f"index {index} not re-run; kubelet errors {kubelet.errors}; job task {task}; "
            f"failures {None if run is None else run.failures}; "
            f"slowest API call {kubelet.slowest_api_s:.1f}s; "
            f"rc {None if run is None else run.attempts[index].proc}"
        ) from None
