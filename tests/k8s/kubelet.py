"""A test-side "process kubelet": the Job controller, the kubelet and the pod garbage collector
for Indexed Jobs, with every pod a local process.

It talks to the API server (the emulator) over HTTP with the official client, like the real
controllers do: it lists Jobs, creates a Pod object per attempt (labels, completion-index
annotation, ownerReference to the Job), resolves the container's env the way the kubelet
would (``value``, ``fieldRef`` on annotations, ``secretKeyRef`` read from the Secret), runs the
container's ``command`` as a subprocess (``jetreduce …`` → ``python -m jetreduce …``), and
writes pod and Job status back (``active``/``succeeded``/``failed``, ``completedIndexes``,
``failedIndexes``, ``Complete``/``Failed`` conditions).

Job semantics kept: ``parallelism``, ``completions``, ``backoffLimitPerIndex``,
``maxFailedIndexes``, ``activeDeadlineSeconds``; ``backoffLimit`` with the server's default
(MaxInt32 when ``backoffLimitPerIndex`` is set, else 6) and checked *before* the per-index
rules, as the real controller does (``failed > backoffLimit`` fails the Job with
``BackoffLimitExceeded`` whatever the per-index budgets say); the Job's own ``podFailurePolicy``
rules, first match wins (``Ignore``, ``FailIndex``, ``FailJob`` → ``PodFailurePolicy``,
``Count``; ``onExitCodes`` with ``In``/``NotIn`` and an optional container name, exit code 0
never matching ``NotIn``; ``onPodConditions``). An :meth:`ProcessKubelet.evict` is a
disruption (the pod gets a ``DisruptionTarget`` condition), a :meth:`ProcessKubelet.kill` is
a crash. A Job that disappears has its processes terminated
(SIGTERM, then SIGKILL after the pod's grace period, capped at 10 s).
:attr:`ProcessKubelet.crash` makes every pod of a named Job exit at once with a given code
(an image whose entrypoint cannot start), to drive a Job into failure as a whole;
:attr:`ProcessKubelet.exits` scripts each attempt's exit code per index.
Pods run at a lower CPU priority (``nice``, 10 by default) than the test process and the API
emulator: on a cluster the control plane does not share CPUs with the pods, while here 50
agents starting at once on 2 cores would otherwise starve both.
Pod start, as the control plane and the kubelet refuse it: a pod whose ServiceAccount does
not exist is never created (the Job controller records a ``FailedCreate`` Event on the Job and
retries); a container whose env (``secretKeyRef``, ``configMapKeyRef``, ``envFrom``) names a
missing Secret, ConfigMap or key stays ``Pending``, waiting with ``CreateContainerConfigError``;
a missing Secret or ConfigMap volume leaves it waiting in ``ContainerCreating`` with a
``FailedMount`` Event on the pod. Each retried every ``retry_s`` until the object appears.
Injected: :attr:`ProcessKubelet.unschedulable` (pods of a Job stay ``PodScheduled=False``,
``Unschedulable``) and :attr:`ProcessKubelet.image_errors` (``ErrImagePull``…). The
``default`` ServiceAccount and the ``accounts`` given are created at start, as the
ServiceAccount controller and the installation's manifests would. Events are recorded once
per object, reason and message (the real recorder aggregates repeats into a count).
A failed index that is retried waits the controller's per-index backoff (scaled by
``backoff_scale``), and its failure enters ``status.failed`` only once the replacement pod
exists (as observed on the real controller); a failure that ends its index counts at once.
TTL-after-finished: a finished Job with ``ttlSecondsAfterFinished`` is deleted that long
(times ``ttl_scale``) after its condition, its pods with it (Background propagation).
Not modelled: real scheduling and images, probes.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
_FIELD_ANNOTATION = re.compile(r"^metadata\.annotations\['([^']+)'\]$")


def default_command(argv: list[str]) -> list[str]:
    """The image's ``jetreduce`` is this interpreter's ``python -m jetreduce``."""
    if argv and argv[0] == "jetreduce":
        return [sys.executable, "-m", "jetreduce", *argv[1:]]
    return argv


@dataclass
class _Attempt:
    index: int
    pod: str
    proc: asyncio.subprocess.Process | None = None
    disrupted: bool = False
    kill_reason: str | None = None
    """The container's terminated reason to report instead of ``Error`` (``OOMKilled``)."""
    container: str = ""
    created: bool = False
    done: bool = False


@dataclass
class _JobRun:
    name: str
    uid: str
    body: dict[str, Any]
    task: asyncio.Task[None] | None = None
    attempts: dict[int, _Attempt] = field(default_factory=dict)
    succeeded: set[int] = field(default_factory=set)
    failed_indexes: set[int] = field(default_factory=set)
    failures: dict[int, int] = field(default_factory=dict)
    tries: dict[int, int] = field(default_factory=dict)
    """Pods started per index (ignored failures included)."""
    failed_pods: int = 0
    owed: set[int] = field(default_factory=set)
    """Indexes whose last pod failed and will be retried: their failure enters
    ``status.failed`` when the replacement pod is created, as the real controller's does."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_status: dict[str, Any] | None = None
    started: list[tuple[int, int]] = field(default_factory=list)
    """(index, pid) of every process started, in order."""
    active: int = 0
    condition: tuple[str, str] | None = None
    """(type, reason) once the Job finished: kept by every later status write."""


class ProcessKubelet:
    def __init__(
        self,
        api: k8s.ApiClient,
        namespace: str,
        scratch: Path,
        *,
        command: Callable[[list[str]], list[str]] = default_command,
        poll_s: float = 0.1,
        log_dir: Path | None = None,
        nice: int = 10,
        accounts: tuple[str, ...] = ("jetreduce-agent",),
        retry_s: float = 0.2,
        ttl_scale: float = 1.0,
        backoff_scale: float = 0.0,
    ) -> None:
        self.batch = k8s.BatchV1Api(api)
        self.core = k8s.CoreV1Api(api)
        self.namespace = namespace
        self.scratch = scratch
        self.command = command
        self.poll_s = poll_s
        self.log_dir = log_dir
        self.nice = nice
        self.jobs: dict[str, _JobRun] = {}
        self.finished: dict[str, _JobRun] = {}
        self.slowest_api_s = 0.0
        # Its own threads: 50 pods' API calls must not queue behind (or starve) the
        # launcher's calls in the loop's small default executor.
        self._pool = concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="kubelet")
        self.errors: list[BaseException | None] = []
        """Exceptions of Job runs: a test asserts it stays empty."""
        self.crash: dict[str, int] = {}
        """Job name → exit code every pod of that Job ends with at once (set before the Job
        starts): a crash loop, which uses up the Job's per-index backoff."""
        self.accounts = accounts
        self.retry_s = retry_s
        self.ttl_scale = ttl_scale
        self.backoff_scale = backoff_scale
        """The controller's per-index backoff (10 s, doubling, at most 6 min) times this
        before a failed index's next pod; 0 (the default) retries at once."""
        self._expiring: set[asyncio.Task[None]] = set()
        self.unschedulable: dict[str, str] = {}
        """Job name → the scheduler's message for its pods, which then never schedule."""
        self.image_errors: dict[str, tuple[str, str]] = {}
        """Image → (waiting reason, message): pulling it fails (``ErrImagePull``…)."""
        self._recorded: set[tuple[str, str, str]] = set()
        self.exits: dict[str, Callable[[int, int], int | None]] = {}
        """Job name → (index, attempt number from 0) → the exit code that pod ends with at
        once, or None to run the container's command."""

    # -- API (blocking client, off the loop) ------------------------------------------------
    async def _api(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        def call() -> Any:
            r = fn(*args, _preload_content=False, _request_timeout=30, **kw)
            return json.loads(r.data) if r.data else {}

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            return await loop.run_in_executor(self._pool, call)
        finally:
            self.slowest_api_s = max(self.slowest_api_s, asyncio.get_running_loop().time() - t0)

    # -- controller loop --------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        for account in ("default", *self.accounts):
            body = {"metadata": {"name": account}, "automountServiceAccountToken": False}
            with contextlib.suppress(ApiException):  # 409: there already
                await self._api(self.core.create_namespaced_service_account, self.namespace, body)
        try:
            while not stop.is_set():
                listed = await self._api(self.batch.list_namespaced_job, self.namespace)
                present = {}
                for job in listed.get("items", []):
                    meta = job["metadata"]
                    present[meta["uid"]] = job
                    if meta["uid"] not in {r.uid for r in self.jobs.values()}:
                        if meta["uid"] in {r.uid for r in self.finished.values()}:
                            continue
                        run = _JobRun(meta["name"], meta["uid"], job)
                        self.jobs[run.name] = run
                        run.task = asyncio.create_task(self._run_job(run), name=f"job {run.name}")
                for name, run in list(self.jobs.items()):
                    if run.uid not in present:  # deleted: the GC takes its pods
                        await self._terminate(run, grace_s=5)
                        self.jobs.pop(name, None)
                        self.finished[name] = run
                    elif run.task is not None and run.task.done():
                        self.jobs.pop(name, None)
                        self.finished[name] = run
                        if not run.task.cancelled() and run.task.exception() is not None:
                            self.errors.append(run.task.exception())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.poll_s)
        finally:
            for task in self._expiring:
                task.cancel()
            for run in list(self.jobs.values()):
                await self._terminate(run, grace_s=5)
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def _terminate(self, run: _JobRun, grace_s: float) -> None:
        if run.task is not None:
            run.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await run.task
        procs = [a.proc for a in run.attempts.values() if a.proc and a.proc.returncode is None]
        for p in procs:
            _signal(p, signal.SIGTERM)
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), grace_s)
            except TimeoutError:
                _signal(p, signal.SIGKILL)
                await asyncio.wait_for(p.wait(), 10)

    # -- one Job ----------------------------------------------------------------------------
    async def _run_job(self, run: _JobRun) -> None:
        spec = run.body["spec"]
        completions = int(spec.get("completions") or 1)
        parallelism = int(spec.get("parallelism") or 1)
        per_index = spec.get("backoffLimitPerIndex")
        max_failed = spec.get("maxFailedIndexes")
        # The API server's default: MaxInt32 with per-index backoff, else 6.
        backoff_limit = int(spec.get("backoffLimit", 2**31 - 1 if per_index is not None else 6))
        rules = (spec.get("podFailurePolicy") or {}).get("rules") or []
        deadline = spec.get("activeDeadlineSeconds")
        pending = list(range(completions))
        slots = asyncio.Semaphore(parallelism)
        reason: str | None = None
        tasks: set[asyncio.Task[int]] = set()
        loop = asyncio.get_running_loop()
        ends_at = None if deadline is None else loop.time() + float(deadline)

        async def attempt(index: int) -> int:
            failures = run.failures.get(index, 0)
            if failures and self.backoff_scale:  # the per-index backoff, scaled down
                await asyncio.sleep(self.backoff_scale * min(360.0, 10.0 * 2 ** (failures - 1)))
            async with slots:
                return await self._run_pod(run, index)

        try:
            while pending or tasks:
                while pending:
                    index = pending.pop(0)
                    tasks.add(asyncio.create_task(attempt(index), name=f"{run.name}-{index}"))
                await self._write_job_status(run)
                timeout = None if ends_at is None else max(0.0, ends_at - loop.time())
                done, _ = await asyncio.wait(tasks, timeout=timeout, return_when="FIRST_COMPLETED")
                if not done:
                    reason = "DeadlineExceeded"
                    break
                for task in done:
                    tasks.discard(task)
                    index = task.result()
                    attempt_ = run.attempts[index]
                    code = attempt_.proc.returncode if attempt_.proc else -1
                    if code == 0:
                        run.succeeded.add(index)
                        continue
                    action = policy_action(rules, attempt_.container, code, attempt_.disrupted)
                    if action == "Ignore":  # retried, counted nowhere
                        pending.append(index)
                        continue
                    run.failures[index] = run.failures.get(index, 0) + 1
                    if action == "FailJob":
                        reason = "PodFailurePolicy"
                    elif action == "FailIndex" or (
                        per_index is not None and run.failures[index] > int(per_index)
                    ):
                        run.failed_indexes.add(index)
                    else:  # counted in status.failed once its replacement exists
                        run.owed.add(index)
                        pending.append(index)
                        continue
                    run.failed_pods += 1
                # The controller's order: a FailJob rule, then backoffLimit, then the per-index
                # rules (so a finite backoffLimit binds before the per-index budgets do).
                if reason is not None:
                    break
                if run.failed_pods + len(run.owed) > backoff_limit:
                    reason = "BackoffLimitExceeded"
                    break
                if max_failed is not None and len(run.failed_indexes) > int(max_failed):
                    reason = "MaxFailedIndexesExceeded"
                    break
        except asyncio.CancelledError:  # the Job was deleted: its pods go with it
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        run.failed_pods += len(run.owed)  # retries that will not come: counted now
        run.owed.clear()
        if reason is None and run.failed_indexes:
            reason = "FailedIndexes"
        if tasks:  # the Job failed: stop what still runs
            for a in run.attempts.values():
                if a.proc and a.proc.returncode is None:
                    _signal(a.proc, signal.SIGKILL)
            await asyncio.wait(tasks, timeout=10)
        condition = "Complete" if reason is None else "Failed"
        await self._write_job_status(run, active=0, condition=condition, reason=reason)
        ttl = spec.get("ttlSecondsAfterFinished")
        if ttl is not None:
            task = asyncio.create_task(self._expire(run.name, float(ttl) * self.ttl_scale))
            self._expiring.add(task)
            task.add_done_callback(self._expiring.discard)

    async def _expire(self, job: str, after_s: float) -> None:
        """The TTL-after-finished controller: delete the finished Job, its pods with it."""
        await asyncio.sleep(after_s)
        with contextlib.suppress(ApiException):  # deleted meanwhile
            await self._api(
                self.batch.delete_namespaced_job,
                job,
                self.namespace,
                propagation_policy="Background",
            )

    async def _write_job_status(
        self,
        run: _JobRun,
        *,
        active: int | None = None,
        condition: str | None = None,
        reason: str | None = None,
    ) -> None:
        """Write the Job's status if it changed. ``ready`` (pods whose process runs), as the
        real controller keeps it, changes when a pod is replaced, which is how a watcher of
        Job status learns of a disruption that no ``failed`` count shows."""
        async with run.lock:
            if condition is not None:
                run.condition = (condition, reason or "Completed")
            run.active = sum(1 for a in run.attempts.values() if a.created and not a.done)
            status: dict[str, Any] = {
                "active": run.active if active is None else active,
                "ready": sum(
                    1 for a in run.attempts.values() if a.proc and a.proc.returncode is None
                ),
                "succeeded": len(run.succeeded),
                "failed": run.failed_pods,
                "completedIndexes": _compress(run.succeeded),
            }
            if run.failed_indexes:
                status["failedIndexes"] = _compress(run.failed_indexes)
            if run.condition is not None:
                kind, why = run.condition
                status["conditions"] = [{"type": kind, "status": "True", "reason": why}]
            if status == run.last_status:
                return  # unchanged: spare the API server
            run.last_status = status
            with contextlib.suppress(ApiException):  # deleted meanwhile
                await self._api(
                    self.batch.patch_namespaced_job_status,
                    run.name,
                    self.namespace,
                    {"status": status},
                )

    async def _run_pod(self, run: _JobRun, index: int) -> int:
        template = run.body["spec"]["template"]
        name = f"{run.name}-{index}-{secrets.token_hex(3)[:5]}"
        labels = dict(template.get("metadata", {}).get("labels") or {})
        labels.update(
            {
                "batch.kubernetes.io/job-name": run.name,
                "job-name": run.name,
                "batch.kubernetes.io/controller-uid": run.uid,
                INDEX_ANNOTATION: str(index),
            }
        )
        annotations = dict(template.get("metadata", {}).get("annotations") or {})
        annotations[INDEX_ANNOTATION] = str(index)
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [
                    {"apiVersion": "batch/v1", "kind": "Job", "name": run.name, "uid": run.uid}
                ],
            },
            "spec": template["spec"],
        }
        attempt = _Attempt(index, name, container=template["spec"]["containers"][0]["name"])
        run.attempts[index] = attempt
        tries = run.tries.get(index, 0)
        run.tries[index] = tries + 1
        await self._admit(run, pod)
        await self._api(self.core.create_namespaced_pod, self.namespace, pod)
        attempt.created = True
        if index in run.owed:  # the failure this pod replaces now shows in status.failed
            run.owed.discard(index)
            run.failed_pods += 1
        await self._patch_pod(name, {"phase": "Pending"})
        await self._write_job_status(run)
        container = template["spec"]["containers"][0]
        env = await self._until_startable(run, pod, container)
        root = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.scratch))
        for mount in container.get("volumeMounts") or []:  # emptyDirs as temp dirs
            (root / mount["name"]).mkdir(exist_ok=True)
        env["TMPDIR"] = str(root / "tmp")
        argv = self.command(
            list(container.get("command") or []) + list(container.get("args") or [])
        )
        scripted = self.exits[run.name](index, tries) if run.name in self.exits else None
        if run.name in self.crash:
            scripted = self.crash[run.name]
        if scripted is not None:
            argv = ["sh", "-c", f"exit {scripted}"]
        if self.nice:
            # Through nice(1), not a preexec_fn: that would make Python fork this whole
            # process (threads and all) on the event loop instead of vfork-and-exec.
            argv = ["nice", "-n", str(self.nice), *argv]
        out: Any = asyncio.subprocess.DEVNULL
        handle = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            handle = (self.log_dir / f"{name}.log").open("ab")
            out = handle
        try:
            attempt.proc = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                cwd=root / "work" if (root / "work").is_dir() else root,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        finally:
            if handle is not None:
                handle.close()
        run.started.append((index, attempt.proc.pid))
        await self._patch_pod(name, {"phase": "Running"})
        await self._write_job_status(run)
        try:
            code = await attempt.proc.wait()
        except asyncio.CancelledError:
            _signal(attempt.proc, signal.SIGKILL)
            raise
        finally:
            shutil.rmtree(root, ignore_errors=True)
        exit_code = code if code >= 0 else 128 - code
        status: dict[str, Any] = {
            "phase": "Succeeded" if code == 0 else "Failed",
            "containerStatuses": [
                {
                    "name": container["name"],
                    "state": {
                        "terminated": {
                            "exitCode": exit_code,
                            "reason": attempt.kill_reason
                            or ("Completed" if exit_code == 0 else "Error"),
                        }
                    },
                }
            ],
        }
        if attempt.disrupted:
            status["conditions"] = [
                {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}
            ]
        await self._patch_pod(name, status)
        attempt.done = True
        await self._write_job_status(run)
        return index

    async def _patch_pod(self, name: str, status: dict[str, Any]) -> None:
        with contextlib.suppress(ApiException):  # the GC may have taken it with its Job
            await self._api(
                self.core.patch_namespaced_pod_status, name, self.namespace, {"status": status}
            )

    # -- pod start ----------------------------------------------------------------------------
    async def _record(self, kind: str, name: str, reason: str, message: str) -> None:
        """A Warning Event about ``kind``/``name``, once per object, reason and message."""
        if (name, reason, message) in self._recorded:
            return
        self._recorded.add((name, reason, message))
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{name}.{secrets.token_hex(8)}", "namespace": self.namespace},
            "involvedObject": {"kind": kind, "name": name, "namespace": self.namespace},
            "reason": reason,
            "message": message,
            "type": "Warning",
            "count": 1,
            "firstTimestamp": _now_iso(),
            "lastTimestamp": _now_iso(),
            "source": {"component": "job-controller" if kind == "Job" else "kubelet"},
        }
        await self._api(self.core.create_namespaced_event, self.namespace, body)

    async def _exists(self, read: Callable[..., Any], name: str) -> bool:
        try:
            await self._api(read, name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def _admit(self, run: _JobRun, pod: dict[str, Any]) -> None:
        """Until the pod's ServiceAccount exists, the Job controller's create is refused:
        a ``FailedCreate`` Event on the Job, no pod."""
        account = pod["spec"].get("serviceAccountName") or "default"
        while not await self._exists(self.core.read_namespaced_service_account, account):
            await self._record(
                "Job",
                run.name,
                "FailedCreate",
                f'Error creating: pods "{pod["metadata"]["name"]}" is forbidden: error looking '
                f'up service account {self.namespace}/{account}: serviceaccount "{account}" '
                "not found",
            )
            await asyncio.sleep(self.retry_s)

    async def _until_startable(
        self, run: _JobRun, pod: dict[str, Any], container: dict[str, Any]
    ) -> dict[str, str]:
        """The container's resolved env once it can start; until then the pod is Pending with
        the reason the scheduler or kubelet would give, retried every ``retry_s``."""
        name = pod["metadata"]["name"]
        last: dict[str, Any] | None = None
        while True:
            status: dict[str, Any]
            if run.name in self.unschedulable:
                status = {
                    "phase": "Pending",
                    "conditions": [
                        {
                            "type": "PodScheduled",
                            "status": "False",
                            "reason": "Unschedulable",
                            "message": self.unschedulable[run.name],
                        }
                    ],
                }
            elif container["image"] in self.image_errors:
                status = _waiting(container["name"], *self.image_errors[container["image"]])
            elif missing := await self._missing_volume(pod):
                await self._record(
                    "Pod", name, "FailedMount", f"MountVolume.SetUp failed for volume {missing}"
                )
                status = _waiting(container["name"], "ContainerCreating", "")
            else:
                try:
                    return await self._resolve_env(container, pod)
                except _ConfigError as exc:
                    status = _waiting(container["name"], "CreateContainerConfigError", str(exc))
            if status != last:
                await self._patch_pod(name, status)
                last = status
            await asyncio.sleep(self.retry_s)

    async def _missing_volume(self, pod: dict[str, Any]) -> str | None:
        for volume in pod["spec"].get("volumes") or []:
            if "secret" in volume:
                secret = volume["secret"]["secretName"]
                if not await self._exists(self.core.read_namespaced_secret, secret):
                    return f'"{volume["name"]}" : secret "{secret}" not found'
            if "configMap" in volume:
                cm = volume["configMap"]["name"]
                if not await self._exists(self.core.read_namespaced_config_map, cm):
                    return f'"{volume["name"]}" : configmap "{cm}" not found'
        return None

    async def _read_data(self, kind: str, name: str) -> dict[str, str]:
        """A Secret's (decoded) or ConfigMap's data; :class:`_ConfigError` if it is missing."""
        read = (
            self.core.read_namespaced_secret
            if kind == "secret"
            else self.core.read_namespaced_config_map
        )
        try:
            obj = await self._api(read, name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                raise _ConfigError(f'{kind} "{name}" not found') from None
            raise
        if kind == "secret":
            data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
            return {**data, **(obj.get("stringData") or {})}
        return dict(obj.get("data") or {})

    async def _resolve_env(self, container: dict[str, Any], pod: dict[str, Any]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("JETREDUCE_")}
        env.pop("JOB_COMPLETION_INDEX", None)
        for source in container.get("envFrom") or []:
            for kind, ref in (
                ("secret", source.get("secretRef")),
                ("configmap", source.get("configMapRef")),
            ):
                if ref is not None:
                    env.update(await self._read_data(kind, ref["name"]))
        for entry in container.get("env") or []:
            if "value" in entry:
                env[entry["name"]] = entry["value"]
                continue
            source = entry.get("valueFrom") or {}
            if "fieldRef" in source:
                m = _FIELD_ANNOTATION.match(source["fieldRef"]["fieldPath"])
                if not m:
                    raise ValueError(f"unsupported fieldRef {source['fieldRef']}")
                env[entry["name"]] = pod["metadata"]["annotations"][m[1]]
            elif "secretKeyRef" in source or "configMapKeyRef" in source:
                kind = "secret" if "secretKeyRef" in source else "configmap"
                ref = source.get("secretKeyRef") or source["configMapKeyRef"]
                data = await self._read_data(kind, ref["name"])
                if ref["key"] not in data:
                    label = "Secret" if kind == "secret" else "ConfigMap"
                    raise _ConfigError(
                        f"couldn't find key {ref['key']} in {label} {self.namespace}/{ref['name']}"
                    )
                env[entry["name"]] = data[ref["key"]]
            else:
                raise ValueError(f"unsupported env source {entry}")
        return env

    # -- fault injection --------------------------------------------------------------------
    def attempt(self, job: str, index: int) -> _Attempt | None:
        run = self.jobs.get(job) or self.finished.get(job)
        return None if run is None else run.attempts.get(index)

    def kill(
        self, job: str, index: int, sig: int = signal.SIGKILL, reason: str | None = None
    ) -> int:
        """Crash the running process of ``index`` (counts against the index's backoff);
        ``reason`` is the container's terminated reason to report (``OOMKilled``: the
        kernel's OOM killer sends SIGKILL too), else ``Error``."""
        attempt = self.attempt(job, index)
        assert attempt is not None and attempt.proc is not None, f"{job}/{index} not running"
        attempt.kill_reason = reason
        pid = attempt.proc.pid
        _signal(attempt.proc, sig)
        return pid

    def evict(self, job: str, index: int) -> int:
        """A disruption: SIGTERM and a ``DisruptionTarget`` condition (does not count)."""
        attempt = self.attempt(job, index)
        assert attempt is not None and attempt.proc is not None, f"{job}/{index} not running"
        attempt.disrupted = True
        _signal(attempt.proc, signal.SIGTERM)
        return attempt.proc.pid

    def processes_alive(self) -> int:
        runs = list(self.jobs.values()) + list(self.finished.values())
        return sum(
            1
            for r in runs
            for a in r.attempts.values()
            if a.proc is not None and a.proc.returncode is None
        )


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _ConfigError(Exception):
    """The container cannot be configured yet (the kubelet's CreateContainerConfigError)."""


def _waiting(container: str, reason: str, message: str) -> dict[str, Any]:
    state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
    return {
        "phase": "Pending",
        "containerStatuses": [
            {"name": container, "ready": False, "restartCount": 0, "state": state}
        ],
    }


def policy_action(rules: list[dict[str, Any]], container: str, code: int, disrupted: bool) -> str:
    """The ``podFailurePolicy`` action for a failed pod of one container (its exit code,
    whether it carries a ``DisruptionTarget`` condition): the first matching rule's, else
    ``Count``."""
    for rule in rules:
        on_codes = rule.get("onExitCodes")
        if on_codes is not None:
            if on_codes.get("containerName") not in (None, container):
                continue
            values = set(on_codes.get("values") or [])
            if (code in values) if on_codes["operator"] == "In" else (code not in values):
                return str(rule["action"])
        for cond in rule.get("onPodConditions") or []:
            wanted = cond.get("status", "True") == "True"
            if cond.get("type") == "DisruptionTarget" and disrupted == wanted:
                return str(rule["action"])
    return "Count"


def _signal(proc: asyncio.subprocess.Process, sig: int) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def _compress(indexes: set[int]) -> str:
    """``{0, 1, 2, 5}`` → ``"0-2,5"`` (the Job status format)."""
    runs: list[list[int]] = []
    for i in sorted(indexes):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
