"""The Kubernetes API as the ``kubernetes`` backend uses it: the official client's calls run
off the event loop, bounded, answering raw JSON; failures become
:class:`KubernetesBackendError`. The only module that imports the ``kubernetes`` client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

__all__ = ["ApiClient", "KubeApi", "KubernetesBackendError", "load_api_client"]

ApiClient = k8s.ApiClient


class KubernetesBackendError(Exception):
    """A Kubernetes API call failed for a reason retrying the same event may fix (the
    launcher's consumer redelivers it). Carries the HTTP status, never the response body."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def load_api_client() -> k8s.ApiClient:
    """In-cluster service-account credentials when running in a pod, else ``~/.kube/config``
    (or ``$KUBECONFIG``). Blocking file reads: call once at startup."""
    try:
        k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()  # type: ignore[no-untyped-call]
    return k8s.ApiClient()


class KubeApi:
    """The calls the backend makes (and only those: the RBAC test holds the Role to them)."""

    def __init__(self, api_client: k8s.ApiClient | None, request_timeout_s: float) -> None:
        self.client = api_client if api_client is not None else load_api_client()
        self.batch = k8s.BatchV1Api(self.client)
        self.core = k8s.CoreV1Api(self.client)
        self.request_timeout_s = request_timeout_s

    async def create(self, create: Callable[..., Any], body: dict[str, Any]) -> Any:
        """Create in the body's namespace; None if it already exists (409)."""
        try:
            return await self.call(create, body["metadata"]["namespace"], body)
        except KubernetesBackendError as exc:
            if exc.status == 409:
                return None
            raise

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one API call off the event loop with a bounded timeout; the raw JSON answer
        (no model round trip). 404 on a delete counts as done."""

        def call() -> Any:
            response = fn(
                *args,
                _preload_content=False,
                _request_timeout=self.request_timeout_s,
                **kwargs,
            )
            data = response.data
            return json.loads(data) if data else {}

        try:
            return await asyncio.to_thread(call)
        except ApiException as exc:
            if exc.status == 404 and fn.__name__.startswith("delete"):
                return {}
            raise KubernetesBackendError(
                f"kubernetes {fn.__name__}: {exc.status} {exc.reason}", exc.status
            ) from None
        except Exception as exc:  # urllib3 / connection errors
            raise KubernetesBackendError(f"kubernetes {fn.__name__}: {exc}") from None
