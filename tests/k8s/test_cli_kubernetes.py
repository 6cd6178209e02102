"""The CLI on the kubernetes backend: ``jetreduce run … --backend kubernetes --namespace NS
--image IMG --max-parallel 50`` and ``jetreduce submit`` with the same options, as
subprocesses talking to the API emulator through a kubeconfig, with the process kubelet
running the pods. Pods run in fresh directories without the workflow's input file, so the
workflows complete only from the copy the CLI uploaded; the janitor deletes that copy with
the workflow's other objects. Also: a setup step that writes the input wins over the upload,
and a launcher refuses (the workflow fails, saying why) what it cannot run."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from harness import orchestrator, stored_events
from kmock_plus import EmulatorProcess
from kubelet import ProcessKubelet
from kubernetes import client as k8s
from nats.js.errors import NotFoundError

from jetreduce.cli.submit import submit
from jetreduce.cli.upload import upload_input
from jetreduce.cli.watch import Watcher
from jetreduce.contract import events as ev
from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.objects import input_upload_object
from jetreduce.contract.subjects import Subjects
from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.launcher.kubernetes import KubernetesBackend, job_name
from jetreduce.launcher.local import LocalBackend
from jetreduce.runtime.connection import connect
from jetreduce.runtime.settings import NatsSettings
from jetreduce.runtime.state import StateStore
from support import wait_for

pytestmark = pytest.mark.anyio

ITEMS = 20
WORKFLOW = """
name: cli-k8s
mode: mapreduce
map:
  input: items.json
  json_path: "$.items[*]"
  agent_template:
    - shell: "echo $(( ${item.n} * 2 ))"
reduce:
  - shell: "echo ${map.successful}/${map.total}"
"""


def _items(workdir: Path, n: int) -> Path:
    path = workdir / "items.json"
    path.write_text(json.dumps({"items": [{"n": i} for i in range(n)]}))
    return path


def _kubeconfig(path: Path, url: str) -> Path:
    """A kubeconfig for the emulator: what the CLI's launcher loads outside a cluster."""
    path.write_text(
        json.dumps(  # JSON is YAML
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emu", "cluster": {"server": url}}],
                "users": [{"name": "emu", "user": {"token": "not-checked"}}],
                "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "emu"}}],
                "current-context": "emu",
            }
        )
    )
    return path


def _cli_env(kubeconfig: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETREDUCE_")}
    env["KUBECONFIG"] = str(kubeconfig)
    return env


async def _cli(
    argv: list[str], cwd: Path, env: dict[str, str], timeout_s: float
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jetreduce",
        *argv,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _object_exists(settings: NatsSettings, name: str) -> bool:
    nc = await connect(settings, name="k8s-test-objects")
    try:
        store = await nc.jetstream().object_store(Subjects(settings.prefix).objects_bucket)
        try:
            await store.get_info(name)
        except NotFoundError:
            return False
        return True
    finally:
        await nc.close()


@pytest.mark.slow
async def test_run_with_backend_kubernetes_namespace_image_and_max_parallel(
    nats_url: str,
    prefix: str,
    tmp_path: Path,
    workdir: Path,
    emulator_process: EmulatorProcess,
    process_api_client: k8s.ApiClient,
    namespace: str,
) -> None:
    _items(workdir, ITEMS)
    (workdir / "wf.yml").write_text(WORKFLOW)
    kubeconfig = _kubeconfig(tmp_path / "kubeconfig", emulator_process.url)
    (tmp_path / "pods").mkdir()
    kubelet = ProcessKubelet(
        process_api_client, namespace, tmp_path / "pods", log_dir=tmp_path / "pod-logs"
    )
    wf = f"cli-{secrets.token_hex(3)}"
    stop = asyncio.Event()
    kubelet_task = asyncio.create_task(kubelet.run(stop), name="kubelet")
    try:
        code, out, err = await _cli(
            [
                "--prefix",
                prefix,
                "run",
                "wf.yml",
                "--nats",
                nats_url,
                "--id",
                wf,
                "--data-dir",
                str(tmp_path / "data"),
                "--quiet",
                "--backend",
                "kubernetes",
                "--namespace",
                namespace,
                "--image",
                "registry.example/jr:cli",
                "--max-parallel",
                "50",
            ],
            workdir,
            _cli_env(kubeconfig),
            timeout_s=240,
        )
        logs = "\n".join(p.read_text() for p in sorted((tmp_path / "pod-logs").glob("*")))
        assert code == 0, (out, err[-3000:], logs[-3000:])
        assert f"{ITEMS}/{ITEMS}" in out, out
    finally:
        stop.set()
        await asyncio.wait_for(kubelet_task, 30)
    assert kubelet.errors == []
    assert kubelet.processes_alive() == 0
    # The Jobs ran in the namespace, with the image and min(max_parallel, items) pods.
    runs = {**kubelet.jobs, **kubelet.finished}
    map_job = runs[job_name(wf, "map")].body
    assert map_job["metadata"]["namespace"] == namespace
    assert map_job["spec"]["parallelism"] == min(50, ITEMS)
    pod = map_job["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example/jr:cli"
    assert set(runs) >= {job_name(wf, "setup"), job_name(wf, "map"), job_name(wf, "reduce")}
    # What the workflow asked for is recorded with it; no submitter path went to the pods.
    settings = NatsSettings(url=nats_url, prefix=prefix)
    nc = await connect(settings, name="k8s-test-spec")
    try:
        spec = await StateStore(nc.jetstream(), Subjects(prefix)).get_spec(wf)
    finally:
        await nc.close()
    assert spec is not None
    opts = spec.options
    assert (opts.backend, opts.namespace, opts.image) == (
        "kubernetes",
        namespace,
        "registry.example/jr:cli",
    )
    assert opts.input_upload and opts.workdir is None and opts.max_parallel == 50


@pytest.mark.slow
async def test_submit_to_another_namespace_reads_the_upload_and_the_janitor_deletes_it(
    nats_url: str,
    prefix: str,
    tmp_path: Path,
    workdir: Path,
    emulator_process: EmulatorProcess,
    process_api_client: k8s.ApiClient,
    namespace: str,
) -> None:
    items = _items(workdir, 6)
    (workdir / "wf.yml").write_text(WORKFLOW)
    kubeconfig = _kubeconfig(tmp_path / "kubeconfig", emulator_process.url)
    other = f"{namespace}-b"
    settings = NatsSettings(url=nats_url, prefix=prefix)
    backend = KubernetesBackend(
        settings,
        KubernetesSettings(namespace=namespace, workflow_namespaces=(other,), poll_interval_s=0.2),
        api_client=process_api_client,
    )
    (tmp_path / "pods").mkdir()
    kubelet = ProcessKubelet(
        process_api_client, other, tmp_path / "pods", log_dir=tmp_path / "pod-logs"
    )
    wf = f"sub-{secrets.token_hex(3)}"
    stop = asyncio.Event()
    kubelet_task = asyncio.create_task(kubelet.run(stop), name="kubelet")
    try:
        async with orchestrator(settings, backend) as ctx:
            code, out, err = await _cli(
                [
                    "--prefix",
                    prefix,
                    "submit",
                    "wf.yml",
                    "--nats",
                    nats_url,
                    "--id",
                    wf,
                    "--wait",
                    "--backend",
                    "kubernetes",
                    "--namespace",
                    other,
                    "--image",
                    "registry.example/jr:sub",
                ],
                workdir,
                _cli_env(kubeconfig),
                timeout_s=180,
            )
            logs = "\n".join(p.read_text() for p in sorted((tmp_path / "pod-logs").glob("*")))
            assert code == 0, (out, err[-3000:], logs[-3000:])
            assert "6/6" in out
            setup = await stored_events(ctx, ctx.subjects.setup("completed", wf))
            assert setup[0].input_bytes == items.stat().st_size  # the uploaded copy
            # The janitor deletes the upload with the workflow's other objects.
            upload = input_upload_object(wf)
            await wait_for(lambda: _gone(settings, upload), timeout_s=30, every_s=0.2)
            await wait_for(
                lambda: (
                    not any(
                        emulator_process.live(r, other)
                        for r in ("batch/v1/jobs", "v1/configmaps", "v1/secrets")
                    )
                ),
                timeout_s=30,
            )
    finally:
        stop.set()
        await asyncio.wait_for(kubelet_task, 30)
        await backend.stop_all()
    assert kubelet.errors == []
    map_job = {**kubelet.jobs, **kubelet.finished}[job_name(wf, "map")].body
    assert map_job["metadata"]["namespace"] == other
    assert map_job["spec"]["template"]["spec"]["containers"][0]["image"] == (
        "registry.example/jr:sub"
    )
    assert emulator_process.live("batch/v1/jobs", namespace) == []


async def _gone(settings: NatsSettings, name: str) -> bool:
    return not await _object_exists(settings, name)


@pytest.mark.slow
async def test_a_setup_step_that_writes_the_input_wins_over_the_upload(
    nats_url: str,
    prefix: str,
    tmp_path: Path,
    workdir: Path,
    emulator_process: EmulatorProcess,
    process_api_client: k8s.ApiClient,
    namespace: str,
) -> None:
    workflow = WORKFLOW.replace(
        "map:",
        'setup:\n  - shell: "printf \'{\\"items\\": [{\\"n\\": 1}, {\\"n\\": 2}]}\' > items.json"\n'
        "map:",
        1,
    )
    items = _items(workdir, 5)  # uploaded, but setup's file (2 items) wins
    settings = NatsSettings(url=nats_url, prefix=prefix)
    backend = KubernetesBackend(
        settings,
        KubernetesSettings(namespace=namespace, poll_interval_s=0.2),
        api_client=process_api_client,
    )
    (tmp_path / "pods").mkdir()
    kubelet = ProcessKubelet(process_api_client, namespace, tmp_path / "pods")
    wf = f"setup-{secrets.token_hex(3)}"
    stop = asyncio.Event()
    kubelet_task = asyncio.create_task(kubelet.run(stop), name="kubelet")
    try:
        async with orchestrator(settings, backend) as ctx:
            watcher = Watcher(ctx.nc, ctx.subjects, wf, show_events=False, tty=False)
            await watcher.start()
            try:
                await upload_input(ctx.js, ctx.subjects, wf, items)
                await submit(
                    ctx.nc,
                    ctx.subjects,
                    workflow,
                    SubmitOptions(backend="kubernetes", input_upload=True),
                    workflow_id=wf,
                    source="test",
                )
                done = await watcher.until_done(120)
            finally:
                await watcher.stop()
    finally:
        stop.set()
        await asyncio.wait_for(kubelet_task, 30)
        await backend.stop_all()
    assert isinstance(done, ev.WorkflowCompleted), done
    assert (done.total, done.done) == (2, 2)


async def _refused(
    settings: NatsSettings, backend: Any, options: SubmitOptions
) -> ev.WorkflowFailed:
    wf = f"ref-{secrets.token_hex(3)}"
    async with orchestrator(settings, backend) as ctx:
        watcher = Watcher(ctx.nc, ctx.subjects, wf, show_events=False, tty=False)
        await watcher.start()
        try:
            await submit(ctx.nc, ctx.subjects, WORKFLOW, options, workflow_id=wf, source="t")
            done = await watcher.until_done(30)
        finally:
            await watcher.stop()
    assert isinstance(done, ev.WorkflowFailed), done
    return done


async def test_launchers_refuse_what_they_cannot_run(
    nats_url: str,
    prefix: str,
    emulator_process: EmulatorProcess,
    process_api_client: k8s.ApiClient,
    namespace: str,
    workdir: Path,
) -> None:
    settings = NatsSettings(url=nats_url, prefix=prefix)
    kube = KubernetesBackend(
        settings,
        KubernetesSettings(namespace=namespace, poll_interval_s=0.2),
        api_client=process_api_client,
    )
    try:
        # A local workflow (the default) is not run as pods: its workdir is not there.
        done = await _refused(settings, kube, SubmitOptions(workdir=str(workdir)))
        assert done.reason.startswith(
            "setup agents could not start: the workflow asks for the local"
        )
        assert "--backend kubernetes" in done.reason
        done = await _refused(
            settings, kube, SubmitOptions(backend="kubernetes", namespace="kube-system")
        )
        assert "namespace 'kube-system' is not one this installation may use" in done.reason
        assert emulator_process.live("batch/v1/jobs", namespace) == []  # nothing started
    finally:
        await kube.stop_all()
    # A local installation does not run a workflow that asked for pods as processes.
    local = LocalBackend(settings)
    done = await _refused(settings, local, SubmitOptions(backend="kubernetes"))
    assert done.reason.startswith(
        "setup agents could not start: the workflow asks for the kubernetes"
    )


def test_namespace_and_image_need_backend_kubernetes(tmp_path: Path) -> None:
    (tmp_path / "wf.yml").write_text(WORKFLOW)
    for cmd in ("submit", "run"):
        out = subprocess.run(
            [sys.executable, "-m", "jetreduce", cmd, "wf.yml", "--namespace", "ns"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("JETREDUCE_")},
            check=False,
        )
        assert out.returncode == 2, out
        assert "--namespace and --image need --backend kubernetes" in out.stderr
