"""The Kubernetes issue's end-to-end run, with the agent settings the dev overlay ships: the
real services, the API emulator in its own process, and the process kubelet running 50
agent pods over 500 items. Two faults land while items remain:

* one index's agent exits with a non-retriable code (the Job's podFailurePolicy fails that
  index at once: it never runs again);
* the Secret the agents' NATS credentials come from is deleted and an agent crashes: its
  replacement pod cannot start (``CreateContainerConfigError``, the Secret named).

The workflow fails within the startup deadline with a reason that names the missing Secret,
both faults are published on ``agent.pod_failed``, and nothing is left in the cluster.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import orchestrator, stored_events
from kmock_plus import EmulatorProcess
from kubelet import ProcessKubelet
from kubernetes import client as k8s

from jetreduce.cli.submit import submit
from jetreduce.cli.watch import Watcher
from jetreduce.contract import events as ev
from jetreduce.contract.events import SubmitOptions
from jetreduce.launcher.k8s_manifests import secret_name
from jetreduce.launcher.k8s_settings import KubernetesSettings, from_file_data
from jetreduce.launcher.kubernetes import KubernetesBackend, job_name
from jetreduce.runtime.settings import NatsSettings
from kustomize import render
from support import wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ITEMS = 500
PARALLEL = 50
DEADLINE_S = 4.0
NON_RETRIABLE_INDEX = 3
CRASHED_INDEX = 5
WORKFLOW = f"""
name: k8s-shipped
mode: mapreduce
map:
  input: items.json
  json_path: "$.items[*]"
  max_parallel: {PARALLEL}
  agent_template:
    - shell: "sleep 2"
"""


def shipped_agent_settings(overlay: str = "overlays/dev") -> KubernetesSettings:
    """The agent settings file of ``overlay``'s ``jetreduce-agents`` ConfigMap, read as the
    launcher reads it."""
    docs = render(overlay)
    (config,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("jetreduce-agents")
    ]
    (text,) = config["data"].values()
    return from_file_data(yaml.safe_load(text))


def _stalled(kubelet: ProcessKubelet, job: str, tmp_path: Path) -> str:
    """What the kubelet saw when no item finished: a failure once seen under load here."""
    run = kubelet.jobs.get(job) or kubelet.finished.get(job)
    logs = sorted((tmp_path / "pod-logs").glob("*.log"))
    tails = [f"{p.name}: {p.read_text()[-400:]}" for p in logs if p.stat().st_size][:5]
    return (
        f"no item finished: {len(logs)} pods, alive {kubelet.processes_alive()}, "
        f"started {None if run is None else len(run.started)}, "
        f"failures {None if run is None else run.failures}, errors {kubelet.errors}, "
        f"slowest API call {kubelet.slowest_api_s:.1f}s; logs: {tails}"
    )


async def test_shipped_agents_fail_fast_on_a_missing_secret_and_a_non_retriable_index(
    nats_url: str,
    prefix: str,
    tmp_path: Path,
    workdir: Path,
    emulator_process: EmulatorProcess,
    process_api_client: k8s.ApiClient,
    namespace: str,
) -> None:
    emulator, api_client = emulator_process, process_api_client
    shipped = shipped_agent_settings()
    wf = f"k8s-{secrets.token_hex(3)}"
    map_job = job_name(wf, "map")
    # The agents' NATS credentials: the Secret the installation names, else the one the
    # launcher writes for the workflow (from its own credentials).
    secret = shipped.nats_env_secret or secret_name(wf)
    (non_retriable, *_) = sorted(shipped.non_retriable_exit_codes)
    core = k8s.CoreV1Api(api_client)
    if shipped.nats_env_secret:
        await asyncio.to_thread(
            core.create_namespaced_secret,
            namespace,
            {
                "metadata": {"name": secret},
                "stringData": {"JETREDUCE_NATS_USER": "agent", "JETREDUCE_NATS_PASSWORD": "x"},
            },
        )
    (workdir / "items.json").write_text(json.dumps({"items": list(range(ITEMS))}))
    # The session server has no auth: the credentials prove the Secret → env path only.
    settings = NatsSettings(url=nats_url, prefix=prefix, user="jr", password="not-checked")
    k8s_settings = replace(
        shipped,
        namespace=namespace,
        image="jetreduce:test",
        nats_url=None,  # the launcher's own URL: pods are local processes here
        poll_interval_s=0.2,
        startup_deadline_s=DEADLINE_S,
    )
    backend = KubernetesBackend(settings, k8s_settings, api_client=api_client)
    (tmp_path / "pods").mkdir()
    kubelet = ProcessKubelet(
        api_client,
        namespace,
        tmp_path / "pods",
        log_dir=tmp_path / "pod-logs",
        accounts=(shipped.service_account,),
    )
    kubelet.exits[map_job] = lambda index, _tries: (
        non_retriable if index == NON_RETRIABLE_INDEX else None
    )
    kubelet_stop = asyncio.Event()
    kubelet_task = asyncio.create_task(kubelet.run(kubelet_stop), name="kubelet")
    try:
        async with orchestrator(settings, backend, sweep_every_s=2) as ctx:
            watcher = Watcher(ctx.nc, ctx.subjects, wf, show_events=False, tty=False)
            await watcher.start()
            finished: set[str] = set()

            async def on_done(msg: Any) -> None:
                finished.add(msg.subject)

            results = await ctx.nc.subscribe(ctx.subjects.done_of(wf), cb=on_done)
            try:
                await submit(
                    ctx.nc,
                    ctx.subjects,
                    WORKFLOW,
                    SubmitOptions(workdir=str(workdir), backend="kubernetes"),
                    workflow_id=wf,
                    source="test",
                )
                await wait_for(
                    lambda: kubelet.attempt(map_job, CRASHED_INDEX) is not None,
                    timeout_s=60,
                )
                try:
                    await wait_for(lambda: len(finished) >= 20, timeout_s=90)
                except AssertionError:
                    raise AssertionError(_stalled(kubelet, map_job, tmp_path)) from None
                await asyncio.to_thread(core.delete_namespaced_secret, secret, namespace)
                kubelet.kill(map_job, CRASHED_INDEX, signal.SIGKILL)
                faulted_at, done_at_fault = time.monotonic(), len(finished)
                done = await watcher.until_done(120)
                took = time.monotonic() - faulted_at
            finally:
                await watcher.stop()
                await results.unsubscribe()
            pods_failed = await stored_events(ctx, ctx.subjects.agent("pod_failed", wf))

            def nothing_left() -> bool:
                return not any(
                    emulator.live(r, namespace)
                    for r in ("batch/v1/jobs", "v1/configmaps", "v1/pods")
                )

            await wait_for(nothing_left, timeout_s=30)
            await wait_for(lambda: kubelet.processes_alive() == 0, timeout_s=30)
    finally:
        kubelet_stop.set()
        await asyncio.wait_for(kubelet_task, 30)
        await backend.stop_all()

    assert done_at_fault < ITEMS - PARALLEL, done_at_fault  # the faults hit a running map
    assert isinstance(done, ev.WorkflowFailed), done
    assert f'secret "{secret}" not found' in done.reason, done.reason
    assert f"could not start within {DEADLINE_S:g}s" in done.reason, done.reason
    # Failed within the startup deadline (plus the poll, the replacement's creation and the
    # way from the launcher's decision to the workflow's terminal event), not at the end of
    # a 20 s map phase and never by hanging.
    assert took < DEADLINE_S + 10, took
    by_index: dict[int, list[ev.PodFailed]] = {}
    for p in pods_failed:
        if p.job == map_job:
            by_index.setdefault(p.index, []).append(p)
    (refused,) = by_index[NON_RETRIABLE_INDEX]
    assert refused.exit_code == non_retriable and not refused.disruption
    run = kubelet.jobs.get(map_job) or kubelet.finished.get(map_job)
    assert run is not None
    started = [pid for i, pid in run.started if i == NON_RETRIABLE_INDEX]
    assert len(started) == 1, started  # FailIndex: never run again
    reasons = {p.reason for p in by_index[CRASHED_INDEX]}
    assert "CreateContainerConfigError" in reasons, by_index[CRASHED_INDEX]
    assert kubelet.errors == []
