"""Schema gate: every object the launcher builds and every rendered kustomize overlay must
validate against the Kubernetes OpenAPI schemas in strict mode (unknown fields fail), for the
oldest and newest Kubernetes versions we support.

Versions: 1.31 is the minimum (Job ``podFailurePolicy`` is GA there and
``backoffLimitPerIndex``/``maxFailedIndexes`` are beta and on by default since 1.29; 1.30 and
older are out of upstream support). 1.37 is the newest schema ``kubernetes-validate`` ships.
The schema check is structural; the semantic rules it cannot see are asserted separately.
"""

from __future__ import annotations

import re
from typing import Any

import kubernetes_validate
import pytest
import yaml

from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.records import StoredSpec
from jetreduce.lang.parse import parse_workflow
from jetreduce.launcher.k8s_settings import KubernetesSettings, Resources
from jetreduce.launcher.kubernetes import (
    build_map_job,
    build_phase_job,
    build_root_configmap,
    build_secret,
    phase_timeout_s,
)
from kustomize import KUSTOMIZE
from kustomize import render as _render

VERSIONS = ("1.31.0", "1.37.0")
TARGETS = ("base", "overlays/dev", "overlays/prod")

WORKFLOW = """
name: schema-check
mode: mapreduce
setup:
  timeout: 60
  commands:
    - shell: "echo setup"
map:
  input: items.json
  json_path: "$.items[*]"
  max_parallel: 7
  agent_template:
    - shell: "echo ${item}"
reduce:
  - shell: "echo done"
"""

FULL = KubernetesSettings(
    namespace="jr",
    image="registry.example/jetreduce@sha256:" + "a" * 64,
    resources=Resources(cpu_request="1", memory_request="1Gi", cpu_limit="2", memory_limit="2Gi"),
    image_pull_secrets=("regcred",),
    node_selector={"pool": "agents"},
    tolerations=({"key": "spot", "operator": "Exists", "effect": "NoSchedule"},),
    nats_files_secret="nats-creds",
    labels={"team": "data"},
)


def _spec() -> StoredSpec:
    result = parse_workflow(WORKFLOW, source="schema-check.yml")
    return StoredSpec(workflow=result.workflow, options=SubmitOptions())


def _built(settings: KubernetesSettings) -> list[dict[str, Any]]:
    wf = "Schema_Check-2026-with-a-rather-long-id-that-needs-hashing"
    owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": "jr-x", "uid": "u-1"}
    env = {"JETREDUCE_NATS_URL": "nats://nats:4222", "JETREDUCE_PREFIX": "t1"}
    return [
        build_root_configmap(wf, _spec(), settings),
        build_secret(wf, {"JETREDUCE_NATS_PASSWORD": "pw"}, settings, owner),
        build_map_job(
            wf,
            agents=50,
            slots=1,
            settings=settings,
            nats_env=env,
            secret_keys=["JETREDUCE_NATS_PASSWORD"],
            owner=owner,
        ),
        build_phase_job(wf, "setup", settings=settings, nats_env=env, timeout_s=60, owner=owner),
        build_phase_job(wf, "reduce", settings=settings, nats_env=env, owner=owner),
        # The last relaunch the settings allow, of the phase with the longest name.
        build_phase_job(wf, "reduce", settings=settings, nats_env=env, owner=owner, attempt=8),
    ]


def _validate(obj: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{obj['kind']} {obj['metadata'].get('name')} invalid for {version}: {exc}")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("settings", [KubernetesSettings(), FULL], ids=["defaults", "full"])
def test_built_objects_validate_strictly(version: str, settings: KubernetesSettings) -> None:
    for obj in _built(settings):
        _validate(obj, version)


def test_strict_validation_catches_a_typo() -> None:
    """The gate has teeth: one misspelt nested field fails."""
    job = _built(KubernetesSettings())[2]
    job["spec"]["template"]["spec"]["restartPolicyy"] = "Never"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, VERSIONS[0], strict=True)


def test_semantic_rules_the_schema_cannot_see() -> None:
    for job in _built(FULL)[2:]:
        spec = job["spec"]
        pod = spec["template"]["spec"]
        assert spec["completionMode"] == "Indexed"
        assert spec["completions"] == spec["parallelism"] >= 1
        assert pod["restartPolicy"] == "Never"  # required by podFailurePolicy
        assert 1 <= spec["maxFailedIndexes"] <= spec["completions"]
        assert len(job["metadata"]["name"]) <= 52  # pod names append -<index>-<5>
        for value in job["metadata"]["labels"].values():
            assert len(value) <= 63
        rules = spec["podFailurePolicy"]["rules"]
        assert rules == [
            {
                "action": "Ignore",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            },
            {
                "action": "FailIndex",
                "onExitCodes": {"containerName": "agent", "operator": "In", "values": [2]},
            },
        ]
        # Never a finite backoffLimit: the controller checks it before the per-index rules.
        assert "backoffLimit" not in spec
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
            "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        )
    setup = _built(FULL)[3]
    assert setup["spec"]["activeDeadlineSeconds"] == 60 + FULL.deadline_margin_s
    assert "activeDeadlineSeconds" not in _built(FULL)[2]["spec"]


def test_secrets_never_reach_plain_env_or_configmaps() -> None:
    objs = _built(FULL)
    text = yaml.safe_dump([o for o in objs if o["kind"] != "Secret"])
    assert "pw" not in text.split()  # the password value
    job = objs[2]
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "value" not in env["JETREDUCE_NATS_PASSWORD"]
    assert env["JETREDUCE_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == (
        "JETREDUCE_NATS_PASSWORD"
    )


@pytest.mark.parametrize("target", TARGETS)
def test_kustomize_renders_and_validates(target: str) -> None:
    docs = _render(target)
    assert docs
    for version in VERSIONS:
        for doc in docs:
            _validate(doc, version)
    namespaces = [d for d in docs if d["kind"] == "Namespace"]
    assert [n["metadata"]["name"] for n in namespaces] == ["jetreduce"]
    labels = namespaces[0]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "jetreduce"  # all namespaced
        if doc["kind"] in ("Deployment", "StatefulSet"):
            pod = doc["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True
                assert sc["allowPrivilegeEscalation"] is False
                assert sc["capabilities"]["drop"] == ["ALL"]
                assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]


def test_overlays_differ_where_they_must() -> None:
    dev = {(d["kind"], d["metadata"]["name"]): d for d in _render("overlays/dev")}
    prod = {(d["kind"], d["metadata"]["name"]): d for d in _render("overlays/prod")}
    assert ("StatefulSet", "nats") in dev and ("StatefulSet", "nats") not in prod
    assert {k for k in prod if k[0] == "PodDisruptionBudget"} == {
        ("PodDisruptionBudget", f"jetreduce-{s}")
        for s in ("planner", "launcher", "aggregator", "janitor")
    }
    settings = next(
        d for k, d in prod.items() if k[0] == "ConfigMap" and k[1].startswith("jetreduce-settings")
    )
    assert settings["data"]["stream-replicas"] == "3"
    assert all(d["spec"]["replicas"] == 2 for k, d in prod.items() if k[0] == "Deployment")


@pytest.mark.parametrize(
    ("timeout_s", "phase", "expected"),
    [
        (None, "map", None),  # no budget stated: no deadline
        (600.0, "map", 600.0),  # the workflow's budget bounds the map phase
        (600.0, "reduce", 600.0),
        (None, "setup", 60.0),  # setup's own timeout
        (30.0, "setup", 30.0),  # the smaller of the two
        (600.0, "setup", 60.0),
    ],
)
def test_every_phase_job_gets_the_deadline_of_its_time_budget(
    timeout_s: float | None, phase: str, expected: float | None
) -> None:
    spec = _spec()
    spec = StoredSpec(workflow=spec.workflow, options=SubmitOptions(timeout_s=timeout_s))
    assert phase_timeout_s(spec, phase) == expected
    job = build_phase_job(
        "wf", phase, settings=FULL, nats_env={}, timeout_s=phase_timeout_s(spec, phase)
    )
    deadline = job["spec"].get("activeDeadlineSeconds")
    assert deadline == (None if expected is None else expected + FULL.deadline_margin_s)


def test_an_extra_workflow_namespace_gets_the_roles_bound_to_the_installations_accounts() -> None:
    docs = _render("examples/workflow-namespace")
    for version in VERSIONS:
        for doc in docs:
            _validate(doc, version)
    kinds = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert set(kinds) == {
        ("Namespace", "team-a"),
        ("ServiceAccount", "jetreduce-agent"),
        ("Role", "jetreduce-launcher"),
        ("Role", "jetreduce-janitor"),
        ("RoleBinding", "jetreduce-launcher"),
        ("RoleBinding", "jetreduce-janitor"),
        ("NetworkPolicy", "jetreduce-agents"),
    }
    assert (
        kinds[("Namespace", "team-a")]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
        == "restricted"
    )
    for name in ("jetreduce-launcher", "jetreduce-janitor"):
        binding = kinds[("RoleBinding", name)]
        assert binding["metadata"]["namespace"] == "team-a"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": name, "namespace": "jetreduce"}
        ]
    # The same Roles as in the installation's own namespace: one definition.
    base = {(d["kind"], d["metadata"]["name"]): d for d in _render("base")}
    for key in (("Role", "jetreduce-launcher"), ("Role", "jetreduce-janitor")):
        assert kinds[key]["rules"] == base[key]["rules"]


_EXACT_TAG = re.compile(r":\d+\.\d+\.\d+(-[a-z0-9.]+)?(@sha256:[0-9a-f]{64})?$")


def test_prod_and_nats_images_are_pinned() -> None:
    """No mutable tag where it matters: every prod image, and NATS in dev, names an exact
    release (``X.Y.Z``, optionally with a digest); the dev overlay's own image is a local
    build (``jetreduce:dev``, loaded into kind)."""
    for target in ("overlays/prod", "overlays/dev"):
        for doc in _render(target):
            if doc["kind"] not in ("Deployment", "StatefulSet"):
                continue
            for c in doc["spec"]["template"]["spec"]["containers"]:
                if target == "overlays/dev" and c["image"] == "jetreduce:dev":
                    continue
                assert _EXACT_TAG.search(c["image"]), (target, c["image"])
    values = yaml.safe_load((KUSTOMIZE / "overlays/prod/nats-values.yaml").read_text())
    assert re.fullmatch(r"\d+\.\d+\.\d+-alpine", values["container"]["image"]["tag"])
