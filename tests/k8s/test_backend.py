"""The Kubernetes backend against the API emulator over real HTTP (official client, no mocks
of our code): what ``launch`` creates, what ``stop`` removes, how failures are reported, and
that the launcher's and janitor's Roles (deploy/kustomize/components/workflow-namespace)
grant exactly the calls each makes."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml
from kmock_plus import EmulatorThread, request_verb
from kubernetes import client as k8s

from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.records import StoredSpec
from jetreduce.lang.parse import parse_workflow
from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.launcher.kubernetes import KubernetesBackend, job_name, root_name, secret_name
from jetreduce.runtime.settings import NatsSettings

pytestmark = pytest.mark.anyio

RBAC = (
    Path(__file__).resolve().parents[2]
    / "deploy"
    / "kustomize"
    / "components"
    / "workflow-namespace"
    / "rbac.yaml"
)
WORKFLOW = """
name: backend-check
mode: mapreduce
map:
  input: items.json
  max_parallel: 5
  agent_template:
    - shell: "echo ${item}"
"""
KINDS = {"jobs": "batch/v1/jobs", "configmaps": "v1/configmaps", "secrets": "v1/secrets"}


def _spec() -> StoredSpec:
    return StoredSpec(
        workflow=parse_workflow(WORKFLOW, source="t.yml").workflow, options=SubmitOptions()
    )


def _backend(
    api: k8s.ApiClient, namespace: str, max_relaunches: int = 2, **kw: Any
) -> KubernetesBackend:
    nats = NatsSettings(url="nats://127.0.0.1:4222", prefix="tp", user="u", password="s3cret")
    settings = KubernetesSettings(
        namespace=namespace,
        image="jetreduce:test",
        poll_interval_s=0.05,
        max_relaunches=max_relaunches,
    )
    return KubernetesBackend(nats, settings, api_client=api, **kw)


def _count(emu: EmulatorThread, ns: str) -> dict[str, int]:
    return {k: len(emu.live(r, ns)) for k, r in KINDS.items()}


async def test_map_launch_creates_indexed_job_configmap_and_secret(
    emulator: EmulatorThread,
    api_client: k8s.ApiClient,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The launcher's observability settings reach the pods (not its name, not credentials).
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer t0ken")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "jetreduce-launcher")
    monkeypatch.setenv("JETREDUCE_LOG_FORMAT", "json")
    backend = _backend(api_client, namespace)
    try:
        started = await backend.launch("wf-a", "map", backend.plan(5), _spec())
        assert started == 5
        assert await backend.launch("wf-a", "map", backend.plan(5), _spec()) == 0  # 409: kept
        assert backend.running("wf-a", "map")
    finally:
        await backend.stop_all()

    (root,) = emulator.live("v1/configmaps", namespace)
    (secret,) = emulator.live("v1/secrets", namespace)
    (job,) = emulator.live("batch/v1/jobs", namespace)
    assert root["metadata"]["name"] == root_name("wf-a")
    assert root["data"]["workflow-id"] == "wf-a"
    owner = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "name": root_name("wf-a"),
            "uid": root["metadata"]["uid"],
        }
    ]
    assert secret["metadata"]["ownerReferences"] == owner
    assert job["metadata"]["ownerReferences"] == owner
    assert base64.b64decode(secret["data"]["JETREDUCE_NATS_PASSWORD"]) == b"s3cret"

    assert job["metadata"]["name"] == job_name("wf-a", "map")
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 5, 5)
    assert spec["backoffLimitPerIndex"] == 3 and spec["maxFailedIndexes"] == 3
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    labels = job["metadata"]["labels"]
    assert labels["jetreduce.io/workflow"] == "wf-a"
    assert labels["app.kubernetes.io/component"] == "map"
    for key in ("name", "instance", "component", "part-of", "managed-by"):
        assert f"app.kubernetes.io/{key}" in labels
    env = {e["name"]: e for e in spec["template"]["spec"]["containers"][0]["env"]}
    assert env["JETREDUCE_WORKFLOW_ID"]["value"] == "wf-a"
    assert env["JETREDUCE_PHASE"]["value"] == "map"
    assert env["JETREDUCE_SLOTS"]["value"] == "1"
    assert env["JETREDUCE_NATS_URL"]["value"] == "nats://127.0.0.1:4222"
    assert env["JETREDUCE_PREFIX"]["value"] == "tp"
    assert env["JETREDUCE_NATS_USER"]["value"] == "u"
    assert env["JETREDUCE_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": secret_name("wf-a"),
        "key": "JETREDUCE_NATS_PASSWORD",
    }
    assert "fieldRef" in env["JOB_COMPLETION_INDEX"]["valueFrom"]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://collector:4318"
    assert env["JETREDUCE_LOG_FORMAT"]["value"] == "json"
    assert "OTEL_EXPORTER_OTLP_HEADERS" not in env and "OTEL_SERVICE_NAME" not in env


async def test_stop_deletes_one_workflow_by_label_and_leaves_others(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str
) -> None:
    backend = _backend(api_client, namespace)
    try:
        for wf in ("wf-a", "wf-b"):
            await backend.launch(wf, "setup", [1], _spec())
            await backend.launch(wf, "map", backend.plan(3), _spec())
        assert _count(emulator, namespace) == {"jobs": 4, "configmaps": 2, "secrets": 2}
        assert await backend.workflows() == {"wf-a", "wf-b"}

        await backend.stop("wf-a", "map")  # the launcher does this on map.complete
        assert {j["metadata"]["name"] for j in emulator.live("batch/v1/jobs", namespace)} == {
            job_name("wf-a", "setup"),
            job_name("wf-b", "setup"),
            job_name("wf-b", "map"),
        }
        await backend.stop("wf-a")
        await backend.stop("wf-a")  # idempotent
        assert _count(emulator, namespace) == {"jobs": 2, "configmaps": 1, "secrets": 1}
        assert await backend.workflows() == {"wf-b"}
        assert not backend.running("wf-a", "map")
    finally:
        await backend.stop_all()


async def test_installations_sharing_a_namespace_never_touch_each_others_objects(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str
) -> None:
    """Objects carry the installation (NATS prefix) label, and every list and delete selects
    it: another installation's sweep sees nothing of ours, even for the same workflow id."""
    ours = _backend(api_client, namespace)
    theirs = KubernetesBackend(
        NatsSettings(url="nats://127.0.0.1:4222", prefix="other"),
        KubernetesSettings(namespace=namespace, image="jetreduce:test", poll_interval_s=0.05),
        api_client=api_client,
    )
    try:
        await ours.launch("wf-a", "map", ours.plan(2), _spec())
        (job,) = emulator.live("batch/v1/jobs", namespace)
        assert job["metadata"]["labels"]["jetreduce.io/installation"] == "tp"
        assert await theirs.workflows() == set()
        await theirs.stop("wf-a")  # what their janitor would do with an "orphan"
        assert _count(emulator, namespace) == {"jobs": 1, "configmaps": 1, "secrets": 1}
        assert await ours.workflows() == {"wf-a"}
    finally:
        await ours.stop("wf-a")
        await ours.stop_all()
        await theirs.stop_all()


async def test_deleting_the_root_removes_the_rest_through_owner_references(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str
) -> None:
    """The owner chain is wired to the root's real uid (the emulator GCs like the real one)."""
    backend = _backend(api_client, namespace)
    try:
        await backend.launch("wf-a", "map", [1, 1], _spec())
        await backend.launch("wf-b", "map", [1], _spec())
    finally:
        await backend.stop_all()
    await _to_thread(
        k8s.CoreV1Api(api_client).delete_namespaced_config_map, root_name("wf-a"), namespace
    )
    assert _count(emulator, namespace) == {"jobs": 1, "configmaps": 1, "secrets": 1}


async def test_failed_pods_are_reported_with_exit_code_and_restart_flag(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str
) -> None:
    exits: list[tuple[str, str, int, int, bool, int, str]] = []

    async def on_exit(
        wf: str, phase: str, index: int, code: int, restart: bool, remaining: int, reason: str = ""
    ) -> None:
        exits.append((wf, phase, index, code, restart, remaining, reason))

    # No relaunch budget: a failed Job is final (test_relaunch.py covers relaunches).
    backend = _backend(api_client, namespace, max_relaunches=0, on_exit=on_exit)
    batch, core = k8s.BatchV1Api(api_client), k8s.CoreV1Api(api_client)
    try:
        await backend.launch("wf-a", "map", [1, 1], _spec())
        name = job_name("wf-a", "map")
        await _to_thread(core.create_namespaced_pod, namespace, _failed_pod(name, 1, 42))
        await _to_thread(
            batch.patch_namespaced_job_status, name, namespace, {"status": {"failed": 1}}
        )
        await backend.poll_once()
        assert exits == [("wf-a", "map", 1, 42, True, 2, "")]
        await backend.poll_once()
        assert len(exits) == 1  # reported once

        await _to_thread(core.create_namespaced_pod, namespace, _failed_pod(name, 0, 3))
        await _to_thread(
            batch.patch_namespaced_job_status,
            name,
            namespace,
            {
                "status": {
                    "failed": 2,
                    "failedIndexes": "0",
                    "conditions": [{"type": "Failed", "status": "True", "reason": "FailedIndexes"}],
                }
            },
        )
        await backend.poll_once()
        # The final exit says why the phase is given up (the aggregator's failure message).
        assert exits[1] == (
            "wf-a",
            "map",
            0,
            3,
            False,
            0,
            f"kept crashing (last exit code 3): Job {name} failed with FailedIndexes",
        )
        assert not backend.running("wf-a", "map")
    finally:
        await backend.stop_all()


def _role(name: str) -> set[tuple[str, str]]:
    return {
        (verb, res)
        for doc in yaml.safe_load_all(RBAC.read_text())
        if doc["kind"] == "Role" and doc["metadata"]["name"] == name
        for rule in doc["rules"]
        for res in rule["resources"]
        for verb in rule["verbs"]
    }


def _calls_since(emulator: EmulatorThread, mark: int) -> set[tuple[str, str]]:
    return emulator.call(
        lambda c: {request_verb(r) for r in list(c)[mark:] if r.resource is not None}
    )


async def test_each_role_grants_exactly_the_calls_of_its_service(
    emulator: EmulatorThread, api_client: k8s.ApiClient, namespace: str
) -> None:
    """Least privilege, proven both ways: every call the launcher (with its status events)
    and the janitor (sweep and stop) make is granted by its own Role, and every grant of
    each Role is used."""

    async def on_status(event: Any) -> None:
        pass

    launcher = _backend(api_client, namespace, on_status=on_status)
    janitor = _backend(api_client, namespace)
    try:
        mark = emulator.call(lambda c: len(list(c)))
        await launcher.launch("wf-a", "map", [1], _spec())
        await launcher.launch("wf-a", "map", [1], _spec())  # finds the phase's Job
        await launcher.launch("wf-a", "setup", [1], _spec())  # 409 path reads the root
        await launcher.poll_once()  # starting Jobs: their pods and the Warning events
        await _to_thread(
            k8s.BatchV1Api(api_client).patch_namespaced_job_status,
            job_name("wf-a", "map"),
            namespace,
            {"status": {"failed": 1, "active": 1, "ready": 1}},
        )
        await launcher.poll_once()  # a failed pod: the pods
        await launcher.stop("wf-a", "map")  # on map.complete
        await launcher.stop("wf-a")  # on the workflow's end
        launcher_calls = _calls_since(emulator, mark)
        launcher_calls.discard(("patch", "jobs"))  # the test's own write, as the controller

        await launcher.launch("wf-b", "map", [1], _spec())
        await launcher.stop_all()  # its poller: from here on only the janitor calls
        mark = emulator.call(lambda c: len(list(c)))
        assert await janitor.workflows() == {"wf-b"}
        await janitor.stop("wf-b")
        janitor_calls = _calls_since(emulator, mark)
    finally:
        await launcher.stop_all()
        await janitor.stop_all()
    assert launcher_calls == _role("jetreduce-launcher")
    assert janitor_calls == _role("jetreduce-janitor")
    assert _count(emulator, namespace) == {"jobs": 0, "configmaps": 0, "secrets": 0}
    assert not any(res == "secrets" and verb != "create" for verb, res in launcher_calls)


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


async def _to_thread(fn: Any, *args: Any) -> Any:
    import asyncio

    return await asyncio.to_thread(fn, *args, _preload_content=False)
