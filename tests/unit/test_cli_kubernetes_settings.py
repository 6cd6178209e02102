"""The Kubernetes settings a service or ``run`` builds from its command line: extra workflow
namespaces (flag or variable), checked before anything connects."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from jetreduce.cli.app import app
from jetreduce.cli.k8s_settings import kubernetes_settings


def test_workflow_namespaces_join_the_installations_own() -> None:
    k8s = kubernetes_settings("jobs", "img:1", ["team-a", "team-b", "team-a"])
    assert k8s.namespace == "jobs" and k8s.image == "img:1"
    assert k8s.workflow_namespaces == ("team-a", "team-b")
    assert k8s.namespaces == ("jobs", "team-a", "team-b")


def test_a_bad_namespace_name_is_a_usage_error() -> None:
    with pytest.raises(typer.Exit) as stopped:
        kubernetes_settings(None, None, ["Team_A"])
    assert stopped.value.exit_code == 2


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--workflow-namespace", "ok", "--workflow-namespace", "Not_OK"], {}),
        ([], {"JETREDUCE_K8S_WORKFLOW_NAMESPACES": "ok Not_OK"}),
    ],
)
def test_services_up_reads_workflow_namespaces_from_flag_or_variable(
    args: list[str], env: dict[str, str]
) -> None:
    result = CliRunner().invoke(
        app,
        ["services", "up", "--backend", "kubernetes", "--nats", "nats://127.0.0.1:1", *args],
        env=env,
    )
    assert result.exit_code == 2
    assert "'Not_OK' is not a Kubernetes namespace name" in result.output
