"""The installation's agent settings file (``agents.yaml`` of the ``jetreduce-agents``
ConfigMap): every key reaches the Job the launcher builds, bad input is refused with the key
named, and the agents' NATS identity is the installation's choice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer
import yaml
from harness import map_only_spec
from kubernetes import client as k8s

from jetreduce.cli.k8s_settings import kubernetes_settings
from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.records import StoredSpec
from jetreduce.launcher.k8s_settings import FILE_KEYS, SettingsFileError, from_file_data
from jetreduce.launcher.kubernetes import KubernetesBackend, agent_nats_env, build_map_job
from jetreduce.runtime.settings import NatsSettings

DOCS = Path(__file__).resolve().parents[2] / "docs" / "kubernetes.md"

FULL = """
serviceAccountName: batch-agents
imagePullPolicy: Always
imagePullSecrets: [regcred, {name: mirror}]
priorityClassName: jetreduce-low
resources:
  requests: {cpu: "1", memory: 1Gi, ephemeral-storage: 2Gi}
  limits: {memory: 2Gi, ephemeral-storage: 8Gi}
workdirSizeLimit: 6Gi
tmpSizeLimit: 1Gi
nodeSelector: {pool: agents}
tolerations: [{key: spot, operator: Exists, effect: NoSchedule}]
affinity:
  nodeAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      nodeSelectorTerms: [{matchExpressions: [{key: arch, operator: In, values: [amd64]}]}]
topologySpreadConstraints:
  - {maxSkew: 1, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: ScheduleAnyway,
     labelSelector: {matchLabels: {app.kubernetes.io/name: jetreduce-agent}}}
labels: {team: data}
annotations: {sidecar.istio.io/inject: "false"}
slotsPerPod: 2
backoffLimitPerIndex: 2
nats:
  url: nats://nats.nats.svc:4222
  filesSecret: agent-nats-files
  filesMount: /nats
  credentialsSecret: agent-nats
  env: {JETREDUCE_NATS_CREDS: /nats/agent.creds}
"""


def _job(text: str) -> dict[str, Any]:
    settings = from_file_data(yaml.safe_load(text))
    nats = NatsSettings(url="nats://internal:4222", creds="/launcher.creds", password="pw")
    env = agent_nats_env(nats, settings, {})
    return build_map_job("wf-1", agents=4, slots=2, settings=settings, nats_env=env)


def test_every_key_of_the_file_reaches_the_job() -> None:
    job = _job(FULL)
    for version in ("1.31.0", "1.37.0"):
        kubernetes_validate.validate(job, version, strict=True)
    pod = job["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    assert pod["serviceAccountName"] == "batch-agents"
    assert agent["imagePullPolicy"] == "Always"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
    assert pod["priorityClassName"] == "jetreduce-low"
    assert agent["resources"] == {
        "requests": {"cpu": "1", "memory": "1Gi", "ephemeral-storage": "2Gi"},
        "limits": {"memory": "2Gi", "ephemeral-storage": "8Gi"},
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["work"]["emptyDir"] == {"sizeLimit": "6Gi"}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "1Gi"}
    assert volumes["nats-files"]["secret"] == {"secretName": "agent-nats-files"}
    assert pod["nodeSelector"] == {"pool": "agents"}
    assert pod["tolerations"][0]["key"] == "spot"
    assert "nodeAffinity" in pod["affinity"]
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    for meta in (job["metadata"], job["spec"]["template"]["metadata"]):
        assert meta["labels"]["team"] == "data"
        assert meta["annotations"]["sidecar.istio.io/inject"] == "false"
    assert job["spec"]["backoffLimitPerIndex"] == 2
    # NATS: the agents' own URL, identity (envFrom) and files; none of the launcher's.
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert env["JETREDUCE_NATS_URL"] == "nats://nats.nats.svc:4222"
    assert env["JETREDUCE_NATS_CREDS"] == "/nats/agent.creds"
    assert "JETREDUCE_NATS_PASSWORD" not in env
    assert agent["envFrom"] == [{"secretRef": {"name": "agent-nats"}}]
    assert {"name": "nats-files", "mountPath": "/nats", "readOnly": True} in agent["volumeMounts"]


def test_without_agent_credentials_the_launchers_travel_as_before() -> None:
    """No ``credentialsSecret``: agents use the launcher's identity (its password through
    the workflow's Secret, never plain env; its file paths as plain env)."""
    job = _job("nats: {url: nats://n:4222}")
    env = {
        e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["JETREDUCE_NATS_CREDS"] == "/launcher.creds"
    assert "JETREDUCE_NATS_PASSWORD" not in env
    assert "envFrom" not in job["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("nodeselector: {a: b}", "nodeselector: unknown key"),
        ("resources: {requests: {cpu: lots}}", "resources: must be a Kubernetes quantity"),
        ("resources: {requests: {gpu: 1}}", "resources: must be requests: only"),
        ("nodeSelector: {zone: 1}", "nodeSelector: must be a mapping of strings"),
        ("tolerations: {key: x}", "tolerations: must be a list of mappings"),
        ("imagePullPolicy: Sometimes", "imagePullPolicy: must be one of"),
        ("slotsPerPod: 1.5", "slotsPerPod: must be a whole number"),
        ("slotsPerPod: 0", "slots_per_pod must be >= 1"),
        ("nats: {passwd: x}", "nats.passwd: unknown key"),
        ("nats: {env: {JETREDUCE_NATS_PASSWORD: x}}", "credentialsSecret"),
        ("image: other:1", "image: unknown key"),
    ],
)
def test_bad_input_is_refused_naming_the_key(text: str, named: str) -> None:
    with pytest.raises(SettingsFileError, match=named.replace("(", r"\(")):
        from_file_data(yaml.safe_load(text))


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(SettingsFileError) as refused:
        from_file_data({"nodeselector": {}, "tmpSizeLimit": "big"})
    assert "nodeselector" in str(refused.value) and "tmpSizeLimit" in str(refused.value)


def test_the_cli_reads_the_file_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "agents.yaml"
    path.write_text("priorityClassName: low\n")
    monkeypatch.setenv("JETREDUCE_K8S_SETTINGS", str(path))
    settings = kubernetes_settings("jobs", "img:1", [""])
    assert settings.priority_class_name == "low"
    assert (settings.namespace, settings.image, settings.workflow_namespaces) == (
        "jobs",
        "img:1",
        (),
    )
    path.write_text("priorityclassname: low\n")
    with pytest.raises(typer.Exit) as stopped:
        kubernetes_settings(None, None, [])
    assert stopped.value.exit_code == 2
    assert f"{path}: priorityclassname: unknown key" in capsys.readouterr().err


def test_every_key_is_documented() -> None:
    text = DOCS.read_text()
    keys = [
        *FILE_KEYS,
        *(f"nats.{k}" for k in ("url", "filesSecret", "filesMount", "credentialsSecret", "env")),
    ]
    assert [k for k in keys if f"`{k}`" not in text] == []


@pytest.mark.parametrize(
    ("allowed", "image", "refused"),
    [
        (None, "anything:1", False),  # the default: any image
        ([], "anything:1", True),  # none: the installation's image only
        ([], None, False),
        (["registry.example/team/*", "jetreduce:2.0.0"], "registry.example/team/x:1", False),
        (["registry.example/team/*", "jetreduce:2.0.0"], "jetreduce:2.0.0", False),
        (["registry.example/team/*"], "docker.io/evil:latest", True),
    ],
)
def test_a_workflows_own_image_only_where_the_installation_allows_it(
    allowed: list[str] | None, image: str | None, refused: bool
) -> None:
    settings = from_file_data({"workflowImages": allowed})
    backend = KubernetesBackend(
        NatsSettings(url="nats://127.0.0.1:1"), settings, api_client=k8s.ApiClient()
    )
    spec = StoredSpec(
        workflow=map_only_spec().workflow,
        options=SubmitOptions(backend="kubernetes", image=image),
    )
    reason = backend.refusal(spec)
    assert (reason is not None) == refused, reason
    if refused:
        assert f"image {image!r} is not one this installation lets workflows choose" in reason
