"""The shipped Roles enforced by the emulator, per namespace, from the rendered manifests:
the launcher and the janitor, each with its own account's token, go through their whole
cycle without a single 403; what a Role does not grant (the janitor creating, anything in a
namespace without the Roles) is refused by the server, and fails or is skipped with the API's
message."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from harness import map_only_spec
from kmock_plus import EmulatorThread, rbac_from
from kubernetes import client as k8s

from jetreduce.contract.events import SubmitOptions
from jetreduce.contract.records import StoredSpec
from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.launcher.kubernetes import KubernetesBackend, job_name
from jetreduce.runtime.settings import NatsSettings
from kustomize import render

pytestmark = pytest.mark.anyio

Exit = tuple[str, str, int, int, bool, int, str]


@pytest.fixture
def enforced(emulator: EmulatorThread, namespace: str) -> Iterator[EmulatorThread]:
    """The base's RBAC, its `jetreduce` namespace mapped to the test's."""
    granted = rbac_from(render("base"))
    assert emulator.cluster is not None
    emulator.cluster.rbac = {
        account: {namespace if ns == "jetreduce" else ns: rules for ns, rules in by_ns.items()}
        for account, by_ns in granted.items()
    }
    yield emulator


def _client(emulator: EmulatorThread, account: str) -> k8s.ApiClient:
    config = k8s.Configuration(host=emulator.url)
    config.api_key = {"authorization": account}
    config.api_key_prefix = {"authorization": "Bearer"}
    return k8s.ApiClient(config)


def _backend(
    emulator: EmulatorThread, account: str, namespace: str, exits: list[Exit], **kw: Any
) -> KubernetesBackend:
    async def on_exit(*args: Any) -> None:
        exits.append(args)  # type: ignore[arg-type]

    async def on_status(event: Any) -> None:
        pass

    settings = KubernetesSettings(
        namespace=namespace, image="jetreduce:test", poll_interval_s=3600, **kw
    )
    backend = KubernetesBackend(
        NatsSettings(url="nats://127.0.0.1:1", prefix="rb", user="u", password="pw"),
        settings,
        api_client=_client(emulator, account),
        on_exit=on_exit,
        on_status=on_status if account == "jetreduce-launcher" else None,
    )
    backend.kube.backoff_s = 0.01
    return backend


async def test_each_service_does_its_whole_cycle_under_its_own_role(
    enforced: EmulatorThread, namespace: str
) -> None:
    exits: list[Exit] = []
    launcher = _backend(enforced, "jetreduce-launcher", namespace, exits)
    janitor = _backend(enforced, "jetreduce-janitor", namespace, exits)
    try:
        assert await launcher.launch("wf-r", "map", [1, 1], map_only_spec()) == 2
        assert await launcher.launch("wf-r", "setup", [1], map_only_spec()) == 1
        await launcher.poll_once()
        await launcher.stop("wf-r", "map")
        assert {j["metadata"]["name"] for j in enforced.live("batch/v1/jobs", namespace)} == {
            job_name("wf-r", "setup")
        }
        assert await janitor.workflows() == {"wf-r"}
        await janitor.stop("wf-r")
        assert enforced.live("batch/v1/jobs", namespace) == []
        assert enforced.live("v1/configmaps", namespace) == []
        # Not the janitor's to do: refused by the server, and it says so.
        assert await janitor.launch("wf-j", "map", [1], map_only_spec()) == 0
    finally:
        await launcher.stop_all()
        await janitor.stop_all()
    (refused,) = exits
    assert refused[0] == "wf-j" and "403 Forbidden" in refused[6], refused
    assert 'system:serviceaccount:jetreduce-janitor" cannot create resource' in refused[6]


async def test_a_namespace_without_the_roles_is_refused_by_the_server(
    enforced: EmulatorThread, namespace: str
) -> None:
    other = f"{namespace}-x"
    exits: list[Exit] = []
    launcher = _backend(
        enforced, "jetreduce-launcher", namespace, exits, workflow_namespaces=(other,)
    )
    try:
        assert await launcher.launch("wf-a", "map", [1], map_only_spec()) == 1
        await launcher.poll_once()  # the other namespace's 403 is skipped, not raised
        await launcher.sync()
        assert launcher.running("wf-a", "map")
        spec = StoredSpec(
            workflow=map_only_spec().workflow,
            options=SubmitOptions(backend="kubernetes", namespace=other),
        )
        assert await launcher.launch("wf-b", "map", [1], spec) == 0
        await launcher.stop("wf-a")
    finally:
        await launcher.stop_all()
    (refused,) = exits
    assert refused[0] == "wf-b" and f'in the namespace "{other}"' in refused[6], refused
