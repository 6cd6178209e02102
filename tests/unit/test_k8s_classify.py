"""How a failed Kubernetes API call is classified (launcher/k8s_api.py): what is retried,
what fails the workflow at once, and what the caller decides."""

from __future__ import annotations

import json

from kubernetes.client.exceptions import ApiException

from jetreduce.launcher.k8s_api import PermanentApiError, TransientApiError, classify


def api_error(status: int, message: str) -> ApiException:
    exc = ApiException(status=status, reason="x")
    exc.body = json.dumps({"kind": "Status", "message": message})
    return exc


def test_a_conflict_is_neither_retried_nor_permanent() -> None:
    """An object that exists (every phase re-creates the root ConfigMap) is the caller's to
    accept at once: retrying it only delayed each launch by seconds."""
    error = classify("create_namespaced_config_map", api_error(409, "already exists"))
    assert error.status == 409
    assert not isinstance(error, TransientApiError | PermanentApiError)


def test_an_exceeded_quota_is_retried_other_refusals_are_permanent() -> None:
    quota = classify("create_namespaced_job", api_error(403, 'exceeded quota: "jobs"'))
    assert isinstance(quota, TransientApiError)
    forbidden = classify("create_namespaced_job", api_error(403, "cannot create jobs"))
    assert isinstance(forbidden, PermanentApiError)
