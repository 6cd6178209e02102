"""kmock 0.8's ``KubernetesEmulator`` plus the few API-server behaviours our client relies on.

kmock is an in-memory object store over HTTP that the official ``kubernetes`` client can talk
to. Out of the box it ignores label selectors, has no ``deletecollection``, never ends a watch,
and fills no server-side metadata (research/k8s-testing.md §1.2). ``Cluster`` adds, and only
adds:

1. label selectors (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``) on LIST, WATCH
   and DELETE-collection;
   and field selectors on LIST (``a.b=v``, ``==``, ``!=`` on dotted paths: ``type=Warning``,
   ``involvedObject.name=jr-x-map``);
2. DELETE on a collection (``deletecollection``), answering a ``List`` of what went;
3. ``timeoutSeconds`` on WATCH (the stream ends cleanly, as the real server's does);
4. server-filled metadata on create: ``namespace`` from the URL, ``uid``, ``resourceVersion``
   (bumped on every patch), ``creationTimestamp``, ``generation``;
5. background garbage collection through ``ownerReferences``: deleting an object deletes,
   transitively, every object that names its uid as an owner (the real GC does this
   asynchronously; here it is immediate).

6. injected failures (:class:`Fault`): a request matching a fault's method and path gets an
   API ``Status`` error (403, 404, 409, 422, 429 with ``Retry-After``, 500…) or has its
   connection dropped, ``times`` times (or for good), before anything else sees it.

7. with ``Cluster.namespaces`` set, a CREATE in a namespace not in it is refused as the real
   server refuses one in a namespace that does not exist: 404, ``namespaces "x" not found``
   (a LIST there answers an empty list, as it does for real). A set stands in for Namespace
   objects, which kmock cannot serve (its path parser has no cluster-scoped collections).

8. RBAC, with ``Cluster.rbac`` set (:func:`rbac_from` builds it from rendered Roles and
   RoleBindings): a request carrying ``Authorization: Bearer <service account>`` may make only
   the (verb, resource) calls that account's Roles grant in the request's namespace, else 403
   with the server's message. Requests without a token (the test, the process kubelet: the
   control plane) are not restricted.

And one change for long runs: ``Cluster.keep_request_log = False`` keeps only the requests in
flight in kmock's request log. kmock matches each new request to a reaction by scanning that
whole log (``request in filter``, oldest first), so with the log kept every request costs
O(requests served): the end-to-end run (thousands of polls) slowed to seconds per call.

Still not real (do not test these here): admission and defaulting, status/spec separation,
strategic-merge list merging, resourceVersion resume and 410, RBAC, TTL-after-finished.

It subclasses kmock internals (``_handle``, ``_serve_list``, ``_serve_watch``, ``_objects``,
``_lock``, ``_buses``), hence the ``kmock==0.8`` pin. :class:`EmulatorThread` hosts it on a
loopback port in a thread of its own, so blocking clients (ours runs in worker threads) and
the test's event loop never wait on each other. :class:`EmulatorProcess` hosts it in a process
of its own (``python kmock_plus.py``, request log off): for the end-to-end test, where the
process kubelet's threads and the services share the test's process, and an emulator thread
among them competed for the GIL (the API server is a process of its own in a real cluster).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import gzip
import importlib.resources
import itertools
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import aiohttp.web
import kmock
from kmock._internal import apps, enums, rendering

T = TypeVar("T")

_SPLIT = re.compile(r",(?![^()]*\))")
_SET = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def parse_selector(text: str) -> Callable[[Mapping[str, str]], bool]:
    """A predicate on labels for a Kubernetes label selector string."""
    checks: list[Callable[[Mapping[str, str]], bool]] = []
    for raw in filter(None, (p.strip() for p in _SPLIT.split(text or ""))):
        if m := _SET.match(raw):
            key, op, values = m[1], m[2], {v.strip() for v in m[3].split(",")}
            if op == "in":
                checks.append(lambda lb, k=key, vs=values: lb.get(k) in vs)
            else:
                checks.append(lambda lb, k=key, vs=values: lb.get(k) not in vs)
        elif "!=" in raw:
            key, value = (s.strip() for s in raw.split("!=", 1))
            checks.append(lambda lb, k=key, v=value: lb.get(k) != v)
        elif "=" in raw:
            key, value = (s.strip() for s in raw.replace("==", "=").split("=", 1))
            checks.append(lambda lb, k=key, v=value: lb.get(k) == v)
        elif raw.startswith("!"):
            absent = raw[1:].strip()
            checks.append(lambda lb, k=absent: k not in lb)
        else:
            checks.append(lambda lb, k=raw: k in lb)
    return lambda labels: all(check(labels) for check in checks)


def parse_field_selector(text: str) -> Callable[[Mapping[str, Any]], bool]:
    """A predicate on objects for a field selector (``metadata.name=x,type!=Normal``)."""
    checks: list[tuple[list[str], str, bool]] = []
    for raw in filter(None, (p.strip() for p in (text or "").split(","))):
        negate = "!=" in raw
        path, value = (s.strip() for s in raw.replace("==", "=").replace("!=", "=").split("=", 1))
        checks.append((path.split("."), value, negate))

    def match(obj: Mapping[str, Any]) -> bool:
        for path, value, negate in checks:
            found: Any = obj
            for part in path:
                found = found.get(part) if isinstance(found, Mapping) else None
            if (str(found if found is not None else "") == value) == negate:
                return False
        return True

    return match


def request_verb(request: rendering.Request) -> tuple[str, str]:
    """The RBAC (verb, resource plural) of a request."""
    method = str(request.method.value).upper()
    plural = request.resource.plural
    if method == "GET":
        verb = "watch" if request.params.get("watch") else "get" if request.name else "list"
    elif method == "DELETE":
        verb = "delete" if request.name else "deletecollection"
    else:
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update"}[method]
    return verb, plural


def rbac_from(docs: list[dict[str, Any]]) -> dict[str, dict[str, set[tuple[str, str]]]]:
    """What rendered Roles and RoleBindings grant: service account name → namespace →
    (verb, resource) pairs."""
    roles = {
        (d["metadata"].get("namespace", ""), d["metadata"]["name"]): {
            (verb, res)
            for rule in d["rules"]
            for res in rule["resources"]
            for verb in rule["verbs"]
        }
        for d in docs
        if d["kind"] == "Role"
    }
    granted: dict[str, dict[str, set[tuple[str, str]]]] = {}
    for binding in (d for d in docs if d["kind"] == "RoleBinding"):
        ns = binding["metadata"].get("namespace", "")
        rules = roles.get((ns, binding["roleRef"]["name"]), set())
        for subject in binding["subjects"]:
            granted.setdefault(subject["name"], {}).setdefault(ns, set()).update(rules)
    return granted


def _labels(obj: Mapping[str, Any] | None) -> Mapping[str, str]:
    return ((obj or {}).get("metadata") or {}).get("labels") or {}


@dataclasses.dataclass
class Fault:
    """An injected failure: requests whose method is ``method`` (any if None) and whose path
    contains ``path`` are answered ``status`` with ``message`` (``drop``: the connection is
    closed without an answer), ``times`` times (None: every time). ``hits`` counts them."""

    path: str
    status: int = 500
    method: str | None = None
    message: str = "injected"
    reason: str = "InternalError"
    retry_after_s: int | None = None
    drop: bool = False
    times: int | None = 1
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        return (self.method is None or self.method == method) and self.path in path


class Cluster(kmock.KubernetesEmulator):  # type: ignore[misc]
    """The emulator with label selectors, deletecollection, watch timeouts, server metadata
    and ownerReference GC (see the module docstring)."""

    namespaces: set[str] | None = None
    """The namespaces that exist; None (the default): any, so tests need not create the
    namespaces they use."""

    rbac: dict[str, dict[str, set[tuple[str, str]]]] | None = None
    """Service account → namespace → granted (verb, resource plural); None: no RBAC."""

    keep_request_log = True
    """False: kmock's request log holds only requests in flight (see the module docstring);
    the log can then not be inspected."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._inflight: set[int] = set()
        # Discovery of the built-in kinds (else LIST of a kind with no objects yet is 404);
        # load_bundled() itself uses a deprecated importlib.resources call.
        data = importlib.resources.files("kmock._internal").joinpath("resources.json.gz")
        self.resources.load_data(gzip.decompress(data.read_bytes()))
        self._versions = itertools.count(1)
        self.faults: list[Fault] = []

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        fault = next(
            (f for f in self.faults if f.matches(raw_request.method, raw_request.path)), None
        )
        if fault is None:
            return await super().__call__(raw_request)
        fault.hits += 1
        await raw_request.read()
        if fault.drop:
            if raw_request.transport is not None:
                raw_request.transport.abort()
            return aiohttp.web.Response(status=500)  # never delivered
        headers = {} if fault.retry_after_s is None else {"Retry-After": str(fault.retry_after_s)}
        return _status(fault.status, fault.reason, fault.message, **headers)

    # -- requests -------------------------------------------------------------------------
    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if self.keep_request_log:
            return await self._serve(request)
        self._inflight.add(id(request))
        self._requests[:] = [r for r in self._requests if id(r) in self._inflight]
        try:
            return await self._serve(request)
        finally:
            self._inflight.discard(id(request))

    async def _serve(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if self.rbac is not None and request.resource is not None:
            auth = {k.lower(): v for k, v in request.headers.items()}.get("authorization", "")
            account = auth.removeprefix("Bearer ").strip()
            verb, plural = request_verb(request)
            granted = self.rbac.get(account, {}).get(request.namespace or "", set())
            if account and (verb, plural) not in granted:
                return _status(
                    403,
                    "Forbidden",
                    f'{plural} is forbidden: User "system:serviceaccount:{account}" cannot '
                    f'{verb} resource "{plural}" in the namespace "{request.namespace}"',
                )
        if (
            self.namespaces is not None
            and request.action == enums.action.CREATE
            and request.namespace
            and request.namespace not in self.namespaces
        ):
            return _status(404, "NotFound", f'namespaces "{request.namespace}" not found')
        if request.resource is not None and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if request.action == enums.action.CREATE:
                meta.setdefault("namespace", request.namespace)
                meta["uid"] = str(uuid.uuid4())
                meta["creationTimestamp"] = _now()
                meta["generation"] = 1
                meta["resourceVersion"] = str(next(self._versions))
            elif request.action == enums.action.UPDATE:
                meta["resourceVersion"] = str(next(self._versions))
        if (
            request.resource is not None
            and request.method == enums.method.DELETE
            and request.name is None
        ):
            return await self._delete_collection(request)
        response = await super()._handle(request)
        if request.action == enums.action.CREATE and response.status < 300:
            await self._collect_orphan(request)
        if request.action == enums.action.DELETE and response.status < 300:
            async with self._lock:
                key = (request.resource, request.namespace, request.name)
                obj = self._objects[key] if key in self._objects else None  # noqa: SIM401 (no .get)
                uid = obj.last.raw.get("metadata", {}).get("uid") if obj is not None else None
                if uid and obj is not None and obj.deleted:
                    await self._collect_garbage({uid})
        return response

    async def _collect_orphan(self, request: rendering.Request) -> None:
        """A new object whose owners are all gone is garbage at once (as the real GC would
        find it): e.g. a pod created by a controller racing its Job's deletion."""
        refs = (request.data.get("metadata") or {}).get("ownerReferences") or []
        if not refs:
            return
        async with self._lock:
            live = {
                o.raw.get("metadata", {}).get("uid")
                for o in self._objects.values()
                if not o.deleted
            }
            if any(ref.get("uid") in live for ref in refs):
                return
            meta = request.data["metadata"]
            key = (request.resource, meta.get("namespace"), meta.get("name"))
            if key in self._objects and not self._objects[key].deleted:
                await self._delete_locked(request.resource, self._objects[key])

    async def _delete_collection(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        match = parse_selector(request.params.get("labelSelector", ""))
        gone: list[dict[str, Any]] = []
        async with self._lock:
            for (resource, namespace, _name), obj in list(self._objects.items()):
                if resource != request.resource or obj.deleted:
                    continue
                if request.namespace is not None and namespace != request.namespace:
                    continue
                if match(_labels(obj.raw)):
                    gone.append(await self._delete_locked(resource, obj))
            await self._collect_garbage({o["metadata"].get("uid") for o in gone} - {None})
        return aiohttp.web.json_response(
            {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": gone}
        )

    async def _delete_locked(self, resource: Any, obj: Any) -> dict[str, Any]:
        raw: dict[str, Any] = obj.raw
        obj.delete()
        await self._buses[resource].put({"type": "DELETED", "object": raw})
        return raw

    async def _collect_garbage(self, uids: set[str]) -> None:
        """Delete every live object owned (transitively) by one of ``uids``. Lock held."""
        while uids:
            owned: set[str] = set()
            for (resource, _ns, _name), obj in list(self._objects.items()):
                if obj.deleted:
                    continue
                refs = obj.raw.get("metadata", {}).get("ownerReferences") or []
                if any(ref.get("uid") in uids for ref in refs):
                    raw = await self._delete_locked(resource, obj)
                    owned.add(raw["metadata"].get("uid"))
            uids = owned - {None}

    # -- reads ----------------------------------------------------------------------------
    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        listed = await super()._serve_list(request)
        match = parse_selector(request.params.get("labelSelector", ""))
        fields = parse_field_selector(request.params.get("fieldSelector", ""))
        listed["items"] = [o for o in listed["items"] if match(_labels(o)) and fields(o)]
        listed["metadata"] = {"resourceVersion": str(next(self._versions))}
        return listed

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        match = parse_selector(request.params.get("labelSelector", ""))
        timeout = float(request.params.get("timeoutSeconds") or 0) or None
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        events = super()._serve_watch(request).__aiter__()
        try:
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return
                try:
                    event = await asyncio.wait_for(events.__anext__(), remaining)
                except (TimeoutError, StopAsyncIteration):
                    return
                if isinstance(event, dict) and not match(_labels(event.get("object"))):
                    continue
                yield event
        finally:
            with contextlib.suppress(Exception):
                await events.aclose()  # type: ignore[attr-defined]


def _status(code: int, reason: str, message: str, **headers: str) -> aiohttp.web.Response:
    """An API ``Status`` error answer."""
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return aiohttp.web.json_response(body, status=code, headers=headers)


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class EmulatorThread:
    """A :class:`Cluster` served on ``127.0.0.1:<free port>`` from a thread with its own event
    loop. ``url`` is what the client's ``Configuration.host`` takes; :meth:`call` runs a
    function on the emulator's loop (for consistent reads of ``cluster.objects``)."""

    def __init__(self, start_timeout_s: float = 10.0) -> None:
        self.cluster: Cluster | None = None
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="kmock", daemon=True)
        self._start_timeout_s = start_timeout_s

    def __enter__(self) -> EmulatorThread:
        self._thread.start()
        if not self._ready.wait(self._start_timeout_s):
            raise RuntimeError("the Kubernetes emulator did not start in time")
        if self._error is not None:
            raise RuntimeError("the Kubernetes emulator failed to start") from self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to __enter__
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with Cluster() as cluster, apps.Server(cluster) as server:
            self.cluster = cluster
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def call(self, fn: Callable[[Cluster], T], timeout_s: float = 10.0) -> T:
        """``fn(cluster)`` on the emulator's loop, so it never races a request."""
        assert self._loop is not None and self.cluster is not None
        cluster = self.cluster

        async def run() -> T:
            async with cluster._lock:
                return fn(cluster)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout_s)

    def live(self, resource: str, namespace: str) -> list[dict[str, Any]]:
        """Every live object of ``resource`` (``"batch/v1/jobs"``, ``"v1/configmaps"``…)."""

        def collect(cluster: Cluster) -> list[dict[str, Any]]:
            want = kmock.resource(resource)
            return [
                obj.raw
                for (res, ns, _name), obj in cluster.objects.items()
                if res == want and ns == namespace and not obj.deleted
            ]

        return self.call(collect)


def _collection_path(resource: str, namespace: str) -> str:
    """``"batch/v1/jobs"`` → ``/apis/batch/v1/namespaces/NS/jobs``; ``"v1/pods"`` → ``/api/…``."""
    parts = resource.split("/")
    root = "/api/" if len(parts) == 2 else "/apis/"
    return f"{root}{'/'.join(parts[:-1])}/namespaces/{namespace}/{parts[-1]}"


class EmulatorProcess:
    """A :class:`Cluster` served by a child process (this file run as a script) on
    ``127.0.0.1:<free port>``. The child prints its URL on its first stdout line, dies with
    its parent (``PR_SET_PDEATHSIG``) and stops on SIGTERM. Offers ``url`` and :meth:`live`
    like :class:`EmulatorThread`; its request log is out of reach (use the thread for that)."""

    def __init__(self, start_timeout_s: float = 20.0) -> None:
        self.url = ""
        self._start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> EmulatorProcess:
        from jetreduce.runtime.orphans import die_with_parent

        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            preexec_fn=die_with_parent,
        )
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], self._start_timeout_s)
        line = self._proc.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("http://"):
            self.__exit__()
            raise RuntimeError(f"the Kubernetes emulator process did not start: {line!r}")
        self.url = line
        return self

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()

    def live(self, resource: str, namespace: str) -> list[dict[str, Any]]:
        """Every live object of ``resource`` (``"batch/v1/jobs"``, ``"v1/configmaps"``…),
        read with a plain LIST."""
        url = self.url + _collection_path(resource, namespace)
        with urllib.request.urlopen(url, timeout=10) as response:
            items: list[dict[str, Any]] = json.loads(response.read())["items"]
        return items


async def _serve_until_terminated() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Cluster() as cluster, apps.Server(cluster) as server:
        cluster.keep_request_log = False
        print(str(server.url).rstrip("/"), flush=True)
        # stdout is the parent's pipe, read for that one line only: nothing may block on it.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        await stop.wait()


if __name__ == "__main__":
    # kmock keeps every request it served (its log for assertions): fine for a test's life.
    asyncio.run(_serve_until_terminated())
