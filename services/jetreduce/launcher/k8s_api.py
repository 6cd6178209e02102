"""The Kubernetes API as the ``kubernetes`` backend uses it: the official client's calls run
off the event loop, bounded, answering raw JSON. The only module that imports the
``kubernetes`` client.

Errors are translated here, by what retrying can do about them::

    KubernetesBackendError            any failed call (HTTP status, the API's message)
     ├── PermanentApiError            400, 401, 403, 404, 405, 422: the same call fails again
     │                                (no Role for it, no such namespace, an invalid object)
     └── TransientApiError            429 (honouring Retry-After), 5xx, timeouts, dropped
                                      connections: retried here with jittered backoff first

A permanent error fails the workflow at once with the API's message (the backend's callers
decide how); a transient one is retried ``retries`` times, then raised for the caller's own
retry (the poller's next interval, the launcher's redelivery).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Callable
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from jetreduce.contract.errors import JetreduceError, PermanentError, TemporaryError

__all__ = [
    "ApiClient",
    "ConflictApiError",
    "KubeApi",
    "KubernetesBackendError",
    "PermanentApiError",
    "TransientApiError",
    "load_api_client",
]

log = logging.getLogger(__name__)

ApiClient = k8s.ApiClient

PERMANENT_STATUSES = frozenset({400, 401, 403, 404, 405, 422})
MESSAGE_LIMIT = 300
"""Characters of the API's message kept (its Status messages name objects, never data)."""
RETRY_AFTER_CAP_S = 30.0
"""A ``Retry-After`` beyond this is clipped: the caller's own retry takes over after it."""


class KubernetesBackendError(JetreduceError):
    """A Kubernetes API call failed: the family; what is raised is one of its kinds below.
    ``status``: the HTTP status (None without a response); the message is the call, the
    status and the API's own message (the Status object's ``message``, never the rest of
    the body)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class PermanentApiError(KubernetesBackendError, PermanentError):
    """The same call would fail again: a missing Role or namespace, an invalid object."""


class ConflictApiError(KubernetesBackendError, PermanentError):
    """409: the object exists, or a precondition was lost. Retrying the same call cannot
    help; the caller decides what it means (a create takes the existing object)."""


class TransientApiError(KubernetesBackendError, TemporaryError):
    """Worth retrying: throttled, the server failing, or the connection."""

    def __init__(
        self, message: str, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, status)
        self.retry_after_s = retry_after_s


def load_api_client() -> k8s.ApiClient:
    """In-cluster service-account credentials when running in a pod, else ``~/.kube/config``
    (or ``$KUBECONFIG``). Blocking file reads: call once at startup."""
    try:
        k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()  # type: ignore[no-untyped-call]
    return k8s.ApiClient()


def classify(name: str, exc: Exception) -> KubernetesBackendError:
    """The error class for a failed call ``name``, with the API's message."""
    if not isinstance(exc, ApiException):  # urllib3: timeouts, refused or dropped connections
        return TransientApiError(f"kubernetes {name}: {type(exc).__name__}: {exc}"[:MESSAGE_LIMIT])
    status = int(exc.status or 0)
    detail = ""
    with contextlib.suppress(ValueError, AttributeError):  # not a Status object
        detail = str(json.loads(exc.body or "{}").get("message") or "")
    text = f"kubernetes {name}: {status} {exc.reason}" + (f": {detail}" if detail else "")
    text = text[:MESSAGE_LIMIT]
    if status == 409:  # exists, or a precondition lost: the caller decides, no retry helps
        return ConflictApiError(text, status)
    if status == 403 and "exceeded quota" in detail:  # capacity that may clear, as in the poller
        return TransientApiError(text, status, None)
    if status in PERMANENT_STATUSES:
        return PermanentApiError(text, status)
    retry_after: float | None = None
    if status == 429:
        try:
            retry_after = float((exc.headers or {}).get("Retry-After") or 1)
        except ValueError:
            retry_after = 1.0
    return TransientApiError(text, status, retry_after)


class KubeApi:
    """The calls the backend makes (and only those: the RBAC test holds the Role to them)."""

    def __init__(
        self,
        api_client: k8s.ApiClient | None,
        request_timeout_s: float,
        *,
        retries: int = 3,
        backoff_s: float = 0.5,
        backoff_cap_s: float = 8.0,
    ) -> None:
        """``retries``: extra attempts of a call after a transient error, each after a
        random delay of up to ``backoff_s * 2**n`` (capped; "full jitter", so that many
        launchers throttled at once do not come back at once), or after ``Retry-After``."""
        self.client = api_client if api_client is not None else load_api_client()
        self.batch = k8s.BatchV1Api(self.client)
        self.core = k8s.CoreV1Api(self.client)
        self.request_timeout_s = request_timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.backoff_cap_s = backoff_cap_s

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
        (no model round trip). 404 on a delete counts as done. Transient errors are
        retried (see :meth:`__init__`); the last one, or a permanent one, is raised."""

        def call() -> Any:
            response = fn(
                *args,
                _preload_content=False,
                _request_timeout=self.request_timeout_s,
                **kwargs,
            )
            data = response.data
            return json.loads(data) if data else {}

        attempt = 0
        while True:
            try:
                return await asyncio.to_thread(call)
            except Exception as exc:
                if (
                    isinstance(exc, ApiException)
                    and exc.status == 404
                    and (fn.__name__.startswith("delete"))
                ):
                    return {}
                error = classify(fn.__name__, exc)
            if isinstance(error, TransientApiError) and attempt < self.retries:
                delay = random.uniform(0, min(self.backoff_cap_s, self.backoff_s * 2**attempt))
                if error.retry_after_s is not None:
                    delay = min(error.retry_after_s, RETRY_AFTER_CAP_S)
                log.info("%s; retrying in %.2fs", error, delay)
                attempt += 1
                await asyncio.sleep(delay)
                continue
            raise error from None
